"""The training loader: DALI renders the stored views for the student; the cached targets of the same rows follow.

Per micro-batch ``g`` (a global index; see :mod:`morphcache.train.sampler`):

- a parallel ``fn.external_source`` (``parallel=True``, ``py_num_workers`` processes) calls :class:`ViewSource`
  per sample. ``ViewSource`` is stateless and picklable: it holds the store path, the sampler (ok image ids,
  seed) and an offset, maps ``SampleInfo.idx_in_epoch`` to the global sample ``start * B + idx``, and returns the
  canonical encoded bytes of the row's image (:func:`~morphcache.extract.images.load_canonical_bytes`), its stored
  ViewParams and the row id. It never raises ``StopIteration``: the stream is endless and the loop takes what it
  needs. In each worker it opens the store once and keeps the ``views`` array (36 bytes per row) and image paths.
- the rendering is extraction's own :func:`~morphcache.extract.render_dali.build_view_pipeline`, at the student's
  input size (plus the teacher's size for ``--teacher-online``, plus a second view for LUT), so the student sees
  exactly the pixels the teacher saw.
- targets are read in the main process, a few batches ahead, by
  :class:`~morphcache.train.targets.TargetPrefetcher` on a background thread. The rows DALI returns are checked
  against the sampler's, so images and targets cannot drift.

``Batch(images (B,3,S,S) float32, targets (B,T,D) float32 | None, rows (B,) int64)`` plus optional
``images2``/``rows2`` (LUT's second view) and ``teacher_images`` (B,3,St,St) (online teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from morphcache.errors import reraise_from_worker
from morphcache.train.sampler import EpochSampler
from morphcache.train.targets import TargetPrefetcher

if TYPE_CHECKING:  # pragma: no cover - torch is imported lazily: spawned DALI workers never need it
    import torch


@dataclass
class Batch:
    """One micro-batch. ``targets`` is None when the teacher runs online (``teacher_images`` set instead)."""

    images: torch.Tensor  # (B, 3, S, S) float32, normalized
    targets: torch.Tensor | None  # (B, T, D) float32, dequantized
    rows: torch.Tensor  # (B,) int64 store rows
    images2: torch.Tensor | None = None  # (B, 3, S, S) second view (LUT)
    rows2: torch.Tensor | None = None  # (B,) int64
    teacher_images: torch.Tensor | None = None  # (B, 3, St, St) at the teacher's size (--teacher-online)


@dataclass(frozen=True)
class RenderSpec:
    """What to render: student side, optional teacher side, normalization, interpolation, second view."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "linear"
    teacher_size: int | None = None
    second_view: bool = False
    lut_views: bool = False  # both views drawn from LUT's recipe (morphcache.train.lut_views), not the stored rows

    @property
    def view_interpolation(self) -> str:
        """The resize filter views are rendered with: LUT's views always bicubic (the release's
        ``Resize(interpolation=3)``), stored views the store's (``interpolation``)."""
        return "cubic" if self.lut_views else self.interpolation

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.img_size,) if self.teacher_size is None else (self.img_size, self.teacher_size)


