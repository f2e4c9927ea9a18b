"""WebDataset tar shards as extraction input: shard discovery, the sample index, random-access member reads.

Format (as img2dataset and WebDataset write it): a shard is a plain (uncompressed) tar; a **sample** is a run of
consecutive members sharing a **key** (the member name up to the first dot of its base name, directories kept),
e.g. ``000123.jpg``, ``000123.cls``, ``000123.json``. A sample's image is its first member whose extension (after
the key) is an image extension (``jpg``, ``png``, ``webp``, ... as for loose files); its label is the ``.cls``
member (text) or, with ``label_key``, that field of the ``.json`` member. Labels are numbered as in image lists:
integers are used as given, otherwise names are numbered in sorted order; a sample without one gets -1.

Sources (``--data``): a brace pattern (``'shards/{00000..00099}.tar'``, expanded by the ``braceexpand`` package in
its own order), a single ``.tar`` file, a folder whose files are ``.tar`` shards (sorted by name, not recursive),
or a text list of shard paths (one per line, ``#`` comments, relative to the list's folder). The dataset root is
the shards' common folder; shards are recorded relative to it (so ``--image-root`` can move them).

Order: shards in source order, samples in tar order: deterministic, and the same as a folder whose sorted file
names follow the same order.

Each row records (shard, data offset, size) of its image member, so replay reads the bytes with one ``pread``
and no scan (:class:`ShardReader`). Problems found while indexing get a row with a reason code
(``index_status``) that extraction reports like a bad loose file, naming shard and key:

- truncated shard: members whose data runs past the end of the file are ``STATUS_TRUNCATED``; a shard cut inside
  a header or between members (no end-of-archive blocks follow the last member) gets one ``STATUS_TRUNCATED`` row
  named ``<shard>@<byte offset>`` (samples before the cut are kept);
- a sample with no image member: ``STATUS_NO_IMAGE``; an image member that is not an image is found by the
  canonical decoder (``STATUS_NOT_IMAGE``);
- a key seen again in the same shard: the first sample is kept, the later one is ``STATUS_DUPLICATE_KEY``;
- an empty, missing or unreadable shard: one row named after the shard (``STATUS_BAD_SHARD`` /
  ``STATUS_MISSING``).

A changed shard is refused: its size is checked against the recorded one when a process first reads from it,
and every member read is checked against its content hash.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphcache.errors import MorphcacheError
from morphcache.store.image_table import (
    STATUS_BAD_SHARD,
    STATUS_DUPLICATE_KEY,
    STATUS_MISSING,
    STATUS_NO_IMAGE,
    STATUS_PENDING,
    STATUS_TRUNCATED,
    ImageTable,
)

#: Shard files one process keeps open at most (least recently used are closed first).
DEFAULT_MAX_OPEN_SHARDS = 64

#: Show a progress bar when at least this many shards are indexed (``progress=None``).
PROGRESS_MIN_SHARDS = 20


# ---------------------------------------------------------------------------------------------- the table
def _as(a, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=dtype))


@dataclass
class TarImageTable(ImageTable):
    """An :class:`ImageTable` whose images are tar shard members; extra columns of length N:

    - ``shard``: int32, index into ``shards``;
    - ``offset``: int64, byte offset of the image member's data in its shard (-1 when there is none);
    - ``member_size``: int64, bytes of the image member;
    - ``index_status``: uint8, 0 or the reason code found while indexing (extraction reports it);

    and per shard ``shards`` (path relative to the dataset root, posix) and ``shard_sizes`` (bytes; -1 missing).
    ``path`` is ``<shard>/<member name>`` (``<shard>/<key>`` for a sample without image, ``<shard>/<key>@<byte
    offset>`` for a repeated key, ``<shard>`` or ``<shard>@<byte offset>`` for a shard-level problem).
    """

    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    member_size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    index_status: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    shards: list[str] = field(default_factory=list)
    shard_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shard = _as(self.shard, np.int32)
        self.offset = _as(self.offset, np.int64)
        self.member_size = _as(self.member_size, np.int64)
        self.index_status = _as(self.index_status, np.uint8)
        self.shards = [str(s) for s in self.shards]
        self.shard_sizes = [int(s) for s in self.shard_sizes]
        n = len(self.path)
        for name in ("shard", "offset", "member_size", "index_status"):
            col = getattr(self, name)
            if col.ndim != 1 or len(col) != n:
                raise ValueError(f"TarImageTable column {name!r} has shape {col.shape}, expected ({n},)")
        if len(self.shard_sizes) != len(self.shards):
            raise ValueError(f"TarImageTable has {len(self.shards)} shards but {len(self.shard_sizes)} shard sizes")

    def subset(self, idx) -> "TarImageTable":
        base = super().subset(idx)
        sel = idx if isinstance(idx, slice) else np.asarray(idx)
        if not isinstance(sel, slice) and sel.dtype != bool:
            sel = sel.astype(np.int64)
        return TarImageTable(**{k: getattr(base, k) for k in ("path", "hash", "height", "width", "label", "status",
                                                               "class_names")},
                             shard=self.shard[sel], offset=self.offset[sel], member_size=self.member_size[sel],
                             index_status=self.index_status[sel], shards=list(self.shards),
                             shard_sizes=list(self.shard_sizes))


# ---------------------------------------------------------------------------------------------- sources
def _brace(source: str) -> bool:
    return "{" in source and "}" in source


def is_tar_source(source: str | os.PathLike) -> bool:
    """True when ``--data`` names tar shards: a brace pattern or a ``.tar`` file, a folder holding ``.tar`` files
    and no images directly, or a text list whose first entry is a ``.tar`` path."""
    from morphcache.extract.folders import IMAGE_EXTENSIONS

    text = str(source)
    if _brace(text) and not Path(text).expanduser().exists():
        return True
    src = Path(text).expanduser()
    if src.suffix.lower() == ".tar":
        return True
    if src.is_dir():
        names = [e.name for e in os.scandir(src) if e.is_file() and not e.name.startswith(".")]
        return any(n.lower().endswith(".tar") for n in names) and not any(
            os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS for n in names)
    if src.is_file():
        first = next(iter(_list_entries(src)), None)
        return first is not None and first.lower().endswith(".tar")
    return False


def _list_entries(list_file: Path) -> list[str]:
    try:
        with open(list_file, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f.read(1 << 20).splitlines()]
    except (OSError, UnicodeDecodeError):
        return []
    return [x for x in lines if x and not x.startswith("#")]


def expand_shards(source: str | os.PathLike) -> tuple[list[Path], Path]:
    """(absolute shard paths in source order, dataset root) for a tar-shard ``--data`` value.

    Raises :class:`MorphcacheError` when nothing matches or no listed shard exists.
    """
    from braceexpand import braceexpand

    text = str(source)
    src = Path(text).expanduser()
    if src.is_dir():
        shards = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() == ".tar" and not p.name.startswith("."))
    elif src.is_file() and src.suffix.lower() != ".tar":
        entries = _list_entries(src)
        bad = [e for e in entries if not e.lower().endswith(".tar")]
        if bad:
            raise MorphcacheError(f"{source}: {bad[0]} is not a .tar shard; a shard list holds only .tar paths")
        shards = [Path(e).expanduser() if Path(e).expanduser().is_absolute() else src.parent / e for e in entries]
    else:
        shards = [Path(p).expanduser() for p in braceexpand(text)] if _brace(text) else [src]
    shards = [Path(os.path.abspath(p)) for p in shards]
    if not shards:
        raise MorphcacheError(f"{source}: no .tar shards found; pass 'dir/{{00000..00009}}.tar', a folder of .tar files "
                              "or a list of shard paths")
    seen: set[Path] = set()
    for p in shards:
        if p in seen:
            raise MorphcacheError(f"{source}: shard {p} is given twice; remove the duplicate")
        seen.add(p)
    if not any(p.is_file() for p in shards):
        raise MorphcacheError(f"{source}: none of the {len(shards)} tar shards exist (first: {shards[0]})")
    root = Path(os.path.commonpath([str(p.parent) for p in shards])) if not src.is_dir() else Path(os.path.abspath(src))
    return shards, root


# ---------------------------------------------------------------------------------------------- indexing
@dataclass
class _Row:
    path: str
    offset: int = -1
    size: int = 0
    index_status: int = 0
    hash: str = ""
    height: int = 0
    width: int = 0
    label: str | None = None


def _split(name: str) -> tuple[str, str]:
    """WebDataset (key, extension): the extension starts at the first dot of the base name."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower() if dot else ""


