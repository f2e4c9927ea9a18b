"""Semantic-segmentation datasets (image + integer label map pairs), parsed from a one-string SPEC.

Loaders registered in :data:`morphcache.registries.datasets` (as the classification ones of
:mod:`morphcache.evaluate.datasets`; a loader returning a :class:`SegDataset` is a segmentation dataset). Built-in
SPEC forms; an optional query ``?train=N&test=M&seed=S`` keeps a seeded random subset of N training and M
validation pairs (chosen before anything is decoded):

- ``ade20k:DIR``: ADE20K as released for the SceneParsing benchmark (``ADEChallengeData2016.zip``): DIR is the
  ``ADEChallengeData2016`` folder (or its parent) with ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` of the same stems. 150 classes; annotation value 0 means "other /
  unlabelled" and is ignored, value k is class k - 1 (mmsegmentation's ``reduce_zero_label``), so the 150 classes
  are 0..149 and 0 becomes :data:`DEFAULT_IGNORE_INDEX` (255).
- ``seg-folder:DIR``: ``DIR/images/`` and ``DIR/masks/`` with matching file stems; the split comes from
  subfolders (``images/train`` + ``images/val``, also ``training``/``validation``/``test``, mirrored under
  ``masks/``), or, when ``images/`` holds files directly, from a seeded 80/20 split of the sorted stems (seed S).
  Class names come from ``DIR/classes.json`` (a list, or ``{"classes": [...], "ignore_index": I}``) or
  ``DIR/classes.txt`` (one name per line). Mask value k is class k; the ignore value is 255 unless the JSON or the
  query ``ignore=I`` names another (the query wins). Any other value is an error naming the mask.

Images go through the canonical decoder (:func:`morphcache.extract.images.load_canonical_bytes` +
:func:`~morphcache.extract.images.decode_rgb`: EXIF orientation applied, alpha dropped, 16-bit reduced). Masks are
read by :func:`read_label_map` as integer maps (PIL modes ``L``, ``P``, ``I``, ``I;16``, ``1``; palette indices are
the labels, never colours). Both are resized to a square side without keeping the aspect ratio (the resized
evaluation of :mod:`morphcache.evaluate.segmentation`): images bicubic with antialiasing (exactly
:func:`morphcache.evaluate.features.prepare_images`), masks nearest neighbour (pixel-centre sampling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morphcache import registries
from morphcache.errors import BadImageError, ConfigError, MorphcacheError
from morphcache.evaluate.datasets import parse_dataset_spec
from morphcache.extract.folders import IMAGE_EXTENSIONS, is_image_name

#: Label value of pixels that count neither in the loss nor in the metrics (mmsegmentation's default).
DEFAULT_IGNORE_INDEX = 255
MASK_SUFFIXES = {".png", ".bmp", ".tif", ".tiff", ".pgm", ".gif"}
_SEG_QUERY_KEYS = ("train", "test", "seed", "ignore")
_SPLIT_NAMES = (("train", "training"), ("val", "validation", "test"))

#: ADE20K SceneParsing class names, in label order (class k is annotation value k + 1; objectInfo150).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


@dataclass(frozen=True)
class SegSample:
    """One image file and its label-map file."""

    image: Path
    mask: Path


@dataclass
class SegDataset:
    """Train / validation pairs, class names and the label conventions of their masks.

    ``reduce_zero_label``: raw mask value 0 is ignored and value k is class k - 1 (ADE20K); otherwise value k is
    class k. Either way pixels equal to ``ignore_index`` after the mapping are ignored.
    """

    train: list[SegSample]
    val: list[SegSample]
    classes: tuple[str, ...]
    ignore_index: int
    reduce_zero_label: bool
    name: str

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def read_label_map(path: str | Path) -> np.ndarray:
    """The integer label map of a mask file: ``int64 (H, W)``; palette images give their indices, never colours.

    Raises :class:`MorphcacheError` for unreadable files and for colour / alpha masks (not label maps)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise MorphcacheError(f"mask {path} is a mode-{im.mode} image; masks must be single-channel label "
                                      "maps (PIL mode L, P, I or I;16) whose values are class indices")
            return np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MorphcacheError(f"cannot read mask {path} ({exc}); remove or replace it and its image") from exc


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map ``(H, W)`` to ``(size, size)`` (samples the source pixel under each
    output pixel's centre, so no label value is ever invented)."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(size) + 0.5) * (h / size)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * (w / size)).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def decode_image(path: str | Path) -> np.ndarray:
    """uint8 ``(H, W, 3)`` pixels of an image file through the canonical decoder."""
    from morphcache.extract.images import decode_rgb, load_canonical_bytes

    try:
        data, _ = load_canonical_bytes(path)
    except BadImageError as exc:
        raise MorphcacheError(f"cannot decode image {path} ({exc}); remove or replace it and its mask") from exc
    return np.array(decode_rgb(data))  # a writable copy (torch refuses read-only buffers)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> uint8 ``(size, size, 3)``, resized as the feature extractor resizes (bicubic,
    antialiased when shrinking)."""
    import torch

    from morphcache.evaluate.features import prepare_images

    x = prepare_images(image[None], size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[0]
    return x.permute(1, 2, 0).mul(255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def map_labels(raw: np.ndarray, dataset: SegDataset, path: str | Path) -> np.ndarray:
    """Raw mask values -> class indices ``0..C-1`` or ``dataset.ignore_index`` (int64, same shape)."""
    c, ignore = dataset.n_classes, dataset.ignore_index
    if dataset.reduce_zero_label:
        bad = raw[(raw < 0) | (raw > c)]
        labels = np.where(raw == 0, ignore, raw - 1)
    else:
        bad = raw[((raw < 0) | (raw >= c)) & (raw != ignore)]
        labels = raw
    if bad.size:
        allowed = f"0..{c}" if dataset.reduce_zero_label else f"0..{c - 1} or the ignore value {ignore}"
        raise MorphcacheError(f"mask {path} holds value {int(bad[0])}, not a class of this dataset ({allowed}); "
                              "fix the mask or the class list")
    return labels


def load_pair(sample: SegSample, dataset: SegDataset, image_size: int,
              label_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image ``(image_size, image_size, 3)``, int64 labels ``(label_size, label_size)``) of one sample."""
    image = decode_image(sample.image)
    raw = read_label_map(sample.mask)
    if raw.shape != image.shape[:2]:
        raise MorphcacheError(f"mask {sample.mask} is {raw.shape[1]}x{raw.shape[0]} but image {sample.image} is "
                              f"{image.shape[1]}x{image.shape[0]}; a mask must have its image's size")
    labels = map_labels(raw, dataset, sample.mask)
    return resize_image(image, image_size), resize_labels(labels, label_size)


