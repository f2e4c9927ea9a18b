"""Small random feature stores for tests (imported by the test suite and usable by plug-in authors).

``make_store(path, ...)`` creates a real zarr store through :class:`FeatureStore` and fills it chunk by chunk
with deterministic synthetic teacher-like tokens: a smooth random field over the token grid (neighbouring
tokens are similar, as for real teachers), per-token noise, and two high-magnitude channels (real ViT
features have a few outlier channels). Data depend only on (seed, chunk), so any process can write any chunk.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from morphcache.schemas import N_VIEW_PARAMS, StoreSpec, TeacherSpec
from morphcache.store.feature_store import FeatureStore
from morphcache.store.image_table import STATUS_OK, STATUS_PENDING, ImageTable

CREATED = "2025-01-01T00:00:00+00:00"


def make_spec(n_images: int = 6, views: int = 2, dtype: str = "int8", chunk_images: int = 2, T: int = 16,
              D: int = 32, seed: int = 0) -> StoreSpec:
    """A StoreSpec with a square token grid of T tokens (T must be a square), width D, pooled width D."""
    side = math.isqrt(T)
    if side * side != T:
        raise ValueError(f"T={T} must be a square number")
    teacher = TeacherSpec(kind="timm", name="test_vit", image_size=side * 4, patch_size=4, dim=D, pooled_dim=D)
    return StoreSpec(teacher=teacher, views_per_image=views, n_images=n_images, chunk_images=chunk_images,
                     dtype=dtype, seed=seed, created=CREATED)


def make_image_table(n_images: int) -> ImageTable:
    """An ImageTable of ``n_images`` pending rows with made-up paths, hashes, sizes 32x40 and labels 0..2."""
    return ImageTable(
        path=[f"img_{i:04d}.png" for i in range(n_images)],
        hash=[f"{i:032x}" for i in range(n_images)],
        height=np.full(n_images, 32), width=np.full(n_images, 40),
        label=np.arange(n_images) % 3, status=np.full(n_images, STATUS_PENDING),
    )


def make_tokens(rng: np.random.Generator, rows: int, T: int, D: int) -> np.ndarray:
    """(rows, T, D) float32: smooth field on the sqrt(T) grid + noise + two outlier channels."""
    side = math.isqrt(T)
    coarse = max(1, side // 2)
    field = rng.standard_normal((rows, coarse, coarse, D)).astype(np.float32)
    up = np.repeat(np.repeat(field, -(-side // coarse), axis=1), -(-side // coarse), axis=2)[:, :side, :side]
    x = up.reshape(rows, T, D) + 0.3 * rng.standard_normal((rows, T, D)).astype(np.float32)
    x[..., : min(2, D)] *= 6.0
    return x.astype(np.float32)


def make_chunk(spec: StoreSpec, c: int, seed: int = 0, skipped: tuple[int, ...] = ()):
    """Deterministic inputs for ``write_chunk(c, ...)``: tokens, pooled, views, status. Images in ``skipped``
    get status 1 (corrupt) and zero rows."""
    ia = c * spec.chunk_images
    ib = min(ia + spec.chunk_images, spec.n_images)
    V = spec.views_per_image
    rows = (ib - ia) * V
    rng = np.random.default_rng([seed, c])
    tokens = make_tokens(rng, rows, spec.n_tokens, spec.dim)
    pooled = rng.standard_normal((rows, spec.teacher.pooled_dim)).astype(np.float32)
    views = rng.uniform(0, 30, (rows, N_VIEW_PARAMS)).astype(np.float32)
    status = np.full(ib - ia, STATUS_OK, dtype=np.uint8)
    for i in skipped:
        if ia <= i < ib:
            status[i - ia] = 1
            r = (i - ia) * V
            tokens[r:r + V] = 0
            pooled[r:r + V] = 0
            views[r:r + V] = 0
    return tokens, pooled, views, status


def make_store(path, n_images: int = 6, views: int = 2, dtype: str = "int8", chunk_images: int = 2, T: int = 16,
               D: int = 32, complete: bool = True, seed: int = 0, compression: str = "none",
               skipped: tuple[int, ...] = ()) -> FeatureStore:
    """Create and fill a store at ``path``; ``complete=False`` leaves the last chunk unwritten."""
    spec = make_spec(n_images, views, dtype, chunk_images, T, D, seed)
    store = FeatureStore.create(Path(path), spec, make_image_table(n_images), compression=compression)
    last = store.n_chunks - (0 if complete else 1)
    for c in range(last):
        store.write_chunk(c, *make_chunk(spec, c, seed, skipped))
    return store


def expected_tokens(spec: StoreSpec, seed: int = 0, skipped: tuple[int, ...] = ()) -> np.ndarray:
    """The float32 tokens (R, T, D) that ``make_store`` fed to write_chunk, before quantization."""
    return np.concatenate([make_chunk(spec, c, seed, skipped)[0] for c in range(spec.n_chunks)], axis=0)


def done_chunk_files(store: str | Path) -> int:
    """How many chunks of a store being written have their progress flag file (``progress/c/<i>``), read from the
    folder listing while a writer runs. zarr writes each chunk file as ``<i>.<uuid>.partial`` and renames it, so
    only all-digit names count: counting the ``.partial`` names killed kill -9 tests one chunk early in CI."""
    d = Path(store) / "progress" / "c"
    return sum(name.isdigit() for name in os.listdir(d)) if d.is_dir() else 0


def store_arrays(path) -> dict:
    """Every array of a store read with plain zarr, as bytes (strings via repr), for bit-for-bit comparisons."""
    import zarr

    out = {}
    for name, arr in zarr.open_group(str(path), mode="r").members(max_depth=None):
        if isinstance(arr, zarr.Array):
            data = np.asarray(arr[:])
            out[name] = repr(data.tolist()).encode() if data.dtype.kind in "OUT" else data.tobytes()
    return out


def make_image_store(path, n_images: int = 8, views: int = 2, chunk_images: int = 4, T: int = 16, D: int = 32,
                     dtype: str = "int8", seed: int = 0, augment=None) -> FeatureStore:
    """A store with real images and synthetic targets, built without DALI or a teacher (cheap; for loader tests).

    Writes ``n_images`` texture PNGs (:func:`morphcache.testing.teacher_stores.write_texture_pngs`, 48..64 px per
    side) into ``<path>_images/``, draws each image's ``views`` view rows with extraction's
    :class:`~morphcache.extract.views.ViewSampler` (``augment``: an ``AugmentSpec``, default DTM's), and fills
    tokens (T, D) and pooled rows with :func:`make_chunk`'s synthetic data. The teacher spec's image side is
    ``4 * sqrt(T)`` pixels. Every image is servable (status ok).
    """
    from morphcache.extract.images import content_hash, load_canonical_bytes
    from morphcache.extract.views import ViewSampler
    from morphcache.schemas import AugmentSpec
    from morphcache.testing.teacher_stores import write_texture_pngs

    path = Path(path)
    root = path.parent / f"{path.name}_images"
    names = write_texture_pngs(root, n_images, seed)
    sizes = [load_canonical_bytes(root / n)[1] for n in names]
    table = ImageTable(
        path=np.array(names), hash=np.array([content_hash((root / n).read_bytes()) for n in names]),
        height=np.array([s[0] for s in sizes]), width=np.array([s[1] for s in sizes]),
        label=np.arange(n_images) % 3, status=np.full(n_images, STATUS_PENDING, np.uint8),
    )
    augment = augment or AugmentSpec()
    spec = make_spec(n_images, views, dtype, chunk_images, T, D, seed).model_copy(
        update={"augment": augment, "dataset_root": str(root)})
    store = FeatureStore.create(path, spec, table)
    sampler = ViewSampler(augment, seed)
    for c in range(store.n_chunks):
        tokens, pooled, _, status = make_chunk(spec, c, seed)
        ia, ib = store.chunk_image_range(c)
        rows = np.stack([sampler.row(i, v, *sizes[i]) for i in range(ia, ib) for v in range(views)])
        store.write_chunk(c, tokens, pooled, rows, status)
    return FeatureStore.open(store.path)
