"""Real, offline images for the demo: an image folder to pretrain on and a labelled set to evaluate on.

Preference order:

1. Fashion-MNIST from the folder :func:`~morphcache.evaluate.datasets.fashion_mnist_dir` names
   (``$MORPHCACHE_FASHION_MNIST``, else Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``):
   pretraining images are written as PNG files into ``class/`` sub-folders; evaluation uses the idx files directly
   (``fashion-mnist:DIR?train=..&test=..``), with the pretraining images drawn from the train split only.
2. Otherwise the photos shipped inside scikit-image (``skimage.data``) and scikit-learn
   (``load_sample_images``), cut into random crops, plus scikit-learn's digits; evaluation uses ``digits``.

Every array, whatever its dtype (bool, float, uint16, signed) or shape (gray, RGBA, any size), is written through
:func:`~morphcache.extract.images.to_uint8_rgb`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morphcache.evaluate.datasets import FASHION_MNIST_ENV, fashion_mnist_dir
from morphcache.extract.images import to_uint8_rgb

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


FASHION_MNIST_SOURCE = "Fashion-MNIST"
PHOTO_SOURCE = "scikit-image + scikit-learn photos and digits"


def _fashion_mnist_available(root: Path) -> bool:
    return root.is_dir() and any(root.glob("train-images-idx3-ubyte*"))


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8_rgb(image)).save(path, format="PNG", optimize=False)


def _fashion_mnist_folder(out: Path, n_images: int, seed: int, root: Path) -> DemoData:
    from morphcache.evaluate.dataset_loading import load_dataset
    from morphcache.evaluate.datasets import FASHION_MNIST_CLASSES

    # Pretrain on train-split images that the k-NN/linear evaluation does not use as its test set.
    splits = load_dataset(f"fashion-mnist:{root}?train={n_images}&test=1&seed={seed + 1}")
    for i, (img, label) in enumerate(zip(splits.train_images, splits.train_labels)):
        name = FASHION_MNIST_CLASSES[int(label)].replace("/", "-").replace(" ", "_")
        _write_png(out / f"{int(label)}_{name}" / f"{i:06d}.png", img)
    return DemoData(out, f"fashion-mnist:{root}", f"{FASHION_MNIST_SOURCE} ({root})", len(splits.train_labels))


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
        photos.append(img)  # any dtype or channel count: _write_png converts
    photos += [np.asarray(im) for im in load_sample_images().images]
    digits = load_digits()
    n_photo = n_images // 2
    for i in range(n_photo):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        side = int(rng.integers(max(1, min(h, w) // 4), min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        _write_png(out / "photos" / f"{i:06d}.png", np.ascontiguousarray(src[top : top + side, left : left + side]))
    for i in range(n_images - n_photo):
        d = digits.images[i % len(digits.images)]
        _write_png(out / "digits" / f"{i:06d}.png", np.kron(d / 16.0, np.ones((4, 4))))  # 0..16 -> [0, 1]
    return DemoData(out, "digits", PHOTO_SOURCE, n_images)


def demo_images_key(n_images: int, seed: int = 0) -> str:
    """What :func:`prepare_demo_images` writes into ``.complete``: ``"<n_images> <seed> <Fashion-MNIST folder or
    'photos'>"``; a folder with another key is rewritten."""
    root = fashion_mnist_dir()
    return f"{n_images} {seed} {root if _fashion_mnist_available(root) else 'photos'}"


def prepared_images_key(out: str | Path) -> str | None:
    """The key of the complete image folder ``out`` (see :func:`demo_images_key`), None when there is none."""
    marker = Path(out) / ".complete"
    return marker.read_text().strip() if marker.is_file() else None


def prepare_demo_images(out: str | Path, n_images: int, seed: int = 0) -> DemoData:
    """Write ``n_images`` real images under ``out`` (idempotent: an existing complete folder is reused).

    Fashion-MNIST when :func:`~morphcache.evaluate.datasets.fashion_mnist_dir` holds its idx files, else the
    scikit-image/scikit-learn photos and digits (see the module docstring).
    """
    out = Path(out)
    marker = out / ".complete"
    root = fashion_mnist_dir()
    use_fmnist = _fashion_mnist_available(root)
    if not use_fmnist and os.environ.get(FASHION_MNIST_ENV):  # the user asked for it: say why it is not used
        print(f"demo: {FASHION_MNIST_ENV}={root} holds no Fashion-MNIST (no train-images-idx3-ubyte* there); "
              f"falling back to {PHOTO_SOURCE}", file=sys.stderr)
    key = demo_images_key(n_images, seed)
    if prepared_images_key(out) == key:
        n = sum(1 for _ in out.rglob("*.png"))
        if use_fmnist:
            return DemoData(out, f"fashion-mnist:{root}", f"{FASHION_MNIST_SOURCE} ({root})", n)
        return DemoData(out, "digits", PHOTO_SOURCE, n)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    data = _fashion_mnist_folder(out, n_images, seed, root) if use_fmnist else _photo_folder(out, n_images, seed)
    marker.write_text(key)
    return data
