"""Byte-level reads of zarr v3 ``sharding_indexed`` shard files (index at the end), for :mod:`shard_reader`.

A shard file holds ``n_inner`` inner chunks of ``I`` rows as byte ranges, followed by the index: per inner chunk a
little-endian uint64 offset and length (all ones when the chunk was never written or equals the fill value), then
the index's crc32c. :class:`ShardFileIO` checks the index and reads wanted rows with one ``pread``/``preadv`` per
run of inner chunks adjacent on disk, decoding blosc when the array uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from morphcache.errors import StoreError

EMPTY = np.uint64(2**64 - 1)


class ShardFileIO:
    """Mixin for :class:`~morphcache.store.shard_reader.ShardRowReader`; uses its layout attributes
    (``n_inner``, ``inner_rows``, ``inner_nbytes``, ``row_shape``, ``dtype``, ``fill``, ``blosc``, ``max_gap``)
    and ``shard_file(s)``."""

    def _load_index(self, fd: int, path: Path) -> np.ndarray:
        import google_crc32c

        nbytes = self.n_inner * 16
        size = os.fstat(fd).st_size
        if size < nbytes + 4:
            raise StoreError(f"{path}: shard file is truncated ({size} bytes); run `morphcache store verify`")
        raw = os.pread(fd, nbytes + 4, size - nbytes - 4)
        if google_crc32c.value(raw[:nbytes]) != int.from_bytes(raw[nbytes:], "little"):
            raise StoreError(f"{path}: shard index checksum mismatch, the store is damaged; run `morphcache store verify`")
        return np.frombuffer(raw[:nbytes], dtype="<u8").reshape(self.n_inner, 2)

    def _read_shard(self, fd: int, index: np.ndarray, local: np.ndarray, out: np.ndarray, s: int) -> None:
        """Rows ``local`` (sorted, unique positions within shard ``s``) -> ``out`` (len(local), *row_shape)."""
        I, nb = self.inner_rows, self.inner_nbytes
        ids = local // I
        uniq = np.unique(ids)
        off, ln = index[uniq, 0], index[uniq, 1]
        empty = off == EMPTY
        # Runs of inner chunks that are adjacent both in the grid and on disk are fetched with one pread.
        brk = np.ones(uniq.size, dtype=bool)
        # Small gaps are read through (e.g. a whole scales shard in one pread instead of one per row).
        gap = off[1:].astype(np.int64) - (off[:-1] + ln[:-1]).astype(np.int64)
        brk[1:] = (gap < 0) | (gap > self.max_gap) | empty[1:] | empty[:-1]
        starts = np.flatnonzero(brk)
        ends = np.concatenate([starts[1:], [uniq.size]])
        los = np.searchsorted(ids, uniq[starts], "left").tolist()
        his = np.searchsorted(ids, uniq[ends - 1], "right").tolist()
        for a, b, lo, hi in zip(starts.tolist(), ends.tolist(), los, his):
            if empty[a]:
                out[lo:hi] = self.fill
                continue
            total = int(off[b - 1] + ln[b - 1] - off[a])
            n = b - a
            if not self.blosc and hi - lo == n * I and total == n * nb:
                # The wanted rows are exactly this run: read the bytes straight into their place.
                target = out[lo:hi]
                if os.preadv(fd, [memoryview(target).cast("B")], int(off[a])) != target.nbytes:
                    raise StoreError(f"{self.shard_file(s)}: shard file is truncated; run `morphcache store verify`")
                continue
            buf = os.pread(fd, total, int(off[a]))
            if len(buf) != total:
                raise StoreError(f"{self.shard_file(s)}: shard file is truncated; run `morphcache store verify`")
            if self.blosc:
                import numcodecs.blosc as blosc

                block = np.empty((n * I,) + self.row_shape, dtype=self.dtype)
                flat = block.reshape(n, -1).view(np.uint8)
                rel = (off[a:b] - off[a]).astype(np.int64).tolist()
                for k, length in enumerate(ln[a:b].astype(np.int64).tolist()):
                    try:
                        blosc.decompress(memoryview(buf)[rel[k]:rel[k] + length], flat[k])
                    except Exception as exc:
                        raise StoreError(f"{self.shard_file(s)}: undecodable inner chunk ({exc}); run `morphcache store verify`") from None
            else:
                if np.any(ln[a:b] != nb):
                    raise StoreError(f"{self.shard_file(s)}: inner chunk size differs from {nb} bytes; the store is damaged")
                rel = (off[a:b] - off[a]).astype(np.int64)
                raw = np.frombuffer(buf, dtype=np.uint8)
                if total != n * nb:
                    raw = raw[rel[:, None] + np.arange(nb)[None, :]]
                block = raw.view(self.dtype).reshape((n * I,) + self.row_shape)
            which = np.searchsorted(uniq[a:b], ids[lo:hi]) * I + local[lo:hi] % I
            out[lo:hi] = block[which]
