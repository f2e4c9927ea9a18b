"""The image manifest: one row per source image (path, content hash, size, label, status).

Rows are in the manifest's deterministic order; image ``i`` owns store rows ``i*V .. i*V+V-1``. ``status`` starts at
:data:`STATUS_PENDING` (built, not yet processed); extraction sets :data:`STATUS_OK` or a bad-image reason code from
:data:`STATUS_REASONS`. Images with a non-OK status keep zero rows in the store and are never served.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

STATUS_OK = 0
STATUS_CORRUPT = 1  # unreadable / corrupt data stream
STATUS_TRUNCATED = 2  # the file ends before the image data does
STATUS_EMPTY = 3  # zero-byte file
STATUS_NOT_IMAGE = 4  # no known image format
STATUS_TOO_LARGE = 5  # more than morphcache.extract.images.MAX_PIXELS pixels
STATUS_MISSING = 7  # the file does not exist (or cannot be opened)
STATUS_UNSUPPORTED = 8  # a readable image in a pixel format with no defined RGB mapping (e.g. float TIFF)
STATUS_NO_IMAGE = 9  # tar shards: a sample (key) with no image member
STATUS_DUPLICATE_KEY = 10  # tar shards: a key seen again in the same shard (the first sample is kept)
STATUS_BAD_SHARD = 11  # tar shards: an empty or unreadable shard (one row names it)
STATUS_PENDING = 255  # not processed yet

#: Reason code -> short human-readable reason (stored codes are stable across versions).
STATUS_REASONS: dict[int, str] = {
    STATUS_OK: "ok",
    STATUS_CORRUPT: "corrupt or unreadable image data",
    STATUS_TRUNCATED: "truncated file",
    STATUS_EMPTY: "empty file",
    STATUS_NOT_IMAGE: "not an image",
    STATUS_TOO_LARGE: "too many pixels",
    STATUS_MISSING: "missing file",
    STATUS_UNSUPPORTED: "unsupported pixel format",
    STATUS_NO_IMAGE: "sample has no image",
    STATUS_DUPLICATE_KEY: "duplicate key in shard",
    STATUS_BAD_SHARD: "empty or unreadable shard",
    STATUS_PENDING: "not processed yet",
}


_ESCAPED = re.compile(r"\\(\\|x[89a-f][0-9a-f])")
_NEEDS_ESCAPE = re.compile(r"\\(?=\\|x[89a-f][0-9a-f]|[\udc80-\udcff])|[\udc80-\udcff]")


def path_to_text(path: str) -> str:
    """A file name as the file system returned it (``os.fsdecode``: bytes that are not UTF-8 appear as surrogate
    escapes U+DC80..U+DCFF) -> valid Unicode text for the store and for messages, reversibly.

    Each undecodable byte is written ``\\xHH`` (lower-case hex, 80..ff), as Python prints it; a backslash that would
    otherwise read as such an escape (followed by ``\\``, ``xHH`` or an undecodable byte) is doubled. Every other
    name (every valid UTF-8 name without such a backslash) is returned unchanged, so stores written before this rule
    read the same.
    Inverse: :func:`path_from_text`.
    """
    if "\\" not in path and not any("\udc80" <= ch <= "\udcff" for ch in path):
        return path
    return _NEEDS_ESCAPE.sub(lambda m: "\\\\" if m.group() == "\\" else f"\\x{ord(m.group()) - 0xDC00:02x}", path)


def path_from_text(text: str) -> str:
    """Inverse of :func:`path_to_text`: the stored text -> the name to open (``os.fsencode`` gives its bytes)."""
    if "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)), text)


def path_bytes(path: str) -> bytes:
    """The file name's bytes on disk (UTF-8 with surrogate escapes restored), for hashing."""
    return path.encode("utf-8", "surrogateescape")


def _as(a, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=dtype))


@dataclass
class ImageTable:
    """Columns of the manifest; all arrays have length N.

    - ``path``: str (N,), relative to the dataset root (forward slashes), as the file system names it (a name that
      is not UTF-8 keeps surrogate escapes; the store holds :func:`path_to_text` of it);
    - ``hash``: str (N,), hex blake2b-128 of the file bytes ("" if the file could not be read);
    - ``height``, ``width``: int32 (N,), size after EXIF orientation (0 when the header is unreadable);
    - ``label``: int32 (N,), class index into ``class_names`` or -1 when unlabeled;
    - ``status``: uint8 (N,), see :data:`STATUS_REASONS`.
    """

    path: np.ndarray
    hash: np.ndarray
    height: np.ndarray
    width: np.ndarray
    label: np.ndarray
    status: np.ndarray
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = _as(self.path, str)
        self.hash = _as(self.hash, str)
        self.height = _as(self.height, np.int32)
        self.width = _as(self.width, np.int32)
        self.label = _as(self.label, np.int32)
        self.status = _as(self.status, np.uint8)
        self.class_names = [str(c) for c in self.class_names]
        n = len(self.path)
        for name in ("hash", "height", "width", "label", "status"):
            col = getattr(self, name)
            if col.ndim != 1 or len(col) != n:
                raise ValueError(f"ImageTable column {name!r} has shape {col.shape}, expected ({n},)")

    @classmethod
    def empty(cls) -> "ImageTable":
        return cls(path=[], hash=[], height=[], width=[], label=[], status=[])

    def __len__(self) -> int:
        return len(self.path)

    @property
    def size(self) -> np.ndarray:
        """int32 (N, 2): (height, width) per image, the store's ``images/size`` layout."""
        return np.stack([self.height, self.width], axis=1) if len(self) else np.zeros((0, 2), np.int32)

    @property
    def labels_known(self) -> bool:
        """True when every image has a class label (label >= 0)."""
        return len(self) > 0 and bool((self.label >= 0).all())

    def subset(self, idx) -> "ImageTable":
        """The rows ``idx`` (int indices, a slice or a boolean mask), class names kept."""
        if isinstance(idx, slice):
            sel = idx
        else:
            sel = np.asarray(idx)
            if sel.dtype != bool:
                sel = sel.astype(np.int64)
        return ImageTable(
            path=self.path[sel],
            hash=self.hash[sel],
            height=self.height[sel],
            width=self.width[sel],
            label=self.label[sel],
            status=self.status[sel],
            class_names=list(self.class_names),
        )

    def fingerprint(self) -> str:
        """Hex blake2b-128 over (path, content hash, label) of every row in order, plus the class names.

        Sizes and statuses are excluded: they are derived from the bytes (which the content hash covers) and the
        status changes as extraction proceeds.
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(f"morphcache-manifest-v1 {len(self)}\n".encode())
        for name in self.class_names:
            h.update(b"c\x00" + path_bytes(name) + b"\n")
        for p, c, lab in zip(self.path.tolist(), self.hash.tolist(), self.label.tolist()):
            h.update(path_bytes(p) + f"\x00{c}\x00{lab}\n".encode())
        return h.hexdigest()

    def status_counts(self) -> dict[str, int]:
        """Reason name -> number of images with that status (only statuses that occur)."""
        codes, counts = np.unique(self.status, return_counts=True)
        return {STATUS_REASONS.get(int(c), f"status {int(c)}"): int(n) for c, n in zip(codes, counts)}
