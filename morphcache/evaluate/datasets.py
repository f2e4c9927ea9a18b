"""Labelled evaluation datasets as uint8 RGB arrays, parsed from a one-string SPEC.

A SPEC's kind (the text before ``:`` / ``?``) names a loader registered in :data:`morphcache.registries.datasets`
(``(spec, image_size) -> DatasetSplits``; a new dataset is one function plus
``@morphcache.registries.datasets.register("kind")``). Built-in SPEC forms (optional query
``?train=N&test=M&seed=S`` subsamples each split, stratified and seeded):

- ``fashion-mnist[:DIR]``: idx files (``.gz`` or plain), default DIR ``$MORPHCACHE_FASHION_MNIST`` or else
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``), see :func:`fashion_mnist_dir`;
- ``digits``: scikit-learn's 8x8 digits, a fixed stratified 75/25 split (seed 0);
- ``cifar10:DIR`` / ``cifar100:DIR``: the python-pickle batches (``cifar-10-batches-py`` / ``cifar-100-python``);
- ``folder:DIR``: ``DIR/train/<class>/*`` plus ``DIR/test`` (or ``DIR/val``), listed by the one folder rule of
  extraction (:func:`morphcache.extract.folders.walk_image_folder`: hidden and non-image files left out) and
  decoded by extraction's canonical decoder (:func:`morphcache.extract.images.load_canonical_bytes`, EXIF
  orientation applied), shorter side resized to ``image_size`` then centre-cropped (so every image has the same
  shape). Files that do not decode are skipped with their reason (``DatasetSplits.skipped``).

Grayscale sources are expanded to three channels; resizing to a model's input happens in
:mod:`morphcache.evaluate.features`.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Collection
from urllib.parse import parse_qsl

import numpy as np

from morphcache import registries
from morphcache.errors import MorphcacheError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Environment variable that points ``fashion-mnist`` (and ``morphcache demo``) at another idx folder.
FASHION_MNIST_ENV = "MORPHCACHE_FASHION_MNIST"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_QUERY_KEYS = ("train", "test", "seed")


def fashion_mnist_dir() -> Path:
    """The Fashion-MNIST idx folder: ``$MORPHCACHE_FASHION_MNIST`` when set, else :data:`FASHION_MNIST_DIR`.

    The one setting for where Fashion-MNIST lives (``fashion-mnist`` without ``:DIR``, and the demo's choice of
    data); pointing it at an empty folder makes the demo use its bundled fallback images.
    """
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR).expanduser()


@dataclass
class DatasetSplits:
    """A labelled train/test pair. Images uint8 (N, H, W, 3); labels int64 (N,) indexing ``classes``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    name: str
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of files a folder: dataset left out

    def skipped_line(self) -> str | None:
        """One line naming the first skipped files and their reasons, or None when nothing was skipped."""
        if not self.skipped:
            return None
        from morphcache.store.image_table import path_to_text

        first = "; ".join(f"{path_to_text(p)}: {r}" for p, r in self.skipped[:3])
        more = f" (and {len(self.skipped) - 3} more)" if len(self.skipped) > 3 else ""
        return f"{self.name}: skipped {len(self.skipped)} file(s): {first}{more}"

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` samples keeping class proportions (seeded); all indices if ``n >= len(labels)``."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    key = rng.random(len(labels))
    rank = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = idx[np.argsort(key[idx])]
        rank[order] = (np.arange(len(idx)) + 0.5) / len(idx)  # position within its class, in (0, 1)
    return np.sort(np.lexsort((key, rank))[:n])


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1|3) uint8 -> (N, H, W, 3) uint8."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images, dtype=np.uint8)


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx-ubyte file (MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MorphcacheError(f"{path} is not an unsigned-byte idx file; re-download the dataset")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise MorphcacheError(f"{path} is truncated ({len(data) - offset} of {expected} bytes); re-download it")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise MorphcacheError(f"{root / stem}[.gz] not found; point fashion-mnist:DIR (or ${FASHION_MNIST_ENV}) at the "
                          "folder with the idx files, or install Debian's dataset-fashion-mnist")


def _load_fashion_mnist(root: Path):
    if not root.is_dir():
        raise MorphcacheError(f"fashion-mnist folder {root} does not exist; install dataset-fashion-mnist, pass "
                              f"fashion-mnist:DIR or set {FASHION_MNIST_ENV}=DIR")
    parts = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(images) != len(labels):
            raise MorphcacheError(f"{root}: {prefix} has {len(images)} images but {len(labels)} labels")
        parts.append((_to_rgb(images), labels))
    return parts[0], parts[1], FASHION_MNIST_CLASSES


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.25, random_state=0, stratify=labels)
    return (_to_rgb(x_tr), y_tr), (_to_rgb(x_te), y_te), tuple(str(i) for i in range(10))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler limited to what CIFAR batches contain (dicts, lists, numpy arrays): no arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("_codecs", "encode"),  # bytes inside protocol-2 pickles written by Python 3
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise MorphcacheError(f"{path} not found; cifar10:DIR / cifar100:DIR must hold the python-pickle batches")
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise MorphcacheError(f"{path} is not a CIFAR python pickle ({exc}); re-download the python version") from exc
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_root(root: Path, sub: str, marker: str) -> Path:
    if (root / marker).is_file():
        return root
    if (root / sub / marker).is_file():
        return root / sub
    raise MorphcacheError(f"{root} holds no {marker} (nor {sub}/{marker}); point the spec at the extracted folder")


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise MorphcacheError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _load_cifar(root: Path, hundred: bool):
    if not root.is_dir():
        raise MorphcacheError(f"CIFAR folder {root} does not exist; pass cifar10:DIR or cifar100:DIR")
    if hundred:
        root = _cifar_root(root, "cifar-100-python", "train")
        files, test_file, meta_file, key, names_key = ["train"], "test", "meta", "fine_labels", "fine_label_names"
    else:
        root = _cifar_root(root, "cifar-10-batches-py", "data_batch_1")
        files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, key, names_key = "test_batch", "batches.meta", "labels", "label_names"
    splits = []
    for names in (files, [test_file]):
        batches = [(_unpickle(root / n), root / n) for n in names]
        images = np.concatenate([_cifar_images(b, p) for b, p in batches])
        labels = np.concatenate([np.asarray(b[key], dtype=np.int64) for b, _ in batches])
        splits.append((images, labels))
    n_classes = 100 if hundred else 10
    classes = tuple(str(i) for i in range(n_classes))
    if (root / meta_file).is_file():
        names = _unpickle(root / meta_file).get(names_key)
        if names and len(names) == n_classes:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return splits[0], splits[1], classes


def _list_folder(split_dir: Path, classes: list[str] | None) -> tuple[list[Path], np.ndarray, list[str], list]:
    """The split's images, labels and classes under the one folder rule
    (:func:`morphcache.extract.folders.walk_image_folder`), and its skipped ``(path, reason)`` entries."""
    from morphcache.extract.folders import holds_images_directly, walk_image_folder

    if classes is None and holds_images_directly(split_dir):
        raise MorphcacheError(f"{split_dir} holds images directly; folder:DIR needs class sub-folders "
                              f"({split_dir}/<class>/*.jpg)")
    listing = walk_image_folder(split_dir, classes=classes)
    if classes is not None and len(listing.classes) > len(classes):
        unknown = listing.classes[len(classes):]
        raise MorphcacheError(f"{split_dir} has classes missing from train/: {', '.join(unknown[:5])}")
    if not listing.paths:
        raise MorphcacheError(f"{split_dir} holds no images in class subfolders (expected {split_dir}/<class>/*.jpg)")
    skipped = [(split_dir / p, reason) for p, reason in listing.skipped]
    return ([split_dir / p for p in listing.paths], np.asarray(listing.labels, dtype=np.int64), listing.classes,
            skipped)


def _decode_square(path: Path, size: int) -> np.ndarray:
    """Decode with the canonical decoder (:func:`morphcache.extract.images.load_canonical_bytes`: EXIF orientation
    applied, alpha dropped, 16-bit to 8-bit, as extraction and training see the file), resize the shorter side to
    ``size`` (bicubic), centre-crop: uint8 (size, size, 3). A bad file raises
    :class:`~morphcache.errors.BadImageError` (``.reason`` = status code)."""
    from PIL import Image

    from morphcache.extract.images import decode_rgb, load_canonical_bytes

    im = Image.fromarray(decode_rgb(load_canonical_bytes(path)[0]))
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _load_folder(root: Path, image_size: int, n_train: int | None, n_test: int | None, seed: int):
    from morphcache.errors import BadImageError
    from morphcache.store.image_table import STATUS_REASONS, path_to_text

    if not (root / "train").is_dir():
        raise MorphcacheError(f"{root}/train does not exist; folder:DIR needs DIR/train/<class>/ and DIR/test/")
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not test_dir.is_dir():
        raise MorphcacheError(f"{root} has neither test/ nor val/; folder:DIR needs a test split")
    tr_paths, tr_labels, classes, skipped = _list_folder(root / "train", None)
    te_paths, te_labels, _, te_skipped = _list_folder(test_dir, classes)
    skipped += te_skipped
    out = []
    splits = ((root / "train", tr_paths, tr_labels, n_train, seed), (test_dir, te_paths, te_labels, n_test, seed + 1))
    for split_dir, paths, labels, n, s in splits:
        keep = stratified_subset(labels, n, s) if n is not None else np.arange(len(labels))
        images, kept = [], []
        for i in keep.tolist():
            try:
                images.append(_decode_square(paths[i], image_size))
                kept.append(i)
            except BadImageError as exc:  # the bad-image policy of evaluation: skip the file, keep its reason
                skipped.append((paths[i], STATUS_REASONS.get(exc.reason, str(exc))))
        if not images:
            raise MorphcacheError(f"{split_dir}: no image could be decoded, e.g. {path_to_text(str(skipped[-1][0]))}: "
                                  f"{skipped[-1][1]}; replace the files or point folder:DIR elsewhere")
        out.append((np.stack(images), labels[kept]))
    return out[0], out[1], tuple(classes), skipped


def parse_dataset_spec(spec: str, keys: Collection[str] = _QUERY_KEYS) -> tuple[str, str | None, dict[str, int]]:
    """``'fashion-mnist:/d?train=10'`` -> ``('fashion-mnist', '/d', {'train': 10})``. ``keys``: the integer query
    options allowed (``train`` and ``test`` must be positive, any other key non-negative).

    Raises:
        MorphcacheError: an unknown query option, or a value that is not an integer or is out of range.
    """
    base, _, query = spec.partition("?")
    kind, sep, arg = base.partition(":")
    params: dict[str, int] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in keys:
            raise MorphcacheError(f"dataset spec {spec!r}: unknown option {key!r}; use "
                                  + ", ".join(f"{k}=N" for k in keys))
        try:
            params[key] = int(value)
        except ValueError:
            raise MorphcacheError(f"dataset spec {spec!r}: {key}={value!r} is not an integer") from None
        least = 1 if key in ("train", "test") else 0
        if params[key] < least:
            raise MorphcacheError(f"dataset spec {spec!r}: {key} must be {'positive' if least else 'non-negative'}")
    return kind.strip().lower(), (arg if sep else None), params


def dataset_kind(spec: str) -> str:
    """The registry key of a SPEC: its text before ``:`` and ``?``, stripped and lower-cased
    (``'folder:/d?train=3'`` -> ``'folder'``)."""
    return spec.partition("?")[0].partition(":")[0].strip().lower()


def _splits(spec: str, train, test, classes, params: dict, skipped=()) -> DatasetSplits:
    """A :class:`DatasetSplits` of ``(images, labels)`` pairs, subsampled per the SPEC's ``train`` / ``test`` /
    ``seed`` query (stratified; the test split with seed + 1)."""
    n_train, n_test, seed = params.get("train"), params.get("test"), params.get("seed", 0)
    (x_tr, y_tr), (x_te, y_te) = train, test
    if n_train is not None:
        keep = stratified_subset(y_tr, n_train, seed)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if n_test is not None:
        keep = stratified_subset(y_te, n_test, seed + 1)
        x_te, y_te = x_te[keep], y_te[keep]
    name = _name_with_sizes_used(spec, {"train": (n_train, len(y_tr)), "test": (n_test, len(y_te))})
    return DatasetSplits(x_tr, y_tr, x_te, y_te, tuple(classes), name, tuple((str(p), r) for p, r in skipped))


def _name_with_sizes_used(spec: str, sizes: dict[str, tuple[int | None, int]]) -> str:
    """``spec`` with every ``train=`` / ``test=`` that asked for more images than the split holds replaced by the
    number used, and one stderr line per replacement: result rows name the data they were computed on."""
    for key, (asked, used) in sizes.items():
        if asked is not None and used < asked:
            print(f"dataset {spec}: {key}={asked} asks for more than the {used} {key} images it holds; using "
                  f"{used}", file=sys.stderr)
            spec = re.sub(rf"(?<=[?&]){key}={asked}(?=&|$)", f"{key}={used}", spec)
    return spec


def _folder_arg(spec: str, kind: str, arg: str | None) -> Path:
    if not arg:
        raise MorphcacheError(f"dataset spec {spec!r} needs a folder: {kind}:DIR")
    return Path(arg).expanduser()


@registries.datasets.register("fashion-mnist")
def fashion_mnist(spec: str, image_size: int = 224) -> DatasetSplits:
    """``fashion-mnist[:DIR]``: the idx files in DIR (default :func:`fashion_mnist_dir`)."""
    _, arg, params = parse_dataset_spec(spec)
    return _splits(spec, *_load_fashion_mnist(Path(arg).expanduser() if arg else fashion_mnist_dir()), params)


@registries.datasets.register("digits")
def digits(spec: str, image_size: int = 224) -> DatasetSplits:
    """``digits``: scikit-learn's 8x8 digits, a fixed stratified 75/25 split."""
    _, _, params = parse_dataset_spec(spec)
    return _splits(spec, *_load_digits(), params)


@registries.datasets.register("cifar10")
def cifar10(spec: str, image_size: int = 224) -> DatasetSplits:
    """``cifar10:DIR``: the python-pickle batches."""
    kind, arg, params = parse_dataset_spec(spec)
    return _splits(spec, *_load_cifar(_folder_arg(spec, kind, arg), hundred=False), params)


@registries.datasets.register("cifar100")
def cifar100(spec: str, image_size: int = 224) -> DatasetSplits:
    """``cifar100:DIR``: the python-pickle batches (fine labels)."""
    kind, arg, params = parse_dataset_spec(spec)
    return _splits(spec, *_load_cifar(_folder_arg(spec, kind, arg), hundred=True), params)


@registries.datasets.register("folder")
def folder(spec: str, image_size: int = 224) -> DatasetSplits:
    """``folder:DIR``: ``DIR/train/<class>/*`` and ``DIR/test`` (or ``val``), subsampled before decoding, decoded
    to ``image_size`` squares."""
    kind, arg, params = parse_dataset_spec(spec)
    train, test, classes, skipped = _load_folder(_folder_arg(spec, kind, arg), image_size, params.get("train"),
                                                 params.get("test"), params.get("seed", 0))
    return _splits(spec, train, test, classes, {}, skipped)  # already subsampled before decoding
