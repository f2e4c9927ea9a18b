"""Real, offline images for the demo: an image folder to pretrain on and a labelled set to evaluate on.

Preference order:

1. Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``): pretraining
   images are written as PNG files into ``class/`` sub-folders; evaluation uses the idx files directly
   (``fashion-mnist?train=..&test=..``), with the pretraining images drawn from the train split only.
2. Otherwise the photos shipped inside scikit-image (``skimage.data``) and scikit-learn
   (``load_sample_images``), cut into random crops, plus scikit-learn's digits; evaluation uses ``digits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morphcache.evaluate.datasets import FASHION_MNIST_DIR

SKIMAGE_PHOTOS = (
    "astronaut", "camera", "cat", "chelsea", "coffee", "coins", "horse", "hubble_deep_field", "immunohistochemistry",
    "moon", "page", "retina", "rocket", "text", "brick", "grass", "gravel", "colorwheel", "logo", "motorcycle_left",
)


@dataclass(frozen=True)
class DemoData:
    """Where the demo's pretraining images live and which evaluation dataset spec to use."""

    image_dir: Path
    eval_spec: str
    source: str
    n_images: int


def _fashion_mnist_available(root: str = FASHION_MNIST_DIR) -> bool:
    p = Path(root)
    return p.is_dir() and any(p.glob("train-images-idx3-ubyte*"))


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", optimize=False)


def _fashion_mnist_folder(out: Path, n_images: int, seed: int) -> DemoData:
    from morphcache.evaluate.datasets import FASHION_MNIST_CLASSES, load_dataset

    # Pretrain on train-split images that the k-NN/linear evaluation does not use as its test set.
    splits = load_dataset(f"fashion-mnist?train={n_images}&test=1&seed={seed + 1}")
    for i, (img, label) in enumerate(zip(splits.train_images, splits.train_labels)):
        name = FASHION_MNIST_CLASSES[int(label)].replace("/", "-").replace(" ", "_")
        _write_png(out / f"{int(label)}_{name}" / f"{i:06d}.png", img)
    return DemoData(out, "fashion-mnist", "Fashion-MNIST (Debian dataset-fashion-mnist)", len(splits.train_labels))


def _photo_folder(out: Path, n_images: int, seed: int) -> DemoData:
    import skimage.data as skd
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    photos: list[np.ndarray] = []
    for name in SKIMAGE_PHOTOS:
        fn = getattr(skd, name, None)
        if fn is None:
            continue
        try:
            img = np.asarray(fn())
        except Exception:  # some skimage images need optional downloads (pooch); skip those
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3]
        if img.dtype != np.uint8:
            img = (255 * (img.astype(np.float64) - img.min()) / max(float(np.ptp(img)), 1e-9)).astype(np.uint8)
        photos.append(img)
    photos += [np.asarray(im) for im in load_sample_images().images]
    digits = load_digits()
    n_photo = n_images // 2
    for i in range(n_photo):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        _write_png(out / "photos" / f"{i:06d}.png", np.ascontiguousarray(src[top : top + side, left : left + side]))
    for i in range(n_images - n_photo):
        d = digits.images[i % len(digits.images)]
        img = np.kron((d * (255.0 / 16.0)).astype(np.uint8), np.ones((4, 4), dtype=np.uint8))
        _write_png(out / "digits" / f"{i:06d}.png", np.repeat(img[..., None], 3, axis=2))
    return DemoData(out, "digits", "scikit-image + scikit-learn photos and digits", n_images)


def prepare_demo_images(out: str | Path, n_images: int, seed: int = 0) -> DemoData:
    """Write ``n_images`` real images under ``out`` (idempotent: an existing complete folder is reused)."""
    out = Path(out)
    marker = out / ".complete"
    use_fmnist = _fashion_mnist_available()
    if marker.exists() and marker.read_text().strip() == f"{n_images} {seed} {int(use_fmnist)}":
        n = sum(1 for _ in out.rglob("*.png"))
        spec = "fashion-mnist" if use_fmnist else "digits"
        source = "Fashion-MNIST (Debian dataset-fashion-mnist)" if use_fmnist else "scikit-image + scikit-learn photos and digits"
        return DemoData(out, spec, source, n)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    data = _fashion_mnist_folder(out, n_images, seed) if use_fmnist else _photo_folder(out, n_images, seed)
    marker.write_text(f"{n_images} {seed} {int(use_fmnist)}")
    return data
