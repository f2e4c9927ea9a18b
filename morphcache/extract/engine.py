"""The extraction engine: one loaded teacher and renderer running the overlapped pipeline over store chunks.

Three stages overlap through bounded queues: a render thread (file reads, canonical bytes, view sampling, rendering
in fixed-size batches; :mod:`morphcache.extract.workers`), the teacher forward on the calling thread
(``torch.no_grad``; bf16 autocast on CPU, fp16/bf16 on GPU), and the writer thread (quantize + zarr writes;
:mod:`morphcache.extract.writer`). The render thread hands over typed events (:class:`~morphcache.extract.workers.
ChunkStarted`, :class:`~morphcache.extract.workers.BatchRendered`, :class:`~morphcache.extract.workers.
ChunkFinished`); a chunk's plan is handed over only once it is final.

Both drivers use this module: the local run (:mod:`morphcache.extract.pipeline`) and the dask tasks
(:mod:`morphcache.extract.distributed`); neither imports the other's internals.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from morphcache.errors import ConfigError
from morphcache.extract.renderers import build_teacher_renderer, renderer_placement
from morphcache.extract.workers import (BatchRendered, BatchRenderer, ChunkFinished, ChunkSource, ChunkStarted,
                                        RenderStage)
from morphcache.extract.writer import AsyncWriter, ChunkResult


@dataclass
class RunStats:
    """What one process (or one dask task) did: chunks written, views through the teacher, skipped images.

    ``seconds``: wall time of the whole command (teacher load, manifest, store set-up included);
    ``pipeline_seconds``: time spent in the overlapped chunk pipeline only (steady-state throughput).
    """

    chunks: list[int] = field(default_factory=list)
    views: int = 0
    bad: list[tuple[str, int]] = field(default_factory=list)
    seconds: float = 0.0
    pipeline_seconds: float = 0.0

    def merge(self, other: RunStats) -> None:
        self.chunks += other.chunks
        self.views += other.views
        self.bad += other.bad


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def load_teacher_by_name(teacher: str, image_size: int | None = None, projected: bool = False, device: str = "cpu",
                         precision: str = "fp32"):
    """Parse a ``--teacher`` string (``kind:name[@weights]``) and load that teacher's weights onto ``device``
    (random weights are seeded by the registry).

    Raises:
        ConfigError: an unknown teacher kind or name, a bad precision, weights that do not fit.
    """
    from morphcache.extract.teachers import load_teacher, parse_teacher_name

    kwargs = parse_teacher_name(teacher)
    return load_teacher(**kwargs, image_size=image_size, projected=projected, device=device, precision=precision)


def load_store_teacher(spec, device: str = "cpu", precision: str | None = None, weights: str | None = None):
    """Load the teacher a store recorded in its :class:`TeacherSpec` (same seeded init for random weights), in
    ``precision`` or else the one the store recorded (fp32 when it recorded none). ``weights``: where the
    recorded weights file lives now (checked against the recorded sha256).

    Raises:
        ConfigError: ``weights`` given for a teacher with no recorded hash, recorded weights no longer at their
            path, or weights whose sha256 differs from the recorded one.
    """
    from morphcache.extract.teachers import load_teacher_from_spec

    if weights is not None:
        if not spec.weights_sha256:
            raise ConfigError(f"--teacher-weights {weights}: the store's teacher recorded no weights hash "
                              f"({spec.kind}:{spec.name}, pretrained={spec.pretrained}), so other weights cannot be "
                              "checked; drop --teacher-weights")
        spec = spec.model_copy(update={"pretrained": str(weights)})
    elif spec.kind in ("timm", "open_clip") and spec.weights_sha256 and spec.pretrained and not os.path.exists(spec.pretrained):
        raise ConfigError(f"{spec.pretrained}: the store's teacher weights are no longer at their recorded path; pass "
                          "--teacher-weights PATH (checked against the recorded sha256)")
    return load_teacher_from_spec(spec, device=device, precision=precision or spec.precision or "fp32")


class HostCopies:
    """Moves teacher outputs into a chunk's host arrays without stalling a GPU teacher.

    On CUDA each batch's tokens (B, T, D) and pooled (B, Dp) float32 are copied on a side stream into one of two
    pinned buffer pairs (asynchronously, after the forward's kernels) and written into the chunk's arrays one batch
    later, while the next forward runs; :meth:`flush` finishes the last one (call it before the chunk is used). On
    CPU the copy is immediate. The values are the same either way (a float32 copy).
    """

    def __init__(self, device) -> None:
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self._stream = torch.cuda.Stream(device=torch.device(device)) if self.cuda else None
        self._slots: list = [None, None]
        self._next = 0
        self._pending = None

    def _slot(self, tok, pool):
        import torch

        k, self._next = self._next, 1 - self._next
        slot = self._slots[k]
        if slot is None or slot[0].shape != tok.shape or slot[1].shape != pool.shape:
            slot = self._slots[k] = (torch.empty(tok.shape, dtype=torch.float32, pin_memory=True),
                                     torch.empty(pool.shape, dtype=torch.float32, pin_memory=True))
        return slot

    def put(self, tok, pool, n: int, tokens: np.ndarray, pooled: np.ndarray, rows) -> None:
        """Write the first ``n`` rows of ``tok`` / ``pool`` into ``tokens[rows]`` / ``pooled[rows]`` (on CUDA: by
        the next :meth:`put` or :meth:`flush`)."""
        if not self.cuda:
            tokens[rows] = tok[:n].cpu().numpy()
            pooled[rows] = pool[:n].cpu().numpy()
            return
        import torch

        slot = self._slot(tok, pool)
        ready = torch.cuda.Event()
        ready.record()  # after the forward's kernels on the current stream
        self._stream.wait_event(ready)
        with torch.cuda.stream(self._stream):
            slot[0].copy_(tok, non_blocking=True)
            slot[1].copy_(pool, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        tok.record_stream(self._stream)  # the allocator must not reuse their memory before the copy ran
        pool.record_stream(self._stream)
        self.flush()
        self._pending = (copied, slot, n, tokens, pooled, rows)

    def flush(self) -> None:
        if self._pending is None:
            return
        copied, slot, n, tokens, pooled, rows = self._pending
        self._pending = None
        copied.synchronize()
        tokens[rows] = slot[0][:n].numpy()
        pooled[rows] = slot[1][:n].numpy()


class ChunkExtractor:
    """Runs the overlapped pipeline over chunks of one store with one loaded teacher and renderer.

    Args:
        teacher: a loaded :class:`~morphcache.extract.teachers.Teacher`; its spec must equal the store's.
        batch_size: B, the fixed teacher batch.
        workers: render CPU threads; renderer: one of :data:`RENDERERS` (placed on the teacher's device).
    """

    def __init__(self, teacher, batch_size: int, workers: int = 1, renderer: str = "dali") -> None:
        renderer_placement(renderer)
        self.teacher = teacher
        self.batch_size = int(batch_size)
        self.workers = int(workers)
        self.renderer_name = renderer
        self._renderer: BatchRenderer | None = None
        self._renderer_key = None

    def renderer(self, spec) -> BatchRenderer:
        key = (spec.teacher.image_size, spec.teacher.mean, spec.teacher.std, spec.augment.interpolation)
        if self._renderer is None or self._renderer_key != key:
            self._renderer = BatchRenderer(build_teacher_renderer(spec.teacher, spec.augment, self.batch_size, self.workers,
                                                         self.renderer_name, str(self.teacher.device)),
                                           self.batch_size)
            self._renderer_key = key
        return self._renderer

    def run(self, store, chunks, images=None, on_bad_image: str = "skip", bar=None) -> RunStats:
        """Extract ``chunks`` of ``store`` (opened ``"a"``); returns :class:`RunStats` for this call."""
        from morphcache.extract.views import ViewSampler

        spec = store.spec
        diff = spec.teacher.differences(self.teacher.spec)
        if diff:
            raise ConfigError(f"{store.path}: the loaded teacher differs from the store's ({', '.join(diff)})")
        images = store.image_table() if images is None else images
        source = ChunkSource(spec.dataset_root, images, ViewSampler(spec.augment, spec.seed),
                             spec.views_per_image, spec.chunk_images, on_bad_image=on_bad_image)
        stats = RunStats()
        t0 = time.perf_counter()
        T, D, Dp = spec.n_tokens, spec.dim, spec.teacher.pooled_dim
        stage = RenderStage(source, self.renderer(spec), chunks)
        copies = HostCopies(self.teacher.device)
        with AsyncWriter(store, max_pending=2) as writer:
            tokens = pooled = None
            for event in stage:
                if isinstance(event, ChunkStarted):
                    tokens = np.zeros((event.n_rows, T, D), dtype=np.float32)
                    pooled = np.zeros((event.n_rows, Dp), dtype=np.float32)
                elif isinstance(event, BatchRendered):
                    n = len(event.rows)
                    tok, pool = self.teacher.forward_tokens(event.images)  # (B, T, D), (B, Dp)
                    copies.put(tok, pool, n, tokens, pooled, event.rows)
                    stats.views += n
                    if bar is not None:
                        bar.advance(n)
                elif isinstance(event, ChunkFinished):
                    copies.flush()
                    plan = event.plan
                    bad_rows = np.repeat(plan.status != 0, spec.views_per_image)
                    tokens[bad_rows] = 0
                    pooled[bad_rows] = 0
                    if bar is not None and bad_rows.any():
                        bar.advance(int(bad_rows.sum()))  # skipped images' rows: keeps the ETA honest
                    writer.submit(ChunkResult(plan.chunk, tokens, pooled, plan.views, plan.status,
                                              n_views=len(plan.render_rows)))
                    stats.chunks.append(plan.chunk)
                    stats.bad.extend(plan.bad)
                    tokens = pooled = None
            writer.close()
        stats.seconds = stats.pipeline_seconds = time.perf_counter() - t0
        return stats
