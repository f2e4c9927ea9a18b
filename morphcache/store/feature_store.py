"""The feature store: a zarr v3 group of teacher tokens, one row per augmented view.

The layout is the current schema (``morphcache.schemas.SCHEMA_VERSION``); older stores are migrated on open.

Row ``r`` is view ``r % V`` of image ``r // V``. Arrays (see README "Store format"):

=================  ==========  ========  =========================================================
array              shape       dtype     notes
=================  ==========  ========  =========================================================
``tokens``         (R, T, D)   int8/f16  patch tokens, no CLS; one shard per work chunk, 1 row per inner chunk
``scales``         (R, T)      float16   per-token absmax scale (int8 stores only), sharded like tokens
``pooled``         (R, Dp)     float16   teacher pooled / CLS embedding
``views``          (R, P)      float32   ViewParams rows (columns ``VIEW_FIELDS``)
``images/path``    (N,)        string    relative to ``spec.dataset_root``
``images/hash``    (N,)        string    blake2b-128 of the source bytes
``images/size``    (N, 2)      int32     source height, width
``images/label``   (N,)        int32     -1 when unlabeled
``images/status``  (N,)        uint8     0 ok, 255 pending, other codes = skip reason
``progress``       (C,)        uint8     1 once chunk c is fully written (one file per chunk)
``checksums``      (C,)        uint64    blake2b-64 of chunk c's stored tokens, scales, pooled and views bytes
=================  ==========  ========  =========================================================

A work chunk ``c`` covers images ``[c*chunk_images, (c+1)*chunk_images)`` and their rows; a writer owns whole
chunks (shards, status chunks, one progress/checksum file each), so writers on disjoint chunks never touch the
same file. :meth:`FeatureStore.write_chunk` writes data, then the checksum, then ``progress[c] = 1``: a crash in
between leaves the chunk missing, and resume redoes it.

Reading rows: ``tokens``/``scales`` rows are read straight from the shard files by :class:`ShardRowReader`
(the zarr v3 sharding layout: inner-chunk byte ranges listed in an index at the end of each shard), one
``pread`` per run of adjacent rows, falling back to zarr for layouts it does not know. Plain zarr and dask read
the same arrays (tested). Readers opened with ``mode="r"`` keep up to ``open_shards`` file handles of complete
chunks with their parsed index (about 16 bytes per row each; no decoded data is cached).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from morphcache import __version__
from morphcache.errors import SpecMismatchError, StoreError, StoreNotFoundError
from morphcache.schemas import N_VIEW_PARAMS, StoreSpec, load_versioned
from morphcache.store.quantize import dequantize, dequantize_to
from morphcache.store.layout import COMPRESSIONS, check_arrays, create_arrays
from morphcache.store.shard_reader import ShardRowReader

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from morphcache.store.image_table import ImageTable

ATTR_KEY = "morphcache"
DATA_ARRAYS = ("tokens", "pooled", "views")  # see morphcache.store.lazy
IMAGE_ARRAYS = ("images/path", "images/hash", "images/size", "images/label", "images/status")


def chunk_checksum(tokens: np.ndarray, scales: np.ndarray | None, pooled: np.ndarray | None = None,
                   views: np.ndarray | None = None) -> int:
    """blake2b-64 over the stored bytes of one chunk (tokens, scales, pooled float16, views float32) as uint."""
    h = hashlib.blake2b(digest_size=8)
    for part in (tokens, scales, pooled, views):
        if part is not None:
            h.update(np.ascontiguousarray(part).tobytes())
    return int.from_bytes(h.digest(), "little")


class FeatureStore:
    """Open handle on a store. Use :meth:`create` or :meth:`open`, not the constructor. Picklable (reopens)."""

    def __init__(self, path: Path, group, spec: StoreSpec, mode: str) -> None:
        self.path = path
        self.group = group
        self.spec = spec
        self.mode = mode
        self._arrays: dict[str, object] = {}
        self._readers: dict[str, ShardRowReader | None] = {}
        # Complete chunks are immutable, so a read-only handle may keep their shard files open.
        self._immutable = self.progress().astype(bool) if mode == "r" else np.zeros(spec.n_chunks, dtype=bool)

    def __reduce__(self):
        return (FeatureStore.open, (str(self.path), self.mode))

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(
        cls, path: str | os.PathLike, spec: StoreSpec, images: "ImageTable", rows_per_inner_chunk: int = 1,
        compression: str = "none",
    ) -> "FeatureStore":
        """Create a store for ``spec`` and write the image table; an identical existing store is opened instead.

        ``compression`` (``none`` or ``zstd`` = blosc/zstd level 1) applies inside token and scale shards.
        An existing store with a different spec identity raises :class:`SpecMismatchError` naming the differing
        fields; nothing is modified.

        Raises:
            SpecMismatchError: ``path`` holds a store whose spec differs from ``spec`` (the differing fields named).
            StoreError: an unknown ``compression``, an image table whose length is not ``spec.n_images``, a
                ``rows_per_inner_chunk`` that does not divide the chunk rows, ``path`` an existing non-empty
                folder or file that is not a zarr store, or an existing store :meth:`open` refuses.
        """
        import zarr

        path = Path(path)
        if compression not in COMPRESSIONS:
            raise StoreError(f"{path}: unknown compression {compression!r}; use one of {', '.join(COMPRESSIONS)}")
        if len(images) != spec.n_images:
            raise StoreError(f"{path}: spec says {spec.n_images} images but the image table has {len(images)}")
        if (path / "zarr.json").exists():
            existing = cls.open(path, mode="a")
            diff = existing.spec.diff(spec)
            if diff:
                raise SpecMismatchError(
                    f"{path}: existing store was made with a different spec ({', '.join(diff)} differ); "
                    "use another --out path or delete the store"
                )
            return existing
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreError(f"{path}: exists, is not empty and is not a zarr store; choose another path")
        spec = spec.model_copy(update={"package_version": __version__})
        root = zarr.open_group(str(path), mode="w-", zarr_format=3)
        rows = spec.chunk_rows
        inner = max(1, min(rows_per_inner_chunk, rows))
        if rows % inner:
            raise StoreError(f"{path}: rows_per_inner_chunk={inner} must divide chunk rows {rows}")
        create_arrays(root, spec, images, inner, compression)
        # The spec goes in last: a store without it is recognisably incomplete and is refused by open().
        root.attrs[ATTR_KEY] = json.loads(spec.model_dump_json())
        return cls(path, root, spec, "a")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "FeatureStore":
        """Open an existing store for reading (``"r"``) or appending (``"a"``); refuses anything else clearly.

        Opening never modifies the store. Errors are one-line :class:`StoreError` s naming the path.

        Raises:
            StoreNotFoundError: nothing at ``path`` (also a ``FileNotFoundError``).
            StoreError: not a zarr store, unreadable zarr metadata, no morphcache spec attribute (not made by
                morphcache, or its creation was interrupted), a spec of an unknown schema version or invalid
                fields, or arrays missing / of the wrong shape or dtype (a truncated or damaged store).
            ValueError: ``mode`` is not ``"r"`` or ``"a"`` (a programming error).
        """
        import zarr

        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not path.exists():
            raise StoreNotFoundError(f"{path}: no such store; run `morphcache extract --out {path}` first")
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a zarr store (no zarr.json); pass the directory extract wrote")
        try:
            group = zarr.open_group(str(path), mode="r" if mode == "r" else "r+", zarr_format=3)
        except Exception as exc:  # zarr raises several types for broken metadata
            raise StoreError(f"{path}: unreadable zarr metadata ({type(exc).__name__}: {exc})") from None
        raw = group.attrs.get(ATTR_KEY)
        if raw is None:
            raise StoreError(f"{path}: zarr group has no '{ATTR_KEY}' spec; it was not made by morphcache (or creation was interrupted: delete it and re-run)")
        spec = load_versioned(StoreSpec, dict(raw), source=str(path))
        check_arrays(path, group, spec)
        return cls(path, group, spec, mode)

    # ------------------------------------------------------------------ geometry
    def array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    @property
    def n_rows(self) -> int:
        return self.spec.n_rows

    @property
    def n_chunks(self) -> int:
        return self.spec.n_chunks

    @property
    def chunk_rows(self) -> int:
        return self.spec.chunk_rows

    def chunk_image_range(self, c: int) -> tuple[int, int]:
        self._check_chunk(c)
        ci = self.spec.chunk_images
        return c * ci, min((c + 1) * ci, self.spec.n_images)

    def chunk_row_range(self, c: int) -> tuple[int, int]:
        a, b = self.chunk_image_range(c)
        V = self.spec.views_per_image
        return a * V, b * V

    def _check_chunk(self, c: int) -> None:
        if isinstance(c, bool) or not (isinstance(c, (int, np.integer)) and 0 <= int(c) < self.n_chunks):
            raise StoreError(f"{self.path}: chunk {c!r} is outside the store (valid: 0..{self.n_chunks - 1})")

    # ------------------------------------------------------------------ writing
    def write_chunk(
        self, c: int, tokens: np.ndarray, pooled: np.ndarray, views: np.ndarray, status: np.ndarray
    ) -> int:
        """Write chunk ``c``: tokens (rows, T, D) float, pooled (rows, Dp), views (rows, P), status (images,).

        Order: data arrays, then status, then the checksum, then ``progress[c] = 1``. Returns the checksum.
        Rows of skipped images must already be zero in the inputs. Everything is validated before any write.

        Raises:
            StoreError: the store is open read-only, ``c`` is not a chunk index, an input has the wrong shape,
                or the tokens / pooled features are not finite (or overflow the store's dtype).
        """
        from morphcache.store.quantize import quantize

        if self.mode != "a":
            raise StoreError(f"{self.path}: opened read-only; open with mode='a' to write")
        a, b = self.chunk_row_range(c)
        ia, ib = self.chunk_image_range(c)
        n, T, D = b - a, self.spec.n_tokens, self.spec.dim
        shapes = {"tokens": (n, T, D), "pooled": (n, self.spec.teacher.pooled_dim), "views": (n, N_VIEW_PARAMS), "status": (ib - ia,)}
        for name, arr in (("tokens", tokens), ("pooled", pooled), ("views", views), ("status", status)):
            if tuple(np.shape(arr)) != shapes[name]:
                raise StoreError(f"{self.path}: chunk {c} {name} has shape {tuple(np.shape(arr))}, expected {shapes[name]}")
        tokens = np.asarray(tokens, dtype=np.float32)
        pooled16 = np.asarray(pooled, dtype=np.float16)
        views32 = np.asarray(views, dtype=np.float32)
        for name, arr in (("tokens", tokens), ("pooled", pooled16), ("views", views32)):
            if arr.size and not (np.isfinite(arr.max()) and np.isfinite(arr.min())):  # NaN/inf propagate
                raise StoreError(f"{self.path}: chunk {c} {name} contain NaN or inf (or overflow float16); the teacher diverged (try --precision fp32)")
        q, scales = quantize(tokens, self.spec.dtype)
        self.array("tokens")[a:b] = q
        if scales is not None:
            if not np.isfinite(scales).all():
                raise StoreError(f"{self.path}: chunk {c} tokens exceed the float16 scale range (|x| > 8e6); check the teacher output")
            self.array("scales")[a:b] = scales
        self.array("pooled")[a:b] = pooled16
        self.array("views")[a:b] = views32
        self.array("images/status")[ia:ib] = np.asarray(status, dtype=np.uint8)
        checksum = chunk_checksum(q, scales, pooled16, views32)
        self._mark_done(int(c), checksum)
        return checksum

    def _mark_done(self, c: int, checksum: int) -> None:
        """Checksum, then progress: the last two writes of a chunk (a crash before them leaves it missing)."""
        self.array("checksums")[c] = np.uint64(checksum)
        self.array("progress")[c] = 1

    # ------------------------------------------------------------------ progress
    def progress(self) -> np.ndarray:
        """(C,) uint8, 1 where the chunk is complete."""
        return np.asarray(self.array("progress")[:])

    def missing_chunks(self) -> list[int]:
        return [int(c) for c in np.flatnonzero(self.progress() != 1)]

    def is_complete(self) -> bool:
        return not self.missing_chunks()

    # ------------------------------------------------------------------ reading
    def _rows(self, rows) -> tuple[np.ndarray | slice, int]:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.n_rows)
            if step == 1:
                return slice(start, max(start, stop)), max(0, stop - start)
            rows = np.arange(start, stop, step)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise StoreError(f"{self.path}: row ids must lie in 0..{self.n_rows - 1}, got {rows.min()}..{rows.max()}")
        if rows.size and np.all(np.diff(rows) == 1):
            return slice(int(rows[0]), int(rows[-1]) + 1), rows.size
        return rows, rows.size

    def _reader(self, name: str) -> ShardRowReader | None:
        if name not in self._readers:
            self._readers[name] = ShardRowReader.for_array(self.path / name)
        return self._readers[name]

    def _read(self, name: str, sel, out: np.ndarray | None = None) -> np.ndarray:
        """Stored rows of array ``name`` for a slice or an id array (any order, repeats allowed), written into
        ``out`` when given (tokens and scales only)."""
        arr = self.array(name)
        reader = self._reader(name) if name in ("tokens", "scales") else None
        if reader is not None:
            if isinstance(sel, slice):
                return reader.read(np.arange(sel.start, sel.stop, dtype=np.int64), self._cacheable, out=out)
            return reader.gather(sel, self._cacheable, out)
        if isinstance(sel, slice):
            data = np.asarray(arr[sel])
        elif sel.size == 0:
            data = np.zeros((0,) + tuple(arr.shape[1:]), dtype=arr.dtype)
        else:
            uniq, pos = np.unique(sel, return_inverse=True)
            data = np.take(np.asarray(arr.get_orthogonal_selection((uniq,))), pos.reshape(-1), axis=0)
        if out is not None:
            if out.shape != data.shape or out.dtype != data.dtype:
                raise ValueError(f"{self.path / name}: output buffer must be {data.dtype} {data.shape}, got {out.dtype} {out.shape}")
            out[...] = data
            return out
        return data

    def _cacheable(self, shard: int) -> bool:
        return bool(shard < self._immutable.size and self._immutable[shard])

    def read_tokens_numpy(self, rows) -> np.ndarray:
        """Dequantized tokens (B, T, D) float32 for ``rows`` (slice or ids, any order, repeats allowed)."""
        q, scales = self.read_raw(rows)
        return dequantize(q, scales)

    def read_tokens(self, rows, device: str | None = None) -> "torch.Tensor":
        """Dequantized tokens (B, T, D) float32 torch tensor; dequantization runs on ``device`` when given."""
        return dequantize_to(*self.read_raw(rows), device)

    def read_raw(self, rows, out: tuple[np.ndarray, np.ndarray | None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored tokens (B, T, D) int8/float16 and scales (B, T) or None, without dequantizing.

        ``out``: optional (tokens, scales) buffers of exactly those shapes and the stored dtypes (scales None for
        float16 stores), filled in place and returned; a reader that reuses them skips allocating and
        page-faulting fresh memory for every batch (and can pass pinned memory for asynchronous device copies).
        """
        sel, _ = self._rows(rows)
        tok_out, scale_out = out if out is not None else (None, None)
        tokens = self._read("tokens", sel, tok_out)
        scales = self._read("scales", sel, scale_out) if self.spec.dtype == "int8" else None
        return tokens, scales

    def read_pooled(self, rows) -> np.ndarray:
        """(B, Dp) float32."""
        sel, _ = self._rows(rows)
        return self._read("pooled", sel).astype(np.float32)

    def read_views(self, rows) -> np.ndarray:
        """(B, P) float32 ViewParams rows."""
        sel, _ = self._rows(rows)
        return self._read("views", sel)

    def image_paths(self) -> list[str]:
        """Each image's path relative to ``spec.dataset_root``, as the file system names it (the stored text
        decoded by :func:`~morphcache.store.image_table.path_from_text`)."""
        from morphcache.store.image_table import path_from_text

        return [path_from_text(str(p)) for p in np.asarray(self.array("images/path")[:]).astype(object)]

    def image_table(self) -> "ImageTable":
        from morphcache.store.image_table import ImageTable

        size = np.asarray(self.array("images/size")[:]).reshape(-1, 2)
        table = ImageTable(
            path=self.image_paths(),
            hash=np.asarray(self.array("images/hash")[:]).astype(object).astype(str),
            height=size[:, 0].astype(np.int32),
            width=size[:, 1].astype(np.int32),
            label=np.asarray(self.array("images/label")[:]).astype(np.int32),
            status=np.asarray(self.array("images/status")[:]).astype(np.uint8),
            class_names=list(self.group.attrs.get("class_names", [])),
        )
        if self.spec.image_source == "tar":  # a TarImageTable: members read by (shard, offset, size)
            from morphcache.extract.tar_shards import tar_table_from_store

            return tar_table_from_store(self.group, table)
        return table

    def image_status(self) -> np.ndarray:
        return np.asarray(self.array("images/status")[:]).astype(np.uint8)

    def ok_images(self) -> np.ndarray:
        """Ids of images whose chunk is complete and whose status is ok."""
        status = self.image_status()
        done = np.repeat(self.progress() == 1, self.spec.chunk_images)[: self.spec.n_images]
        return np.flatnonzero((status == 0) & done)

    def ok_rows(self) -> np.ndarray:
        """Row ids (int64) that may be served for training: complete chunks, ok images, all views."""
        V = self.spec.views_per_image
        imgs = self.ok_images()
        return (imgs[:, None] * V + np.arange(V)[None, :]).reshape(-1).astype(np.int64)

    def close(self) -> None:
        """Close cached shard file handles (also done on garbage collection)."""
        for reader in self._readers.values():
            if reader is not None:
                reader.close()

    # ------------------------------------------------------------------ dask / xarray
    def to_dask(self, dequantize: bool = True) -> dict:
        """Lazy dask arrays, one block per work chunk: ``tokens`` (R, T, D) float32 when ``dequantize`` (else
        raw), ``pooled``, ``views``, ``scales`` (int8 stores), ``status`` per view (R,)."""
        from morphcache.store.lazy import to_dask

        return to_dask(self, dequantize)

    def to_xarray(self, dequantize: bool = True):
        """An ``xarray.Dataset`` with dims (view, token, channel), coords image/view_index/param names."""
        from morphcache.store.lazy import to_xarray

        return to_xarray(self, ATTR_KEY, dequantize)


def open_store(path: str | os.PathLike, mode: str = "r") -> FeatureStore:
    """Shorthand for :meth:`FeatureStore.open` (same arguments, same ``Raises``)."""
    return FeatureStore.open(path, mode)


def stored_bytes(path: str | os.PathLike, names: Sequence[str] | None = None) -> int:
    """Bytes on disk under the store (or under the given array names)."""
    root = Path(path)
    targets = [root / n for n in names] if names else [root]
    return sum(f.stat().st_size for t in targets if t.exists() for f in t.rglob("*") if f.is_file())