def _scan(path: Path) -> tuple[list[tuple[str, int, int]], str | None, int]:
    """(regular members (name, data offset, size) in tar order, error text or None, offset where it stopped)."""
    members: list[tuple[str, int, int]] = []
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        return members, f"{type(e).__name__}: {e}", 0
    with tf:
        while True:  # next() returns the member tarfile.open read first, then goes on
            try:
                m = tf.next()
            except (tarfile.TarError, OSError) as e:
                return members, f"{type(e).__name__}: {e}", tf.offset
            if m is None:  # tarfile also ends quietly at a partial header: the end-of-archive blocks must follow
                tail = os.pread(tf.fileobj.fileno(), 1024, tf.offset) if hasattr(tf.fileobj, "fileno") else b""
                ok = len(tail) == 1024 and not any(tail)
                return members, None if ok else "no end-of-archive blocks after the last member", tf.offset
            if m.isfile():
                members.append((m.name, m.offset_data, m.size))


def _read(f, offset: int, size: int) -> bytes:
    return os.pread(f.fileno(), size, offset)


def index_shard(path: Path, rel: str, label_key: str | None, image_exts: frozenset[str]) -> tuple[int, list[_Row]]:
    """(shard size in bytes or -1, rows of its samples in tar order) for one shard; never raises for bad data."""
    from morphcache.extract.images import describe_bytes

    try:
        size = path.stat().st_size
    except OSError:
        return -1, [_Row(rel, index_status=STATUS_MISSING)]
    members, error, stop = _scan(path)
    if not members:
        return size, [_Row(rel, index_status=STATUS_BAD_SHARD)]
    # group consecutive members by key
    samples: list[tuple[str, list[tuple[str, int, int]]]] = []
    for name, off, n in members:
        key, _ = _split(name)
        if samples and samples[-1][0] == key:
            samples[-1][1].append((name, off, n))
        else:
            samples.append((key, [(name, off, n)]))
    rows: list[_Row] = []
    seen: set[str] = set()
    truncated = False
    with open(path, "rb") as f:
        for key, parts in samples:
            first_off = parts[0][1]
            if key in seen:
                rows.append(_Row(f"{rel}/{key}@{first_off}", index_status=STATUS_DUPLICATE_KEY))
                continue
            seen.add(key)
            exts = {_split(name)[1]: (name, off, n) for name, off, n in reversed(parts)}  # first wins
            image = next(((nm, o, n) for nm, o, n in parts if f".{_split(nm)[1]}" in image_exts), None)
            row = _Row(f"{rel}/{image[0]}" if image else f"{rel}/{key}")
            row.label = _label(f, exts, label_key, size)
            if image is None:
                row.index_status = STATUS_NO_IMAGE
            else:
                row.offset, row.size = image[1], image[2]
                if row.offset + row.size > size:
                    row.index_status = STATUS_TRUNCATED
                    truncated = True
                else:
                    row.hash, row.height, row.width = describe_bytes(_read(f, row.offset, row.size), path / image[0])
            rows.append(row)
    if error is not None and not truncated:
        rows.append(_Row(f"{rel}@{stop}", index_status=STATUS_TRUNCATED))
    return size, rows


