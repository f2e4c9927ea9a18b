"""A real feature store extracted from generated images, for tests of training and replay.

PNGs of sinusoid textures -> extraction's ViewSampler -> DaliRenderer at the teacher's size -> a tiny random timm
ViT teacher whose weights are saved to a file (so it can be reloaded) -> tokens quantized into zarr by
:meth:`FeatureStore.write_chunk`. Targets are thus a deterministic function of the pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from morphcache.schemas import AugmentSpec, StoreSpec
from morphcache.store.feature_store import FeatureStore
from morphcache.store.image_table import STATUS_OK, ImageTable

TEACHER = "test_vit"  # timm test model: width 64, patch 16
TEACHER_SIZE = 64  # -> 4x4 grid


def write_texture_pngs(root: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` PNGs of sinusoid textures with a coloured square (sizes vary); returns relative paths."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        h, w = 48 + 8 * (i % 3), 56 + 4 * (i % 2)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            img[..., c] = 127 + 100 * np.sin(xx * rng.uniform(0.05, 0.5) + yy * rng.uniform(0.05, 0.5) + rng.uniform(0, 6))
        t, l = rng.integers(0, h - 16), rng.integers(0, w - 16)
        img[t : t + 16, l : l + 16] = rng.uniform(0, 255, 3)
        name = f"im{i:03d}.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / name)
        names.append(name)
    return names


def teacher_weights(path: Path, seed: int = 0) -> str:
    """Save a seeded random timm ``TEACHER`` (input ``TEACHER_SIZE``) state dict at ``path``; returns the path."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(TEACHER, num_classes=0, img_size=TEACHER_SIZE)
    torch.save(model.state_dict(), path)
    return str(path)


def build_teacher_store(tmp: Path, n_images: int = 16, views: int = 2, chunk_images: int = 4, dtype: str = "int8",
                        complete: bool = True, seed: int = 0) -> FeatureStore:
    """Extract a real store: PNGs -> ViewSampler -> DaliRenderer (teacher size) -> timm teacher -> zarr."""
    from morphcache.extract.images import content_hash, load_canonical_bytes
    from morphcache.extract.render_dali import DaliRenderer
    from morphcache.extract.teachers import load_teacher
    from morphcache.extract.views import ViewSampler

    data = tmp / "images"
    names = write_texture_pngs(data, n_images, seed)
    weights = teacher_weights(tmp / "teacher.pth", seed)
    teacher = load_teacher("timm", TEACHER, weights, image_size=TEACHER_SIZE)
    encoded, sizes = zip(*(load_canonical_bytes(data / n) for n in names))
    table = ImageTable(
        path=np.array(names), hash=np.array([content_hash((data / n).read_bytes()) for n in names]),
        height=np.array([s[0] for s in sizes]), width=np.array([s[1] for s in sizes]),
        label=np.arange(n_images) % 3, status=np.full(n_images, 255, np.uint8),
    )
    augment = AugmentSpec()
    spec = StoreSpec(teacher=teacher.spec, augment=augment, seed=seed, views_per_image=views, n_images=n_images,
                     chunk_images=chunk_images, dtype=dtype, dataset_root=str(data))
    store = FeatureStore.create(tmp / "store", spec, table)
    sampler = ViewSampler(augment, seed)
    renderer = DaliRenderer(sizes=(TEACHER_SIZE,), mean=teacher.spec.mean, std=teacher.spec.std,
                            batch_size=chunk_images * views, num_threads=1)
    last = store.n_chunks - (0 if complete else 1)
    for c in range(last):
        ia, ib = store.chunk_image_range(c)
        rows = np.stack([sampler.row(i, v, *sizes[i]) for i in range(ia, ib) for v in range(views)])
        (images,) = renderer.render([encoded[i] for i in range(ia, ib) for _ in range(views)], rows)
        tokens, pooled = teacher.forward_tokens(images)
        store.write_chunk(c, tokens.numpy(), pooled.numpy(), rows, np.full(ib - ia, STATUS_OK, np.uint8))
    return FeatureStore.open(store.path)
