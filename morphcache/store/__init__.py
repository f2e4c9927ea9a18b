"""The zarr v3 feature store: :class:`FeatureStore`, quantization, verify/info/stats.

The current schema version is ``morphcache.schemas.SCHEMA_VERSION``; older stores are migrated on open
(``schemas/versioning.py``).

Names are imported lazily so ``morphcache --help`` (which imports ``morphcache.store.cli``) stays fast.
"""

from __future__ import annotations

_EXPORTS = {
    "FeatureStore": "morphcache.store.feature_store",
    "ShardRowReader": "morphcache.store.shard_reader",
    "open_store": "morphcache.store.feature_store",
    "chunk_checksum": "morphcache.store.feature_store",
    "stored_bytes": "morphcache.store.feature_store",
    "quantize": "morphcache.store.quantize",
    "dequantize": "morphcache.store.quantize",
    "dequantize_torch": "morphcache.store.quantize",
    "token_cosine": "morphcache.store.quantize",
    "quantization_fidelity": "morphcache.store.quantize",
    "verify_store": "morphcache.store.verify",
    "store_info": "morphcache.store.info",
    "compute_stats": "morphcache.store.stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'morphcache.store' has no attribute {name!r}")
