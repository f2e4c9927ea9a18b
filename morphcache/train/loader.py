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

Every training loader (this one, :class:`~morphcache.train.torch_loader.TorchTrainLoader`, and any registered in
:data:`morphcache.registries.loaders`) is built from one :class:`LoaderOptions` and implements the
:class:`TrainLoader` protocol; :class:`morphcache.testing.contracts.TrainLoaderContract` checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import numpy as np

from morphcache.errors import ConfigError, reraise_from_worker
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


#: ``multiprocessing`` start methods the loaders' worker processes may use.
START_METHODS = ("spawn", "fork", "forkserver")


@dataclass(frozen=True)
class LoaderOptions:
    """Everything a training loader takes, in one typed, validated object (built by :meth:`for_run` from a
    ``RunConfig``; tests and benchmarks build it directly).

    Args:
        store: the open :class:`~morphcache.store.feature_store.FeatureStore` (targets and image bytes come from it).
        sampler: the run's :class:`EpochSampler`; it carries the row order: batch size, seed, rank / world size,
            ``views_used``, ``view_order``, the second view, and the dropped tail (every epoch is
            ``sampler.steps_per_epoch`` full batches; there is no ``drop_last=False``).
        render: what to render (:class:`RenderSpec`: student side in pixels, teacher side, normalization, LUT views).
        start_step: global micro-batch ``g`` the first batch is (0 for a new run; ``step * accum_steps`` on resume).
        workers: loader worker processes (DALI: ``py_num_workers``, at least 1; torch: DataLoader workers, 0 = the
            main process).
        threads: DALI CPU operator threads (the torch loader ignores it).
        read_targets: False when the teacher runs online (``Batch.targets`` is then None).
        image_root: where the store's images are when they moved since extraction (None: ``spec.dataset_root``).
        prefetch: batches prepared ahead (DALI queue depth, DataLoader ``prefetch_factor``, target read-ahead).
        start_method: how worker processes start (:data:`START_METHODS`).
        target_device: where targets are dequantized (None: CPU; ``"cuda..."``: pinned staging and an asynchronous
            copy, see :class:`~morphcache.train.targets.TargetPrefetcher`).

    Raises:
        ConfigError: a negative ``start_step`` or ``workers``, ``threads`` or ``prefetch`` below 1, an unknown
            ``start_method``.
    """

    store: Any  # FeatureStore (not imported here: spawned DALI workers import this module)
    sampler: EpochSampler
    render: RenderSpec
    start_step: int = 0
    workers: int = 2
    threads: int = 1
    read_targets: bool = True
    image_root: str | None = None
    prefetch: int = 2
    start_method: str = "spawn"
    target_device: str | None = None

    def __post_init__(self) -> None:
        if int(self.start_step) < 0:
            raise ConfigError(f"loader start_step={self.start_step} must be >= 0")
        if int(self.workers) < 0:
            raise ConfigError(f"loader workers={self.workers} must be >= 0")
        if int(self.threads) < 1 or int(self.prefetch) < 1:
            raise ConfigError(f"loader threads={self.threads} and prefetch={self.prefetch} must be >= 1")
        if self.start_method not in START_METHODS:
            raise ConfigError(f"loader start_method={self.start_method!r}: use one of {', '.join(START_METHODS)}")

    @property
    def batch_size(self) -> int:
        """Rows per micro-batch on this rank (the sampler's)."""
        return self.sampler.batch_size

    @property
    def lut_size(self) -> int | None:
        """Student side both views are drawn at by LUT's recipe (``render.lut_views``), else None (stored views)."""
        return self.render.img_size if self.render.lut_views else None

    @classmethod
    def for_run(cls, config, store, sampler: EpochSampler, img_size: int, *, teacher_size: int | None = None,
                start_step: int = 0, read_targets: bool = True, image_root: str | None = None,
                target_device: str | None = None) -> "LoaderOptions":
        """The options of a training run: ``config`` (a ``RunConfig``) gives ``workers`` and ``lut_views``, the
        store's spec gives normalization and interpolation, ``sampler.second_view`` says whether a second view is
        rendered; ``img_size`` is the student's input side in pixels, ``teacher_size`` the online teacher's.

        Raises:
            ConfigError: see the class.
        """
        spec = store.spec
        second = bool(sampler.second_view)
        render = RenderSpec(img_size, tuple(spec.teacher.mean), tuple(spec.teacher.std), spec.augment.interpolation,
                            teacher_size=teacher_size, second_view=second,
                            lut_views=second and config.lut_views == "release")
        return cls(store, sampler, render, start_step=start_step, workers=config.workers, read_targets=read_targets,
                   image_root=image_root, target_device=target_device)


