"""Every read path of the store's row reader passes the row-reader contract
(morphcache.testing.contracts.RowReaderContract): the same rows as plain zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from morphcache.store.feature_store import FeatureStore
from morphcache.testing.contracts import RowReaderContract


def _store_reads(path: Path, mode: str = "r", tune=None):
    store = FeatureStore.open(path, mode)
    if tune is not None:
        tune(store)
    return store.read_raw


class TestMemoryMappedGather(RowReaderContract):
    """Read-only handle, complete uncompressed shards: memory-mapped, one numpy gather per shard (small rows)."""

    def open_reader(self, path):
        read = _store_reads(path)
        assert read.__self__._reader("tokens") is not None
        return read


class TestMemoryMappedRowCopies(RowReaderContract):
    """Memory-mapped shards copied one row at a time on two threads (the path for large rows and batches)."""

    def open_reader(self, path):
        def tune(store):
            for name in ("tokens", "scales"):
                reader = store._reader(name)
                reader.per_row_copy_min_bytes = reader.parallel_min_bytes = 0
                reader.threads = 2

        return _store_reads(path, tune=tune)


class TestPreadvInnerChunks(RowReaderContract):
    """Append-mode handle (no shard is cached or memory-mapped), two rows per inner chunk: one preadv per run of
    adjacent rows."""

    inner = 2

    def open_reader(self, path):
        return _store_reads(path, "a")


class TestBloscShards(RowReaderContract):
    """zstd-compressed inner chunks, decoded by the reader."""

    compression = "zstd"

    def open_reader(self, path):
        return _store_reads(path)


class TestPartialStore(RowReaderContract):
    """The last chunk never written: its shard file is absent and its rows are the fill value."""

    complete = False

    def open_reader(self, path):
        return _store_reads(path)


class TestShardReaderDirect(RowReaderContract):
    """ShardRowReader itself: ``gather`` for any order, ``read`` for sorted unique rows (both must agree)."""

    def open_reader(self, path):
        from morphcache.store.shard_reader import ShardRowReader

        tokens, scales = ShardRowReader.for_array(path / "tokens"), ShardRowReader.for_array(path / "scales")

        def read(rows):
            q, s = tokens.gather(rows), scales.gather(rows)
            uniq, inverse = np.unique(rows, return_inverse=True)
            np.testing.assert_array_equal(tokens.read(uniq)[inverse.reshape(-1)], q)
            return q, s

        return read


class TestPlainZarrFallback(RowReaderContract):
    """A tokens array rewritten without sharding (as a rechunking tool might leave it): the reader refuses the
    layout, logs one warning, and FeatureStore reads those rows through zarr."""

    fallback = True

    def make_store_dir(self, path):
        import zarr

        super().make_store_dir(path)
        group = zarr.open_group(str(path), mode="r+")
        old = group["tokens"]
        data, attrs = np.asarray(old[:]), dict(old.attrs)
        new = group.create_array("tokens", shape=data.shape, dtype=data.dtype, chunks=(3,) + data.shape[1:],
                                 fill_value=0, overwrite=True)
        new[:] = data
        new.attrs.update(attrs)
        return path

    def open_reader(self, path):
        read = _store_reads(path)
        read(np.array([0]))  # first read: the reader is looked up (and refused) once per handle
        assert read.__self__._reader("tokens") is None and read.__self__._reader("scales") is not None
        return read