class ViewSource:
    """Per-sample callable: global sample -> (encoded uint8 (n,), params float32 (P,), row int64 (1,)[, params2, row2]).

    P = N_VIEW_PARAMS (stored rows), or N_RENDER_PARAMS with ``lut_size`` (LUT's rows carry solarize, blur_sigma).

    Picklable (plain fields only); the store is opened lazily in whichever process calls it.
    """

    def __init__(self, store_path: str, sampler: EpochSampler, image_root: str | None = None,
                 start_step: int = 0, lut_size: int | None = None) -> None:
        self.store_path = str(store_path)
        self.sampler = sampler
        self.image_root = image_root
        self.start_sample = int(start_step) * sampler.batch_size
        self.lut_size = lut_size  # set: both views follow LUT's recipe at this student side instead of stored rows
        self._views: np.ndarray | None = None
        self._images = None  # StoredImages, opened lazily in the reading process
        self._sizes: np.ndarray | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_views"] = state["_images"] = state["_sizes"] = None
        return state

    def _open(self) -> None:
        from morphcache.extract.stored_images import StoredImages
        from morphcache.store.feature_store import FeatureStore

        store = FeatureStore.open(self.store_path)
        self._views = np.asarray(store.array("views")[:], dtype=np.float32)  # (R, P)
        self._images = StoredImages.from_store(store, self.image_root)
        self._sizes = np.asarray(store.array("images/size")[:], dtype=np.int64)  # (N, 2) source height, width

    def image_bytes(self, row: int) -> np.ndarray:
        """Canonical encoded bytes of ``row``'s image (loose file or tar member read by (shard, offset)); bytes
        changed since extraction are refused (one blake2b)."""
        if self._images is None:
            self._open()
        data, _ = self._images.load(row // self.sampler.views_per_image, verify=False)
        return np.frombuffer(data, dtype=np.uint8)

    def sample(self, global_sample: int) -> tuple[np.ndarray, ...]:
        if self._views is None:
            self._open()
        row, row2 = self.sampler.sample_rows(global_sample)
        params, params2 = self._views[row], self._views[row2]
        if self.lut_size is not None:
            from morphcache.train.lut_views import lut_view_rows

            hw = self._sizes[row // self.sampler.views_per_image]
            params, params2 = lut_view_rows(hw, self.lut_size, self.sampler.seed, global_sample, row)
        out = (self.image_bytes(row), params, np.array([row], dtype=np.int64))
        if self.sampler.second_view:
            out += (params2, np.array([row2], dtype=np.int64))
        return out

    def __call__(self, sample_info) -> tuple[np.ndarray, ...]:
        return self.sample(self.start_sample + int(sample_info.idx_in_epoch))


def _to_torch(tl) -> "torch.Tensor":
    """A uniform DALI CPU TensorList -> torch tensor (copies)."""
    import torch

    return torch.from_numpy(np.array(tl.as_tensor()))


class DaliTrainLoader:
    """Endless iterator of :class:`Batch` from micro-batch ``start_step`` on, rendered by a DALI pipeline.

    Args:
        store: an open ``FeatureStore``; sampler: the run's :class:`EpochSampler`; render: :class:`RenderSpec`.
        workers: ``py_num_workers`` of the parallel external source; threads: DALI CPU operator threads.
        read_targets: False when the teacher runs online (``Batch.targets`` is then None).
        start_method: ``"spawn"`` (default; workers receive the pickled :class:`ViewSource`) or ``"fork"``.
        target_device: where targets are dequantized (None: CPU; CUDA: pinned staging and an asynchronous copy,
            see :class:`~morphcache.train.targets.TargetPrefetcher`).
    """

    def __init__(self, store, sampler: EpochSampler, render: RenderSpec, start_step: int = 0, workers: int = 2,
                 threads: int = 1, read_targets: bool = True, image_root: str | None = None,
                 prefetch: int = 2, start_method: str = "spawn", target_device: str | None = None) -> None:
        self.store, self.sampler, self.render = store, sampler, render
        self.start_step = int(start_step)
        self.source = ViewSource(str(Path(store.path)), sampler, image_root, start_step,
                                 lut_size=render.img_size if render.lut_views else None)
        self.targets = TargetPrefetcher(store, sampler, prefetch, device=target_device) if read_targets else None
        self._pipe = _build_pipeline(self.source, render, sampler.batch_size, max(1, workers), threads,
                                     prefetch, start_method)

    def __iter__(self) -> Iterator[Batch]:
        step = self.start_step
        while True:
            try:
                outs = self._pipe.run()
            except Exception as exc:  # a worker's MorphcacheError arrives as a bare Exception with its traceback
                reraise_from_worker(exc)
            yield self._batch(step, outs)
            step += 1

    def _batch(self, step: int, outs) -> Batch:
        n_sizes = len(self.render.sizes)
        images = [_to_torch(o) for o in outs[:n_sizes]]
        rows = _to_torch(outs[n_sizes]).reshape(-1).long()
        batch = Batch(images=images[0], targets=None, rows=rows)
        if self.render.teacher_size is not None:
            batch.teacher_images = images[1]
        if self.render.second_view:
            batch.images2 = _to_torch(outs[n_sizes + 1])
            batch.rows2 = _to_torch(outs[n_sizes + 2]).reshape(-1).long()
        if self.targets is not None:
            batch.targets = self.targets.get(step, rows.numpy())
        return batch

    def close(self) -> None:
        if self.targets is not None:
            self.targets.close()
        self._pipe = None  # dropping the pipeline stops its worker processes


def _build_pipeline(source: ViewSource, render: RenderSpec, batch_size: int, workers: int, threads: int,
                    prefetch: int, start_method: str):
    """The DALI pipeline: parallel external source -> build_view_pipeline at each size (and the second view)."""
    from nvidia.dali import fn, pipeline_def, types

    from morphcache.extract.render_dali import build_view_pipeline

    second = render.second_view

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, py_num_workers=workers,
                  py_start_method=start_method, prefetch_queue_depth=max(1, prefetch), exec_dynamic=True)
    def train_pipeline():
        dtypes = [types.UINT8, types.FLOAT, types.INT64] + ([types.FLOAT, types.INT64] if second else [])
        outs = fn.external_source(source=source, num_outputs=len(dtypes), parallel=True, batch=False,
                                  dtype=dtypes)
        encoded, params, rows = outs[0], outs[1], outs[2]
        # LUT's rows carry solarize / blur_sigma (effects) and render bicubic; stored rows keep the extraction graph
        images = build_view_pipeline(encoded, params, sizes=render.sizes, mean=render.mean, std=render.std,
                                     interpolation=render.view_interpolation, effects=render.lut_views)
        result = list(images) + [rows]
        if second:
            images2 = build_view_pipeline(encoded, outs[3], sizes=(render.img_size,), mean=render.mean,
                                          std=render.std, interpolation=render.view_interpolation,
                                          effects=render.lut_views)
            result += [images2[0], outs[4]]
        return tuple(result)

    pipe = train_pipeline()
    pipe.build()
    return pipe
