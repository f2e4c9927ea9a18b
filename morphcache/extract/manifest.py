"""Build the image manifest (:class:`~morphcache.store.image_table.ImageTable`) from a folder or a file list.

Sources:

- **A folder**, listed by :func:`morphcache.extract.folders.walk_image_folder` (the one folder rule, shared with
  evaluation): unlabeled when it holds images directly, else one class per sub-folder holding images, numbered in
  sorted name order; hidden files and folders and non-image files are left out; symbolic links are followed.
- **A text file** (any file that is not a folder, read by :func:`read_list_lines`: UTF-8 with or without a
  byte-order mark or UTF-16 with one, any line ending): one path per line, optionally followed by a tab and a
  label; blank lines and lines starting with ``#`` are skipped. Relative paths are resolved against the list's
  folder, which is the root. Integer labels are used as given; otherwise label names are numbered in sorted
  order. Rows keep the list's order (the list is the user's explicit order).

Each row gets the blake2b-128 hash of the file bytes and the (height, width) read from the header only (after
EXIF orientation, matching :func:`morphcache.extract.images.load_canonical_bytes`). A file whose header cannot
be read (or that is missing) keeps size (0, 0) and status ``STATUS_PENDING``; extraction later marks it bad.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from morphcache.errors import MorphcacheError
from morphcache.extract.folders import IMAGE_EXTENSIONS, normalize_extensions, walk_image_folder
from morphcache.extract.images import describe_bytes
from morphcache.progress import map_with_progress
from morphcache.store.image_table import STATUS_PENDING, ImageTable, path_to_text

#: Show a progress bar when at least this many files are scanned (``progress=None``).
PROGRESS_MIN_FILES = 2000

_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def read_list_lines(list_file: Path) -> list[str]:
    """The lines of a user-written text list, as users write them: UTF-8 (with or without a byte-order mark) or
    UTF-16 with a byte-order mark; LF, CRLF or CR line endings. Bytes that are not UTF-8 are kept as surrogate
    escapes, exactly as ``os.fsdecode`` names such files, so a list written by ``find`` or ``ls`` opens every file.
    Raises :class:`MorphcacheError` when the file cannot be read or is not text."""
    try:
        data = list_file.read_bytes()
    except OSError as e:
        raise MorphcacheError(f"{list_file}: cannot read the image list ({type(e).__name__}); pass a folder or a text file") from None
    encoding = "utf-8"
    for bom, enc in _BOMS:
        if data.startswith(bom):
            data, encoding = data[len(bom):], enc
            break
    try:
        text = data.decode(encoding, "surrogateescape" if encoding == "utf-8" else "strict")
    except UnicodeDecodeError:
        raise MorphcacheError(f"{list_file}: not a valid {encoding} text file; save the list as UTF-8") from None
    if "\x00" in text:
        raise MorphcacheError(f"{list_file}: holds NUL bytes, so it is not a text list (UTF-16 needs a byte-order mark); "
                              "save the list as UTF-8 text, one path per line")
    return re.split(r"\r\n|\r|\n", text)


def _parse_list(list_file: Path, root: Path) -> tuple[list[str], list[int], list[str]]:
    lines = read_list_lines(list_file)
    paths: list[str] = []
    raw_labels: list[str | None] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path_part, _, label_part = line.partition("\t")
        path_part = path_part.strip()
        p = Path(path_part)
        rel = Path(os.path.relpath(p, root)).as_posix() if p.is_absolute() else Path(os.path.normpath(p)).as_posix()
        if rel in seen:
            raise MorphcacheError(f"{list_file}:{lineno}: {path_to_text(path_part)} is listed twice (first on line {seen[rel]}); remove the duplicate")
        seen[rel] = lineno
        paths.append(rel)
        raw_labels.append(path_to_text(label_part.strip()) or None)  # label names are text (class names)
    given = [x for x in raw_labels if x is not None]
    if all(_is_int(x) for x in given):
        labels = [int(x) if x is not None else -1 for x in raw_labels]
        classes: list[str] = []
    else:
        classes = sorted(set(given))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[x] if x is not None else -1 for x in raw_labels]
    if any(lab < -1 for lab in labels):
        raise MorphcacheError(f"{list_file}: labels must be >= 0 (or absent for unlabeled images)")
    return paths, labels, classes


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _describe(path: Path) -> tuple[str, int, int]:
    """(content hash, height, width) of one file; ('', 0, 0) when unreadable, (hash, 0, 0) for a bad header."""
    try:
        data = path.read_bytes()
    except OSError:
        return "", 0, 0
    return describe_bytes(data, path)


def build_manifest(
    source: str | Path,
    *,
    extensions=IMAGE_EXTENSIONS,
    workers: int = 4,
    progress: bool | None = None,
    label_key: str | None = None,
) -> tuple[ImageTable, Path]:
    """The manifest of ``source`` (a folder, a text file list, or WebDataset tar shards: see
    :mod:`morphcache.extract.tar_shards`, which ``label_key`` is for) and the absolute dataset root.

    ``workers`` threads read and hash files (I/O and hashing release the GIL). ``progress=None`` shows a
    progress bar when at least :data:`PROGRESS_MIN_FILES` files are scanned. Returns ``(table, root)``; every
    row has status ``STATUS_PENDING``.

    Raises:
        MorphcacheError: no such folder or list, no images found, an unreadable or malformed list file (not text,
            a duplicate path, a negative label), ``label_key`` for input that is not tar shards.
    """
    from morphcache.extract.tar_shards import build_tar_manifest, is_tar_source

    if is_tar_source(source):  # WebDataset tar shards (label_key: the .json field holding the label)
        return build_tar_manifest(source, label_key=label_key, extensions=extensions, workers=workers, progress=progress)
    if label_key is not None:
        raise MorphcacheError(f"--label-key {label_key}: only for tar shard input (a .json member per sample)")
    src = Path(source).expanduser()
    if not src.exists():
        raise MorphcacheError(f"{source}: no such folder or image list; pass an image folder or a text file with one path per line")
    exts = normalize_extensions(extensions)
    if src.is_dir():
        root = src.resolve()
        listing = walk_image_folder(root, extensions=exts)
        paths, labels, classes = listing.paths, listing.labels, listing.classes
        if not paths:
            left = (f"; {len(listing.skipped)} left out, e.g. {path_to_text(listing.skipped[0][0])}: "
                    f"{listing.skipped[0][1]}" if listing.skipped else "")
            raise MorphcacheError(f"{source}: no images found (extensions {' '.join(sorted(exts))}{left}); point to a "
                                  "folder of images or class sub-folders")
    else:
        root = src.resolve().parent
        paths, labels, classes = _parse_list(src, root)
        if not paths:
            raise MorphcacheError(f"{source}: the image list is empty; write one image path per line")
        if not any((root / p).is_file() for p in paths):
            raise MorphcacheError(f"{source}: none of the {len(paths)} listed files exist (relative paths are resolved against {root})")

    show = len(paths) >= PROGRESS_MIN_FILES if progress is None else progress
    rows = map_with_progress(_describe, (root / p for p in paths), workers, show, "manifest", "files")

    table = ImageTable(
        path=paths,
        hash=[r[0] for r in rows],
        height=[r[1] for r in rows],
        width=[r[2] for r in rows],
        label=labels,
        status=[STATUS_PENDING] * len(paths),
        class_names=classes,
    )
    return table, root
