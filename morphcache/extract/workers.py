"""The decode / render stage of extraction: source files -> checked bytes -> views -> fixed-size pixel batches.

For one work chunk (images ``[a, b)`` of the store) :func:`load_chunk` reads every file, checks its bytes against
the manifest's content hash, canonicalizes them (:func:`~morphcache.extract.images.canonicalize_bytes`, the one
place shared with training) and samples the ``V`` views of every good image. :class:`BatchRenderer` then renders
the chunk's good rows in batches of exactly ``batch_size`` (the last one padded by repeating its final row), so
the teacher always sees the same batch shape: CPU matmuls can round differently for other batch sizes, and a
fixed shape makes a chunk's tokens independent of where a run started or resumed.

:class:`RenderStage` runs both on a background thread and feeds a bounded queue, overlapping the teacher.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphcache.errors import BadImageError, MorphcacheError


@dataclass
class ChunkPlan:
    """What the render stage decided for one chunk.

    ``views`` float32 (rows, P) (zeros for skipped images); ``status`` uint8 (images,); ``render_rows`` int64
    (n,) chunk-local row ids to render, in order; ``bad`` lists ``(path, reason code)`` of skipped images;
    ``paths`` the chunk's image paths (relative to the dataset root).
    """

    chunk: int
    row_start: int
    image_start: int
    views: np.ndarray
    status: np.ndarray
    render_rows: np.ndarray
    bad: list[tuple[str, int]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return int(self.views.shape[0])


@dataclass(frozen=True)
class ChunkStarted:
    """Event: rendering of chunk ``chunk`` began; the consumer allocates ``n_rows`` rows of outputs."""

    chunk: int
    n_rows: int


@dataclass(frozen=True)
class BatchRendered:
    """Event: ``images`` float32 (B, 3, S, S), normalized, of chunk ``chunk``; only the first ``len(rows)`` are real
    (the rest pad). ``rows`` are chunk-local row ids, ``index`` the batch's position in the chunk."""

    chunk: int
    index: int
    rows: np.ndarray
    images: object


@dataclass(frozen=True)
class ChunkFinished:
    """Event: every batch of the chunk was handed over; ``plan`` is final (status, views and ``bad`` include late
    render failures) and is no longer touched by the render thread."""

    plan: ChunkPlan

class ChunkSource:
    """Reads one chunk's images and samples their views (no rendering).

    Args:
        root: dataset root; ``images.path`` entries are relative to it.
        images: the store's :class:`~morphcache.store.image_table.ImageTable`.
        sampler: a :class:`~morphcache.extract.views.ViewSampler` (seeded, counter-based).
        views_per_image: V.
        chunk_images: images per work chunk.
        on_bad_image: ``"skip"`` records the reason and goes on; ``"fail"`` raises :class:`BadImageError`.
        check_hash: compare each file's bytes with the manifest hash (a changed file would corrupt the store).
    """

    def __init__(self, root: str | os.PathLike, images, sampler, views_per_image: int, chunk_images: int,
                 on_bad_image: str = "skip", check_hash: bool = True) -> None:
        if on_bad_image not in ("skip", "fail"):
            raise MorphcacheError(f"--on-bad-image {on_bad_image!r}: use 'skip' or 'fail'")
        self.root = Path(root)
        self.images = images
        self.sampler = sampler
        self.V = int(views_per_image)
        self.chunk_images = int(chunk_images)
        self.on_bad_image = on_bad_image
        self.check_hash = check_hash
        self._stored = None

    def load_one(self, i: int) -> tuple[bytes, tuple[int, int]]:
        """Canonical bytes and (h, w) of image ``i`` (loose file or tar member); raises BadImageError /
        MorphcacheError."""
        from morphcache.extract.stored_images import StoredImages

        if self._stored is None:
            self._stored = StoredImages(self.root, self.images)
        return self._stored.load(i, check_hash=self.check_hash)

    def load_chunk(self, c: int) -> tuple[ChunkPlan, list[bytes]]:
        """The plan of chunk ``c`` and the encoded bytes of its good images (one entry per good image)."""
        from morphcache.store.image_table import STATUS_OK

        n_images = len(self.images)
        a, b = c * self.chunk_images, min((c + 1) * self.chunk_images, n_images)
        V = self.V
        status = np.full(b - a, STATUS_OK, dtype=np.uint8)
        encoded: list[bytes] = []
        heights = np.zeros(b - a, dtype=np.int64)
        widths = np.zeros(b - a, dtype=np.int64)
        bad: list[tuple[str, int]] = []
        for k, i in enumerate(range(a, b)):
            try:
                data, (heights[k], widths[k]) = self.load_one(i)
            except BadImageError as err:
                if self.on_bad_image == "fail":
                    raise
                status[k] = int(getattr(err, "reason", 1))
                bad.append((str(self.images.path[i]), int(status[k])))
                continue
            encoded.append(data)
        # bad images keep size 0 -> all-zero view rows
        views = self.sampler.sample_rows(np.arange(a, b), heights, widths, V).astype(np.float32)
        render_rows = [k * V + v for k in np.flatnonzero(status == STATUS_OK).tolist() for v in range(V)]
        rows = np.asarray(render_rows, dtype=np.int64)
        plan = ChunkPlan(chunk=c, row_start=a * V, image_start=a, views=views, status=status, render_rows=rows,
                         bad=bad, paths=[str(p) for p in self.images.path[a:b]])
        return plan, encoded


