"""The asynchronous chunk writer: quantizes and writes finished chunks on a thread while the teacher runs on.

The teacher thread hands over whole chunks (:meth:`AsyncWriter.submit`); a single writer thread calls
:meth:`FeatureStore.write_chunk` (quantize, data, status, checksum, then ``progress[c] = 1``) in submission order.
The queue is bounded, so a slow disk applies back-pressure instead of piling chunks up in memory.

Failure handling: an error on the writer thread is re-raised in the submitting thread at the next
:meth:`submit` or at :meth:`close`. Leaving the ``with`` block because of an error elsewhere (a bad image under
``--on-bad-image fail``, Ctrl-C) still finishes every chunk already submitted, so completed work is never lost.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class ChunkResult:
    """One finished work chunk, ready to be written.

    Shapes: ``tokens`` float32 (rows, T, D); ``pooled`` float32 (rows, Dp); ``views`` float32 (rows, P);
    ``status`` uint8 (images,). Rows of skipped images are zero.
    """

    chunk: int
    tokens: np.ndarray
    pooled: np.ndarray
    views: np.ndarray
    status: np.ndarray
    n_views: int = 0


_STOP = object()


class AsyncWriter:
    """Writes :class:`ChunkResult` objects to a store on one background thread.

    Args:
        store: an open :class:`~morphcache.store.feature_store.FeatureStore` in mode ``"a"``.
        max_pending: chunks that may wait in the queue before :meth:`submit` blocks.
        on_written: optional callback ``f(result, checksum)`` run on the writer thread after each chunk.
    """

    def __init__(self, store, max_pending: int = 2, on_written: Callable[[ChunkResult, int], None] | None = None):
        self.store = store
        self.on_written = on_written
        self.written: list[int] = []
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(max_pending)))
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="morphcache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is not None:
                    continue  # drain without writing after a failure
                checksum = self.store.write_chunk(item.chunk, item.tokens, item.pooled, item.views, item.status)
                self.written.append(item.chunk)
                if self.on_written is not None:
                    self.on_written(item, checksum)
            except BaseException as exc:  # re-raised in the submitting thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, result: ChunkResult) -> None:
        """Queue a finished chunk (blocks while ``max_pending`` chunks are waiting); raises a writer error."""
        if self._closed:
            raise RuntimeError("AsyncWriter is closed")
        self._raise_pending_error()
        while True:
            try:
                self._queue.put(result, timeout=0.5)
                return
            except queue.Full:
                self._raise_pending_error()
                if not self._thread.is_alive():
                    raise RuntimeError("the writer thread died") from None

    def close(self) -> list[int]:
        """Write everything still queued, stop the thread; returns the chunks written. Raises a writer error."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return list(self.written)

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Another error is propagating: still finish the submitted chunks, but let that error win.
        with contextlib.suppress(BaseException):
            self.close()