def _files(folder: Path, suffixes) -> dict[str, Path]:
    """Files of ``folder`` by stem, with the folder rule's notion of a visible image name (hidden and AppleDouble
    files are never data)."""
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and is_image_name(p.name, frozenset(suffixes))}


def _pairs(image_dir: Path, mask_dir: Path) -> list[SegSample]:
    if not mask_dir.is_dir():
        raise MorphcacheError(f"mask folder {mask_dir} does not exist; every image folder needs its mask folder")
    images, masks = _files(image_dir, IMAGE_EXTENSIONS), _files(mask_dir, MASK_SUFFIXES)
    if not images:
        raise MorphcacheError(f"{image_dir} holds no images")
    missing = [s for s in images if s not in masks]
    if missing:
        raise MorphcacheError(f"{len(missing)} image(s) in {image_dir} have no mask in {mask_dir} (first: "
                              f"{images[missing[0]].name}); add the masks or remove the images")
    return [SegSample(images[s], masks[s]) for s in sorted(images)]


def _subset(samples: list[SegSample], n: int | None, seed: int) -> list[SegSample]:
    if n is None or n >= len(samples):
        return samples
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=n, replace=False))
    return [samples[i] for i in keep]


def _ade20k(root: Path) -> tuple[list[SegSample], list[SegSample]]:
    for base in (root, root / "ADEChallengeData2016"):
        if (base / "images" / "training").is_dir() and (base / "annotations" / "training").is_dir():
            break
    else:
        raise MorphcacheError(f"{root} is not ADE20K's released layout; point ade20k:DIR at ADEChallengeData2016/ "
                              "(with images/{training,validation}/ and annotations/{training,validation}/)")
    if not (base / "images" / "validation").is_dir():
        raise MorphcacheError(f"{base}/images/validation does not exist; the ADE20K release has both splits")
    return tuple(_pairs(base / "images" / split, base / "annotations" / split)  # type: ignore[return-value]
                 for split in ("training", "validation"))


