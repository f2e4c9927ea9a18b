"""The store's on-disk layout: which zarr v3 arrays exist, their chunking, codecs and dimension names.

``create_arrays`` lays out a new group for a :class:`~morphcache.schemas.StoreSpec` and writes the image table;
``check_arrays`` verifies that an opened group still has every array the spec requires (a truncated or damaged
store is refused with one line naming the array). Chunking follows the writer-owns-whole-chunks rule: a work chunk
``c`` is one shard of ``tokens`` / ``scales``, one chunk of ``pooled``, ``views`` and ``images/status``, and one
file each of ``progress`` and ``checksums``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from morphcache.errors import StoreError
from morphcache.schemas import N_VIEW_PARAMS, StoreSpec

COMPRESSIONS = ("none", "zstd")


def token_codecs(dtype: str, compression: str):
    """Codecs inside token shards: none (default; teacher tokens gain ~8% from zstd but random reads get 5-10x
    slower) or blosc/zstd level 1 with byte shuffle for float16."""
    if compression == "none":
        return None
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle" if dtype == "float16" else "noshuffle")]


def create_arrays(root, spec: StoreSpec, images, inner_rows: int, compression: str) -> None:
    """Create every array of the current schema in the empty group ``root`` and write the image table (N rows)."""
    T, D, Dp = spec.n_tokens, spec.dim, spec.teacher.pooled_dim
    R, N, C = spec.n_rows, spec.n_images, spec.n_chunks
    rows = spec.chunk_rows
    root.create_array(
        "tokens", shape=(R, T, D), dtype=spec.dtype, chunks=(inner_rows, T, D), shards=(rows, T, D),
        compressors=token_codecs(spec.dtype, compression), fill_value=0,
        dimension_names=("view", "token", "channel"),
    )
    if spec.dtype == "int8":
        root.create_array(
            "scales", shape=(R, T), dtype="float16", chunks=(inner_rows, T), shards=(rows, T),
            compressors=None, fill_value=0, dimension_names=("view", "token"),
        )
    root.create_array(
        "pooled", shape=(R, Dp), dtype="float16", chunks=(rows, Dp), fill_value=0,
        dimension_names=("view", "pooled_channel"),
    )
    root.create_array(
        "views", shape=(R, N_VIEW_PARAMS), dtype="float32", chunks=(rows, N_VIEW_PARAMS), fill_value=0,
        dimension_names=("view", "param"),
    )
    img = root.create_group("images")
    whole = (max(N, 1),)
    img.create_array("path", shape=(N,), dtype=str, chunks=whole, dimension_names=("image",))
    img.create_array("hash", shape=(N,), dtype=str, chunks=whole, dimension_names=("image",))
    img.create_array("size", shape=(N, 2), dtype="int32", chunks=(max(N, 1), 2), dimension_names=("image", "hw"))
    img.create_array("label", shape=(N,), dtype="int32", chunks=whole, dimension_names=("image",))
    img.create_array("status", shape=(N,), dtype="uint8", chunks=(spec.chunk_images,), fill_value=255,
                     dimension_names=("image",))
    root.create_array("progress", shape=(C,), dtype="uint8", chunks=(1,), fill_value=0, dimension_names=("chunk",))
    root.create_array("checksums", shape=(C,), dtype="uint64", chunks=(1,), fill_value=0, dimension_names=("chunk",))
    if N:
        from morphcache.store.image_table import path_to_text

        img["path"][:] = np.asarray([path_to_text(str(p)) for p in images.path], dtype=object).astype(str)
        img["hash"][:] = np.asarray(images.hash, dtype=object).astype(str)
        img["size"][:] = np.stack([np.asarray(images.height), np.asarray(images.width)], axis=1).astype(np.int32)
        img["label"][:] = np.asarray(images.label, dtype=np.int32)
    root.attrs["class_names"] = [str(c) for c in getattr(images, "class_names", [])]
    if spec.image_source == "tar":  # tar shard members: (shard, offset, size) per image, path + size per shard
        from morphcache.extract.tar_shards import create_tar_arrays

        create_tar_arrays(root, images)


def check_arrays(path: Path, group, spec: StoreSpec) -> None:
    """Every array the spec requires exists with the right shape and dtype, else a one-line StoreError."""
    expected = {
        "tokens": ((spec.n_rows, spec.n_tokens, spec.dim), spec.dtype),
        "pooled": ((spec.n_rows, spec.teacher.pooled_dim), "float16"),
        "views": ((spec.n_rows, N_VIEW_PARAMS), "float32"),
        "images/path": ((spec.n_images,), None),
        "images/hash": ((spec.n_images,), None),
        "images/size": ((spec.n_images, 2), "int32"),
        "images/label": ((spec.n_images,), "int32"),
        "images/status": ((spec.n_images,), "uint8"),
        "progress": ((spec.n_chunks,), "uint8"),
        "checksums": ((spec.n_chunks,), "uint64"),
    }
    if spec.dtype == "int8":
        expected["scales"] = ((spec.n_rows, spec.n_tokens), "float16")
    for name, (shape, dtype) in expected.items():
        try:
            arr = group[name]
        except Exception:  # KeyError, or zarr errors for half-deleted metadata
            raise StoreError(f"{path}: truncated store, array '{name}' is missing; delete it and re-run extract") from None
        if tuple(arr.shape) != shape:
            raise StoreError(f"{path}: array '{name}' has shape {tuple(arr.shape)}, spec requires {shape}; the store is damaged")
        if dtype is not None and np.dtype(arr.dtype) != np.dtype(dtype):
            raise StoreError(f"{path}: array '{name}' has dtype {arr.dtype}, spec requires {dtype}; the store is damaged")
    if spec.image_source == "tar":
        from morphcache.extract.tar_shards import check_tar_arrays

        check_tar_arrays(path, group, spec.n_images)
