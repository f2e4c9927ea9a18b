"""Cached teacher targets for the training loaders, read ahead of use.

:class:`TargetPrefetcher` reads micro-batch ``g``'s rows (in the batch's own order, so no sort and no scatter
back) from the feature store on one background thread, a few micro-batches ahead of the step that needs them:

- the stored bytes land in one staging buffer pair (tokens (B, T, D) int8/float16, scales (B, T) float16) that is
  reused every step: after the first step no memory is allocated or page-faulted for the raw read (about 3x
  faster than fresh arrays per batch here, see ``benchmarks/bench_store.py``);
- on CUDA the staging buffers are pinned, copied to the device asynchronously and dequantized there; an event
  guards the buffers until that copy is done. On CPU one numpy multiply dequantizes into the step's new
  float32 tensor, after which the buffers are free again.

Both the DALI loader (:mod:`morphcache.train.loader`) and the torch fallback (:mod:`morphcache.train.torch_loader`)
use it, so their targets are identical.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from morphcache.train.sampler import EpochSampler

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TargetPrefetcher:
    """Dequantized targets (B, T, D) float32 of micro-batches, read ``depth`` steps ahead on one thread.

    Args:
        store: an open ``FeatureStore``; sampler: the run's :class:`EpochSampler` (which micro-batch ``get`` asks
            for decides what is read).
        depth: micro-batches read ahead of the current one; device: where targets are dequantized and returned
            (None: CPU).
    """

    def __init__(self, store, sampler: EpochSampler, depth: int = 2, device: str | None = None):
        self.store, self.sampler = store, sampler
        self.device = None if device in (None, "cpu") else device
        self.depth = max(1, int(depth))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="targets")
        self._pending: dict[int, Future] = {}
        self._stage: tuple["torch.Tensor", "torch.Tensor | None"] | None = None
        self._copied = None  # CUDA event: the last device copy out of the staging buffers has finished

    def _staging(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Numpy views of the staging buffers for ``n`` rows (allocated once per batch size)."""
        import torch

        spec = self.store.spec
        if self._stage is None or self._stage[0].shape[0] != n:
            pin = self.device is not None and str(self.device).startswith("cuda")
            q_dtype = torch.int8 if spec.dtype == "int8" else torch.float16
            q = torch.empty((n, spec.n_tokens, spec.dim), dtype=q_dtype, pin_memory=pin)
            s = torch.empty((n, spec.n_tokens), dtype=torch.float16, pin_memory=pin) if spec.dtype == "int8" else None
            self._stage = (q, s)
        q, s = self._stage
        return q.numpy(), (s.numpy() if s is not None else None)

    def read(self, rows: np.ndarray) -> "torch.Tensor":
        """Targets (B, T, D) float32 of ``rows`` (B,) in that order (runs on the prefetch thread)."""
        import torch

        from morphcache.store.quantize import dequantize_to

        rows = np.asarray(rows, dtype=np.int64)
        if self._copied is not None:
            self._copied.synchronize()
        targets = dequantize_to(*self.store.read_raw(rows, out=self._staging(rows.size)), self.device)
        if str(self.device).startswith("cuda"):  # the copies out of the staging buffers are queued before this
            self._copied = torch.cuda.Event()
            self._copied.record()
        return targets

    def _submit(self, step: int) -> None:
        self._pending[step] = self._pool.submit(self.read, self.sampler.batch_rows(step))

    def get(self, step: int, rows: np.ndarray) -> "torch.Tensor":
        """Targets of micro-batch ``step`` in the order of ``rows`` (which must be that batch's rows)."""
        for s in range(step, step + self.depth + 1):
            if s not in self._pending:
                self._submit(s)
        targets = self._pending.pop(step).result()
        if not np.array_equal(np.asarray(rows), self.sampler.batch_rows(step)):
            raise RuntimeError(f"loader out of step at micro-batch {step}: rendered rows differ from the sampler's")
        return targets

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pool.shutdown(wait=True)
