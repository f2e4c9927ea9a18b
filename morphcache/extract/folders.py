"""The ONE rule that turns an image folder into (paths, labels, classes): extraction's manifest and evaluation's
``folder:DIR`` dataset both call :func:`walk_image_folder`.

Rule (decided here, documented once):

- **Images** are files whose extension is in :data:`IMAGE_EXTENSIONS` (case-insensitive). Other files are skipped
  with reason :data:`SKIP_NOT_IMAGE_NAME`; whether an image file decodes is decided later by
  :func:`morphcache.extract.images.load_canonical_bytes` (the bad-image policy of the caller: extraction records the
  reason under ``--on-bad-image skip`` or stops under ``fail``; evaluation skips the file with its reason).
- **Hidden** files and folders (name starting with ``.``: ``.ipynb_checkpoints/``, ``.DS_Store``, macOS
  AppleDouble files ``._photo.jpg``) are skipped with reason :data:`SKIP_HIDDEN`; a hidden folder is not entered.
- **Symbolic links** are followed, to files and to folders; a folder reached twice (a link loop, or two links to
  one folder) is walked once. A link whose target does not exist is skipped with reason :data:`SKIP_BROKEN_LINK`.
- **Labels.** A folder holding image files directly is unlabeled: every image below it (recursively) gets label
  -1. Otherwise each immediate sub-folder holding images (recursively) is a class, numbered in sorted name order
  as torchvision's ``ImageFolder`` numbers them; a sub-folder holding no image is not a class (skipped with reason
  :data:`SKIP_EMPTY_CLASS`). ``classes=`` imposes a given class list (evaluation's test split uses the train
  split's numbering); then images directly in the root are skipped with reason :data:`SKIP_OUTSIDE_CLASS`.
- **Order.** Classes in sorted order, each class's files sorted by relative path, so the order does not depend on
  the file system.
- **Names** are kept exactly as the file system returns them (``os.fsdecode``): a name that is not valid UTF-8
  keeps its bytes as surrogate escapes and opens again unchanged; the store writes it through
  :func:`morphcache.store.image_table.path_to_text`. Class names are display text
  (:func:`~morphcache.store.image_table.path_to_text` of the folder name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from morphcache.store.image_table import path_to_text

#: Extensions of image files (lower case); every format :mod:`morphcache.extract.images` decodes.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"})

SKIP_HIDDEN = "hidden file or folder"
SKIP_NOT_IMAGE_NAME = "not an image file name"
SKIP_BROKEN_LINK = "broken symbolic link"
SKIP_EMPTY_CLASS = "class folder without images"
SKIP_OUTSIDE_CLASS = "image outside a class folder"


@dataclass
class FolderListing:
    """What :func:`walk_image_folder` found.

    ``paths``: image paths relative to the root, ``/``-separated; ``labels``: int per path (-1 = unlabeled);
    ``classes``: class names indexed by label; ``skipped``: ``(relative path, reason)`` of every file or folder
    left out, in walk order.
    """

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def normalize_extensions(extensions) -> frozenset[str]:
    """``{'JPG', '.png'}`` -> ``frozenset({'.jpg', '.png'})``."""
    return frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def is_hidden(name: str) -> bool:
    """Dotfiles, AppleDouble ``._*`` files and hidden folders such as ``.ipynb_checkpoints`` are never data."""
    return name.startswith(".")


def is_image_name(name: str, extensions: frozenset[str]) -> bool:
    """A visible file name with one of ``extensions`` (lower-case, with the dot)."""
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in extensions


def _walk(folder: Path, prefix: str, extensions: frozenset[str], skipped: list[tuple[str, str]]) -> list[str]:
    """Image paths below ``folder`` (recursive), as ``prefix + relative path``, sorted; ``skipped`` grows."""
    found: list[str] = []
    seen: set[str] = set()  # real paths already walked: symlinked folders are followed once, loops are cut
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        rel = Path(dirpath).relative_to(folder).as_posix()
        base = prefix + ("" if rel == "." else rel + "/")
        for d in sorted(dirnames):
            if is_hidden(d):
                skipped.append((base + d + "/", SKIP_HIDDEN))
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        # os.walk lists a broken link among the files (and a link to a folder among the folders)
        for f in sorted(filenames):
            if is_hidden(f):
                skipped.append((base + f, SKIP_HIDDEN))
            elif not os.path.exists(os.path.join(dirpath, f)):
                skipped.append((base + f, SKIP_BROKEN_LINK))
            elif is_image_name(f, extensions):
                found.append(base + f)
            else:
                skipped.append((base + f, SKIP_NOT_IMAGE_NAME))
    return sorted(found)


def holds_images_directly(root: str | os.PathLike, extensions=IMAGE_EXTENSIONS) -> bool:
    """True when ``root`` holds at least one (non-hidden) image file directly, i.e. is an unlabeled folder."""
    exts = normalize_extensions(extensions)
    return any(is_image_name(e.name, exts) and e.is_file() for e in os.scandir(root))


def walk_image_folder(
    root: str | os.PathLike,
    *,
    extensions=IMAGE_EXTENSIONS,
    classes: list[str] | None = None,
) -> FolderListing:
    """List the images below ``root`` under the rule in the module docstring.

    ``classes``: the class names to number (label = position); a sub-folder with images whose name is not in it
    is still listed, under a label past the given ones, so the caller can name it (evaluation refuses such a test
    split). Returns a :class:`FolderListing`; raises ``OSError`` only if ``root`` itself cannot be listed.
    """
    root = Path(root)
    exts = normalize_extensions(extensions)
    out = FolderListing()
    if classes is None and holds_images_directly(root, exts):
        out.paths = _walk(root, "", exts, out.skipped)
        out.labels = [-1] * len(out.paths)
        return out
    subdirs: list[str] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if is_hidden(entry.name):
            out.skipped.append((entry.name + ("/" if entry.is_dir() else ""), SKIP_HIDDEN))
        elif entry.is_dir():
            subdirs.append(entry.name)
        elif not os.path.exists(entry.path):
            out.skipped.append((entry.name, SKIP_BROKEN_LINK))
        else:
            out.skipped.append((entry.name, SKIP_NOT_IMAGE_NAME if not is_image_name(entry.name, exts)
                                else SKIP_OUTSIDE_CLASS))
    per_class: dict[str, list[str]] = {}
    for name in subdirs:
        files = _walk(root / name, name + "/", exts, out.skipped)
        if files:
            per_class[path_to_text(name)] = files
        else:
            out.skipped.append((name + "/", SKIP_EMPTY_CLASS))
    out.classes = list(classes) if classes is not None else sorted(per_class)
    extra = sorted(set(per_class) - set(out.classes))
    index = {c: i for i, c in enumerate(out.classes + extra)}
    for name in out.classes + extra:
        files = per_class.get(name, [])
        out.paths += files
        out.labels += [index[name]] * len(files)
    out.classes += extra
    return out