def _label(f, exts: dict, label_key: str | None, size: int) -> str | None:
    """The sample's raw label text: the ``label_key`` field of its .json member, else its .cls member."""
    if label_key is not None:
        member = exts.get("json")
        if member is None or member[1] + member[2] > size:
            return None
        try:
            value = json.loads(_read(f, member[1], member[2]).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        value = value.get(label_key) if isinstance(value, dict) else None
        return None if value is None or isinstance(value, (dict, list)) else str(value).strip() or None
    member = exts.get("cls")
    if member is None or member[1] + member[2] > size:
        return None
    try:
        return _read(f, member[1], member[2]).decode("utf-8").strip() or None
    except UnicodeDecodeError:
        return None


def number_labels(raw: list[str | None]) -> tuple[list[int], list[str]]:
    """(labels, class names): integer labels as given (no names), otherwise names numbered in sorted order;
    None -> -1. Raises :class:`MorphcacheError` for a negative integer label."""
    given = [x for x in raw if x is not None]
    ints = True
    for x in given:
        try:
            int(x)
        except ValueError:
            ints = False
            break
    if ints:
        labels = [int(x) if x is not None else -1 for x in raw]
        if any(lab < -1 for lab in labels):
            raise MorphcacheError(f"tar shard labels must be >= 0 (got {min(labels)})")
        return labels, []
    classes = sorted(set(given))
    index = {c: i for i, c in enumerate(classes)}
    return [index[x] if x is not None else -1 for x in raw], classes


def build_tar_manifest(source: str | os.PathLike, *, label_key: str | None = None, extensions=None,
                       workers: int = 4, progress: bool | None = None) -> tuple[TarImageTable, Path]:
    """The manifest of tar shards ``source`` and the dataset root (see the module docstring for the rules).

    ``workers`` threads index shards (one shard per thread at a time, so at most ``workers`` shard files are open).
    Every row has status ``STATUS_PENDING``. Raises :class:`MorphcacheError` when no shard exists or no sample
    is found in any shard.
    """
    from morphcache.extract.folders import IMAGE_EXTENSIONS, normalize_extensions
    from morphcache.progress import map_with_progress

    exts = normalize_extensions(extensions or IMAGE_EXTENSIONS)
    shards, root = expand_shards(source)
    rels = [Path(os.path.relpath(p, root)).as_posix() for p in shards]
    show = len(shards) >= PROGRESS_MIN_SHARDS if progress is None else progress
    results = map_with_progress(lambda a: index_shard(a[0], a[1], label_key, exts), zip(shards, rels), workers, show,
                                "index shards", "shards")
    rows = [(s, row) for s, (_, rs) in enumerate(results) for row in rs]
    if not any(row.index_status == 0 for _, row in rows):
        raise MorphcacheError(f"{source}: no image samples found in {len(shards)} tar shard(s); WebDataset samples are "
                              "members sharing a key, e.g. 000001.jpg + 000001.cls")
    labels, classes = number_labels([row.label for _, row in rows])
    table = TarImageTable(
        path=[row.path for _, row in rows], hash=[row.hash for _, row in rows],
        height=[row.height for _, row in rows], width=[row.width for _, row in rows], label=labels,
        status=[STATUS_PENDING] * len(rows), class_names=classes,
        shard=[s for s, _ in rows], offset=[row.offset for _, row in rows], member_size=[row.size for _, row in rows],
        index_status=[row.index_status for _, row in rows], shards=rels, shard_sizes=[size for size, _ in results],
    )
    return table, root


# ---------------------------------------------------------------------------------------------- random access
class ShardReader:
    """Reads tar members by (shard path, offset, size) with one ``pread``; keeps at most ``max_open`` shard files
    open (least recently used closed first), so thousands of shards never exhaust file descriptors. If opening
    hits the process's descriptor limit anyway (EMFILE), every cached handle is closed and the open retried once.
    Thread-safe; picklable (handles are not carried across).
    """

    def __init__(self, max_open: int = DEFAULT_MAX_OPEN_SHARDS) -> None:
        if max_open < 1:
            raise MorphcacheError(f"max_open={max_open}: must be at least 1")
        self.max_open = int(max_open)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])

    @property
    def n_open(self) -> int:
        return len(self._fds)

    def _open(self, path: str) -> int:
        import errno

        try:
            return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not self._fds:
                raise
        self._close_all()
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def pread(self, path: str | os.PathLike, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of ``path`` (fewer at the end of the file); OSError when unreadable."""
        key = str(path)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = self._open(key)
                self._fds[key] = fd
                while len(self._fds) > self.max_open:
                    os.close(self._fds.popitem(last=False)[1])
            else:
                self._fds.move_to_end(key)
            return os.pread(fd, size, offset)

    def _close_all(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def close(self) -> None:
        with self._lock:
            self._close_all()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order
        try:
            self._close_all()
        except Exception:
            pass


class TarMembers:
    """Canonical bytes of a :class:`TarImageTable`'s rows, read by (shard, offset, size) through
    :func:`morphcache.extract.images.canonicalize_stored_bytes` (the loose files' hash check and canonicalization).

    Args:
        root: dataset root the table's shard paths are relative to.
        table: the store's :class:`TarImageTable`.
        max_open: shard files kept open (:class:`ShardReader`).
    """

    def __init__(self, root: str | os.PathLike, table: TarImageTable, max_open: int = DEFAULT_MAX_OPEN_SHARDS) -> None:
        self.root = Path(root)
        self.table = table
        self.reader = ShardReader(max_open)
        self._checked: set[int] = set()
        self._check_lock = threading.Lock()

    def shard_path(self, s: int) -> Path:
        return self.root / self.table.shards[s]

    def _check_shard(self, s: int, name: Path) -> None:
        """Refuse a shard whose size differs from the recorded one (once per shard per process)."""
        from morphcache.extract.images import bad_image

        if s in self._checked:
            return
        path = self.shard_path(s)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise bad_image(name, STATUS_MISSING, f"tar shard {path}: {type(e).__name__}") from None
        recorded = self.table.shard_sizes[s]
        if recorded >= 0 and size != recorded:
            raise MorphcacheError(f"{path}: tar shard changed since the store was extracted ({size} bytes, recorded "
                                  f"{recorded}); restore the shard or extract into a new --out store")
        with self._check_lock:
            self._checked.add(s)

    def read_raw(self, i: int) -> bytes:
        """The image member bytes of row ``i`` as stored in the shard (no check); BadImageError for rows that
        indexing marked bad or a missing shard."""
        from morphcache.extract.images import bad_image

        t = self.table
        name = self.root / str(t.path[i])
        code = int(t.index_status[i])
        s = int(t.shard[i])
        if code:
            detail = {STATUS_TRUNCATED: "the tar shard ends inside this member or header"}.get(code, f"tar shard {self.shard_path(s)}")
            raise bad_image(name, code, detail)
        self._check_shard(s, name)
        size = int(t.member_size[i])
        try:
            data = self.reader.pread(self.shard_path(s), int(t.offset[i]), size)
        except OSError as e:
            raise bad_image(name, STATUS_MISSING, f"tar shard: {type(e).__name__}") from None
        if len(data) != size:
            raise bad_image(name, STATUS_TRUNCATED, f"{len(data)} of {size} bytes in the tar shard")
        return data

    def load(self, i: int, expected_hash: str, *, verify: bool = True) -> tuple[bytes, tuple[int, int]]:
        """Canonical bytes and (h, w) of row ``i``; a member whose hash differs from ``expected_hash`` is refused."""
        from morphcache.extract.images import canonicalize_stored_bytes

        return canonicalize_stored_bytes(self.read_raw(i), self.root / str(self.table.path[i]), expected_hash,
                                         verify=verify, what="tar member")

    def close(self) -> None:
        self.reader.close()


# ---------------------------------------------------------------------------------------------- store arrays
#: Arrays a tar-backed store adds (plain zarr reads them): per image under ``images/``, per shard under ``shards/``.
TAR_IMAGE_ARRAYS = ("images/shard", "images/offset", "images/member_size", "images/index_status")
TAR_SHARD_ARRAYS = ("shards/path", "shards/size")


def create_tar_arrays(root, table: TarImageTable) -> None:
    """Write the tar columns of ``table`` into the new store group ``root`` (zarr v3)."""
    N, S = len(table), len(table.shards)
    img = root["images"]
    whole = (max(N, 1),)
    for name, dtype in (("shard", "int32"), ("offset", "int64"), ("member_size", "int64"), ("index_status", "uint8")):
        arr = img.create_array(name, shape=(N,), dtype=dtype, chunks=whole, dimension_names=("image",))
        if N:
            arr[:] = getattr(table, name)
    grp = root.create_group("shards")
    path = grp.create_array("path", shape=(S,), dtype=str, chunks=(max(S, 1),), dimension_names=("shard",))
    size = grp.create_array("size", shape=(S,), dtype="int64", chunks=(max(S, 1),), dimension_names=("shard",))
    if S:
        path[:] = np.asarray(table.shards, dtype=object).astype(str)
        size[:] = np.asarray(table.shard_sizes, dtype=np.int64)


def check_tar_arrays(path: Path, group, n_images: int) -> None:
    """A tar-backed store has every tar array with the right length, else a one-line StoreError."""
    from morphcache.errors import StoreError

    lengths = {}
    for name in TAR_IMAGE_ARRAYS + TAR_SHARD_ARRAYS:
        try:
            lengths[name] = group[name].shape
        except Exception:  # KeyError, or zarr errors for half-deleted metadata
            raise StoreError(f"{path}: truncated store, array '{name}' is missing; delete it and re-run extract") from None
    for name in TAR_IMAGE_ARRAYS:
        if lengths[name] != (n_images,):
            raise StoreError(f"{path}: array '{name}' has shape {lengths[name]}, spec requires ({n_images},); the store is damaged")
    if lengths["shards/size"] != lengths["shards/path"]:
        raise StoreError(f"{path}: arrays 'shards/path' and 'shards/size' differ in length; the store is damaged")


def tar_table_from_store(group, base: ImageTable) -> TarImageTable:
    """``base`` (the store's image columns) with the tar columns read from the store group."""
    cols = {k: getattr(base, k) for k in ("path", "hash", "height", "width", "label", "status", "class_names")}
    return TarImageTable(
        **cols,
        shard=np.asarray(group["images/shard"][:]), offset=np.asarray(group["images/offset"][:]),
        member_size=np.asarray(group["images/member_size"][:]),
        index_status=np.asarray(group["images/index_status"][:]),
        shards=np.asarray(group["shards/path"][:]).astype(object).astype(str).tolist(),
        shard_sizes=np.asarray(group["shards/size"][:]).astype(np.int64).tolist(),
    )