@runtime_checkable
class TrainLoader(Protocol):
    """What the training loop needs from a loader (every entry of :data:`morphcache.registries.loaders` returns one).

    - ``options``: the :class:`LoaderOptions` it was built from.
    - ``iter(loader)``: an endless stream of :class:`Batch`; the ``k``-th is micro-batch
      ``g = options.start_step + k`` and holds exactly ``options.sampler.batch_rows(g)`` (and ``batch_rows_pair``'s
      second views), ``targets`` the store's dequantized tokens of those rows (None without ``read_targets``).
      Epoch boundaries are inside the stream (epoch ``g // steps_per_epoch``), so there is no ``set_epoch`` and no
      ``__len__``: resuming is building a new loader with ``start_step`` set, and a loader is iterated once.
    - ``close()``: stop worker processes and read-ahead threads (idempotent).
    """

    options: LoaderOptions

    def __iter__(self) -> Iterator[Batch]: ...

    def close(self) -> None: ...


def _ignore_sigint_in_worker() -> None:
    """In a loader worker process (unpickling a ViewSource), ignore SIGINT: Ctrl-C reaches the terminal's whole
    process group, and a worker would print its own KeyboardInterrupt traceback. The main process handles it
    and stops the workers (``close()``)."""
    import multiprocessing
    import signal
    import threading

    if multiprocessing.parent_process() is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


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

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        _ignore_sigint_in_worker()

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
    """Endless iterator of :class:`Batch` from micro-batch ``options.start_step`` on, rendered by a DALI pipeline
    (a :class:`TrainLoader`).

    Args:
        options: the :class:`LoaderOptions`; ``workers`` is the parallel external source's ``py_num_workers``
            (at least 1), ``threads`` the DALI CPU operator threads, ``start_method`` ``"spawn"`` (workers
            receive the pickled :class:`ViewSource`) or ``"fork"``.

    Raises:
        ConfigError: ``options`` is not a :class:`LoaderOptions`.
    """

    def __init__(self, options: LoaderOptions) -> None:
        if not isinstance(options, LoaderOptions):
            raise ConfigError(f"DaliTrainLoader takes one LoaderOptions, got {type(options).__name__}")
        self.options = options
        store, sampler, render = options.store, options.sampler, options.render
        self.store, self.sampler, self.render = store, sampler, render
        self.start_step = int(options.start_step)
        self.source = ViewSource(str(Path(store.path)), sampler, options.image_root, self.start_step,
                                 lut_size=options.lut_size)
        self.targets = (TargetPrefetcher(store, sampler, options.prefetch, device=options.target_device)
                        if options.read_targets else None)
        self._pipe = _build_pipeline(self.source, render, sampler.batch_size, max(1, options.workers),
                                     options.threads, options.prefetch, options.start_method)

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
        pipe, self._pipe = self._pipe, None
        if pipe is not None:  # stop the executor, then join the worker processes (not left to the GC: a traceback
            pipe._shutdown()  # being handled keeps the pipeline alive until the interpreter exits)
            pool = getattr(pipe, "_py_pool", None)
            if pool is not None:
                pool.close()


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
