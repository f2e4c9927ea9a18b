"""Helpers shared by the benchmarks' tar-shard cases: pack an image folder into WebDataset shards, and compare
the canonical-bytes read path (:meth:`morphcache.extract.stored_images.StoredImages.load`) of two stores."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path


def pack_shards(folder: Path, out: Path, per_shard: int) -> str:
    """The images of ``folder`` (sorted names, as the folder manifest orders them) as ``out/00000.tar``...;
    returns the brace pattern naming the shards."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    out.mkdir(parents=True, exist_ok=True)
    n = (len(files) + per_shard - 1) // per_shard
    for s in range(n):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tf:
            for p in files[s * per_shard:(s + 1) * per_shard]:
                data = p.read_bytes()
                info = tarfile.TarInfo(p.name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return f"{out}/{{{0:05d}..{n - 1:05d}}}.tar"


def read_rates(stores: dict[str, Path], repeats: int = 5, verify: bool = False) -> dict[str, float]:
    """Images per second of ``StoredImages.load`` over every image of each store (best of ``repeats``, the
    stores measured alternately so that load drift on a shared machine hits both)."""
    from morphcache.extract.stored_images import StoredImages
    from morphcache.store.feature_store import FeatureStore

    images = {k: StoredImages.from_store(FeatureStore.open(p)) for k, p in stores.items()}
    best = {k: float("inf") for k in stores}
    for _ in range(repeats):
        for k, im in images.items():
            t0 = time.perf_counter()
            for i in range(len(im.images)):
                im.load(i, verify=verify)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: len(images[k].images) / t for k, t in best.items()}