class BatchRenderer:
    """Renders a chunk's good rows in fixed-size batches through the DALI renderer.

    Args:
        renderer: a :class:`~morphcache.extract.render_dali.DaliRenderer` with one output size and batch size B.
        batch_size: B; every rendered tensor is (B, 3, S, S).
    """

    def __init__(self, renderer, batch_size: int) -> None:
        self.renderer = renderer
        self.batch_size = int(batch_size)

    def batches(self, plan: ChunkPlan, encoded: list[bytes]) -> Iterator[BatchRendered]:
        """Yield the chunk's :class:`BatchRendered` events in row order.

        An image that DALI cannot render (after :mod:`images` accepted it) is marked corrupt in ``plan``
        (status, zero view rows, ``bad``), its rows leave the render list and rendering goes on; rows of it already
        yielded are zeroed by the consumer at the end of the chunk (its status is no longer ok).
        """
        from morphcache.store.image_table import STATUS_CORRUPT, STATUS_OK

        B, V = self.batch_size, max(1, plan.n_rows // max(1, len(plan.status)))
        good = np.flatnonzero(plan.status == STATUS_OK)
        slot = {int(k): j for j, k in enumerate(good)}  # chunk image -> index into encoded
        rows_left = [int(r) for r in plan.render_rows]
        pos = index = 0
        while pos < len(rows_left):
            rows = np.asarray(rows_left[pos:pos + B], dtype=np.int64)
            padded = np.concatenate([rows, np.repeat(rows[-1:], B - len(rows))]) if len(rows) < B else rows
            enc = [encoded[slot[int(r) // V]] for r in padded]
            params = np.ascontiguousarray(plan.views[padded], dtype=np.float32)
            try:
                images = self.renderer.render(enc, params)[0]
            except BadImageError as err:
                culprit = getattr(err, "index", -1)
                if culprit is None or culprit < 0:
                    raise
                k = int(padded[culprit]) // V
                plan.status[k] = int(getattr(err, "reason", STATUS_CORRUPT))
                plan.views[k * V:(k + 1) * V] = 0
                plan.bad.append((plan.paths[k] if plan.paths else str(k), int(plan.status[k])))
                rows_left = rows_left[:pos] + [r for r in rows_left[pos:] if r // V != k]
                continue
            yield BatchRendered(chunk=plan.chunk, index=index, rows=rows, images=images)
            pos += len(rows)
            index += 1
        plan.render_rows = np.asarray([r for r in rows_left if plan.status[r // V] == STATUS_OK], dtype=np.int64)


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_DONE = object()  # end of the stream (internal to RenderStage)


class RenderStage:
    """Background thread: for each chunk, load + render, push batches to a bounded queue.

    Iterating yields, per chunk, a :class:`ChunkStarted`, then its :class:`BatchRendered` events, then a
    :class:`ChunkFinished` carrying the final plan (status and views include late render failures; the render
    thread does not touch it afterwards). An error on the thread is re-raised in the consumer; :meth:`stop` ends
    the thread early.
    """

    def __init__(self, source: ChunkSource, renderer: BatchRenderer, chunks: Iterable[int],
                 max_batches: int = 4) -> None:
        self.source = source
        self.renderer = renderer
        self.chunks = list(chunks)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_batches))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="morphcache-render", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for c in self.chunks:
                plan, encoded = self.source.load_chunk(c)
                if not self._put(ChunkStarted(chunk=plan.chunk, n_rows=plan.n_rows)):
                    return
                for batch in self.renderer.batches(plan, encoded):
                    if not self._put(batch):
                        return
                if not self._put(ChunkFinished(plan=plan)):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer
            self._put(_Failed(exc))

    def __iter__(self) -> Iterator[ChunkStarted | BatchRendered | ChunkFinished]:
        self._thread.start()
        try:
            while True:
                event = self._queue.get()
                if event is _DONE:
                    return
                if isinstance(event, _Failed):
                    raise event.error
                yield event
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