def _read_classes(root: Path) -> tuple[tuple[str, ...], int | None]:
    js, txt = root / "classes.json", root / "classes.txt"
    if js.is_file():
        try:
            obj = json.loads(js.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MorphcacheError(f"{js} is not valid JSON ({exc}); write a list of class names") from None
        names, ignore = (obj.get("classes"), obj.get("ignore_index")) if isinstance(obj, dict) else (obj, None)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise MorphcacheError(f"{js} must hold a non-empty list of class names (or {{\"classes\": [...]}})")
        if ignore is not None and (not isinstance(ignore, int) or isinstance(ignore, bool) or ignore < 0):
            raise MorphcacheError(f"{js}: ignore_index must be a non-negative integer, got {ignore!r}")
        return tuple(names), ignore
    if txt.is_file():
        names = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise MorphcacheError(f"{txt} lists no class names; write one name per line")
        return tuple(names), None
    raise MorphcacheError(f"{root} has neither classes.json nor classes.txt; seg-folder:DIR needs the class names")


def _split_dirs(images: Path) -> tuple[Path, Path] | None:
    found = []
    for names in _SPLIT_NAMES:
        found.append(next((images / n for n in names if (images / n).is_dir()), None))
    if found[0] is None and found[1] is None:
        return None
    if found[0] is None or found[1] is None:
        raise MorphcacheError(f"{images} has a {'validation' if found[0] is None else 'training'} split folder but "
                              "not the other; use images/train + images/val (or a flat images/ folder)")
    return found[0], found[1]


def _seg_folder(root: Path, seed: int) -> tuple[list[SegSample], list[SegSample]]:
    images, masks = root / "images", root / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise MorphcacheError(f"{root} needs images/ and masks/ folders (matching file stems) for seg-folder:DIR")
    splits = _split_dirs(images)
    if splits is not None:
        return tuple(_pairs(d, masks / d.name) for d in splits)  # type: ignore[return-value]
    pairs = _pairs(images, masks)
    if len(pairs) < 2:
        raise MorphcacheError(f"{images} holds {len(pairs)} image; a train/validation split needs at least 2")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = max(1, len(pairs) // 5)
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    return [pairs[i] for i in train], [pairs[i] for i in val]


def _seg_root(spec: str) -> tuple[str, Path, dict[str, int]]:
    """(kind, existing folder, query options) of a segmentation SPEC."""
    kind, arg, params = parse_dataset_spec(spec, _SEG_QUERY_KEYS)
    if not arg:
        raise MorphcacheError(f"dataset spec {spec!r} needs a folder: {kind}:DIR")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise MorphcacheError(f"dataset folder {root} does not exist; pass {kind}:DIR with an existing folder")
    return kind, root, params


def _finish(spec: str, train, val, classes, ignore: int, reduce: bool, params: dict) -> SegDataset:
    seed = params.get("seed", 0)
    train = _subset(train, params.get("train"), seed)
    val = _subset(val, params.get("test"), seed + 1)
    return SegDataset(train, val, tuple(classes), int(ignore), reduce, spec)


@registries.datasets.register("ade20k")
def ade20k(spec: str, image_size: int = 224) -> SegDataset:
    """``ade20k:DIR``: ADE20K's released layout (``image_size`` unused: nothing is decoded here)."""
    _, root, params = _seg_root(spec)
    if "ignore" in params:
        raise MorphcacheError(f"dataset spec {spec!r}: ADE20K's ignore value is fixed (annotation 0); drop ignore=")
    train, val = _ade20k(root)
    return _finish(spec, train, val, ADE20K_CLASSES, DEFAULT_IGNORE_INDEX, True, params)


@registries.datasets.register("seg-folder")
def seg_folder(spec: str, image_size: int = 224) -> SegDataset:
    """``seg-folder:DIR``: ``DIR/images`` + ``DIR/masks`` and a class list (``image_size`` unused)."""
    _, root, params = _seg_root(spec)
    train, val = _seg_folder(root, params.get("seed", 0))
    classes, file_ignore = _read_classes(root)
    ignore = params.get("ignore", file_ignore if file_ignore is not None else DEFAULT_IGNORE_INDEX)
    if ignore < len(classes):
        raise MorphcacheError(f"ignore value {ignore} of {spec!r} is a class index (0..{len(classes) - 1}); "
                              "pass ignore=I with I >= the number of classes")
    return _finish(spec, train, val, classes, ignore, False, params)
