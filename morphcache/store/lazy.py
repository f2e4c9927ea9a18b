"""Lazy, out-of-core views of a store: dask arrays (one block per work chunk) and an xarray Dataset.

Shapes: tokens (R, T, D) float32 when dequantized (else the stored int8/float16), pooled (R, Dp), views (R, P),
scales (R, T) for int8 stores, status (R,) per view (its image's status).
"""

from __future__ import annotations

import numpy as np

DATA_ARRAYS = ("tokens", "pooled", "views")


def to_dask(store, dequantize: bool = True) -> dict:
    """Dask arrays of ``store`` (a :class:`~morphcache.store.feature_store.FeatureStore`)."""
    import dask.array as da

    def load(name):
        arr = store.array(name)
        return da.from_zarr(arr, chunks=getattr(arr, "shards", None) or arr.chunks)

    out = {name: load(name) for name in DATA_ARRAYS}
    if store.spec.dtype == "int8":
        out["scales"] = load("scales")
        if dequantize:
            out["tokens"] = out["tokens"].astype(np.float32) * out["scales"].astype(np.float32)[..., None]
    elif dequantize:
        out["tokens"] = out["tokens"].astype(np.float32)
    status = load("images/status")
    out["status"] = da.repeat(status, store.spec.views_per_image, axis=0).rechunk(out["views"].chunks[0])
    return out


def to_xarray(store, attr_key: str, dequantize: bool = True):
    """An ``xarray.Dataset`` with dims (view, token, channel) and coords image, view_index, token_row/col, param."""
    import xarray as xr

    from morphcache.schemas import VIEW_FIELDS

    arrays = to_dask(store, dequantize=dequantize)
    V = store.spec.views_per_image
    rows = np.arange(store.n_rows)
    h, w = store.spec.teacher.grid
    data_vars = {
        "tokens": (("view", "token", "channel"), arrays["tokens"]),
        "pooled": (("view", "pooled_channel"), arrays["pooled"]),
        "views": (("view", "param"), arrays["views"]),
        "status": (("view",), arrays["status"]),
    }
    coords = {
        "view": rows,
        "image": ("view", rows // V),
        "view_index": ("view", rows % V),
        "token": np.arange(h * w),
        "token_row": ("token", np.arange(h * w) // w),
        "token_col": ("token", np.arange(h * w) % w),
        "param": list(VIEW_FIELDS),
    }
    return xr.Dataset(data_vars, coords=coords, attrs={attr_key: store.spec.model_dump_json()})
