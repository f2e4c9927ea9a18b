"""Which store rows a training step reads: one view per image per epoch, seeded, sharded by rank, resumable.

Row ``r`` of a store is view ``r % V`` of image ``r // V``. For epoch ``e`` the sampler

1. shuffles the servable images with ``numpy.random.default_rng((seed, e))``,
2. picks one of the ``V`` views of each image from the same generator (or of the first ``views_used`` views; with
   ``view_order="epoch"`` epoch ``e`` takes view ``e % views_used`` instead, the generator's draws unchanged),
3. drops the tail so every rank gets the same number of rows (``floor(n / world_size)``), gives rank ``k`` the
   rows ``k, k + world_size, ...`` and groups them into ``steps_per_epoch`` full batches (the last partial batch is
   dropped: DALI and the student want uniform shapes).

A position in the stream is one integer, the global micro-batch index ``g``: epoch ``g // steps_per_epoch``, batch
``g % steps_per_epoch``. :meth:`EpochSampler.batch_rows` is a pure function of ``g`` (the per-epoch permutation is
memoized), so any process (the main process, a DALI worker, a DataLoader worker) computes the same rows, and a
resumed run continues from the ``g`` stored in its checkpoint. Everything it holds is plain numpy, so it pickles.
"""

from __future__ import annotations

import numpy as np

from morphcache.errors import ConfigError


class EpochSampler:
    """Epoch row order over the servable rows of a store.

    Args:
        ok_rows: int64 row ids that may be served (``FeatureStore.ok_rows()``); only images with all ``V`` rows
            in it are used.
        views_per_image: ``V``.
        batch_size: rows per micro-batch per rank.
        seed: run seed; epoch ``e`` uses ``default_rng((seed, e))``.
        rank, world_size: DDP shard of this process.
        second_view: also pick a second, different view of each image (LUT's two views); same view when ``V == 1``.
        views_used: use only the first ``views_used`` of the ``V`` views (None: all); the image order does not
            depend on it, so runs with different ``views_used`` see the same images in the same order.
        view_order: ``"random"`` (a random used view per image per epoch) or ``"epoch"`` (view ``e % views_used``
            in epoch ``e``: no view repeats while the epochs do not outnumber the views).
    """

    def __init__(
        self,
        ok_rows: np.ndarray,
        views_per_image: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        second_view: bool = False,
        views_used: int | None = None,
        view_order: str = "random",
    ) -> None:
        V = int(views_per_image)
        used = V if views_used is None else int(views_used)
        if not 1 <= used <= V:
            raise ConfigError(f"views_used={views_used} must lie in [1, {V}] (the store's views per image)")
        if view_order not in ("random", "epoch"):
            raise ConfigError(f"view_order={view_order!r}: use 'random' or 'epoch'")
        if V <= 0 or batch_size <= 0:
            raise ConfigError(f"views_per_image={V} and batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} must lie in [0, world_size={world_size})")
        rows = np.asarray(ok_rows, dtype=np.int64).reshape(-1)
        images, counts = np.unique(rows // V, return_counts=True)
        self.images = images[counts == V].astype(np.int64)  # (N_ok,) images with every view servable
        self.views_per_image = V
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.second_view = bool(second_view)
        self.views_used = used
        self.view_order = view_order
        self.per_rank = len(self.images) // self.world_size
        self.steps_per_epoch = self.per_rank // self.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the store serves {len(self.images)} images, fewer than batch_size {batch_size} x world_size "
                f"{world_size}; lower --batch-size or extract more images"
            )
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows for ``epoch``: ``(rows, rows2)`` int64 ``(steps_per_epoch * batch_size,)``.

        ``rows2`` holds the second view of each image (equal to ``rows`` unless ``second_view``).
        """
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        rng = np.random.default_rng((self.seed, int(epoch)))
        order = rng.permutation(self.images)
        V, U = self.views_per_image, self.views_used
        views = rng.integers(0, U, size=order.size)
        if self.view_order == "epoch":
            views = np.full_like(views, int(epoch) % U)
        rows = order * V + views
        if self.second_view and U > 1:
            other = (views + rng.integers(1, U, size=order.size)) % U
            rows2 = order * V + other
        else:
            rows2 = rows
        n = self.steps_per_epoch * self.batch_size
        shard = slice(self.rank, self.per_rank * self.world_size, self.world_size)
        out = rows[shard][:n].copy(), rows2[shard][:n].copy()
        self._cache = (int(epoch), out[0], out[1])
        return out

    def position(self, global_step: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` of micro-batch ``global_step``."""
        return divmod(int(global_step), self.steps_per_epoch)

    def batch_rows(self, global_step: int) -> np.ndarray:
        """Rows (B,) int64 of micro-batch ``global_step`` for this rank."""
        return self.batch_rows_pair(global_step)[0]

    def batch_rows_pair(self, global_step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, rows2)`` (B,) int64 of micro-batch ``global_step`` (``rows2``: the second views)."""
        epoch, i = self.position(global_step)
        rows, rows2 = self.epoch_rows(epoch)
        b = self.batch_size
        return rows[i * b : (i + 1) * b], rows2[i * b : (i + 1) * b]

    def sample_rows(self, global_sample: int) -> tuple[int, int]:
        """``(row, row2)`` of sample ``global_sample = global_step * batch_size + index_in_batch``."""
        step, j = divmod(int(global_sample), self.batch_size)
        rows, rows2 = self.batch_rows_pair(step)
        return int(rows[j]), int(rows2[j])

    def state_dict(self) -> dict:
        """Plain-type description (checked on resume: a different order would not be the same run)."""
        return {
            "seed": self.seed,
            "views_per_image": self.views_per_image,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "n_images": int(len(self.images)),
            "steps_per_epoch": self.steps_per_epoch,
            # only when not the default, so checkpoints written before these options existed still resume
            **({"views_used": self.views_used} if self.views_used != self.views_per_image else {}),
            **({"view_order": self.view_order} if self.view_order != "random" else {}),
        }
