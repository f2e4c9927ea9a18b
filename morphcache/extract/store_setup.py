"""Store set-up for an extraction run: the manifest and spec (:func:`plan_store`), and creating or reopening the
store so that a failed run changes nothing (:func:`run_store`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

#: Rows per chunk the default ``--chunk-images`` aims at.
DEFAULT_CHUNK_ROWS = 256


# ---------------------------------------------------------------------------------------------- store set-up
def plan_store(opts, teacher_spec):
    """(StoreSpec, ImageTable) for ``opts`` (:class:`~morphcache.extract.pipeline.ExtractOptions`): the manifest of
    ``opts.data`` (first ``limit`` images).

    Raises:
        MorphcacheError: ``opts.data`` is no folder / list / tar source, holds no images, or its list file is
            unreadable or malformed (:func:`~morphcache.extract.manifest.build_manifest`).
    """
    from morphcache import __version__
    from morphcache.extract.manifest import build_manifest
    from morphcache.schemas import AugmentSpec, StoreSpec

    from morphcache.extract.tar_shards import TarImageTable

    table, root = build_manifest(opts.data, label_key=opts.label_key)
    if opts.limit is not None:
        table = table.subset(slice(0, opts.limit))
    spec = StoreSpec(
        image_source="tar" if isinstance(table, TarImageTable) else "files",
        teacher=teacher_spec, augment=opts.augment or AugmentSpec(), seed=opts.seed, views_per_image=opts.views,
        n_images=len(table), chunk_images=opts.chunk_images or max(1, DEFAULT_CHUNK_ROWS // opts.views), dtype=opts.dtype,
        dataset_root=str(root), dataset_fingerprint=table.fingerprint(), package_version=__version__,
    )
    return spec, table


def create_store(path: str | os.PathLike, spec, table):
    """:meth:`FeatureStore.create` under a lock on the parent folder (shards may start together).

    A store whose creation was killed (zarr metadata but no spec attribute, only morphcache's arrays) is
    removed and created again; anything else keeps FeatureStore's refusals. Runs use :func:`run_store`, which
    also undoes a failed run's new store.

    Raises:
        SpecMismatchError: ``path`` holds a store of another spec.
        StoreError: ``path`` is a non-empty non-store folder, or any other refusal of
            :meth:`~morphcache.store.feature_store.FeatureStore.create`.
    """
    with run_store(path, spec, table, remove_on_failure=False) as store:
        return store


@contextlib.contextmanager
def run_store(path: str | os.PathLike, spec, table, remove_on_failure=True):
    """Create (or open, to resume) the store at ``path`` for one extraction run and yield it.

    A failed run changes nothing: if the body raises (any exception, Ctrl-C included) and this call created the
    store (``path`` was absent or an empty folder) and no chunk of it is finished, the store is removed again,
    with any parent folders this call made, and an empty ``path`` folder is left empty. A store that existed
    before (a resume) is never removed; neither is one another process (a shard started together) still
    holds: every run holds a shared ``flock`` on the store folder while it lasts, and removal needs it exclusive.
    ``remove_on_failure``: a bool, or a callable asked at failure time (False keeps the store).

    Raises:
        SpecMismatchError, StoreError: as :func:`create_store`, before anything is yielded.
    """
    from morphcache.store.feature_store import ATTR_KEY, FeatureStore

    path = Path(path)
    parent = path.resolve().parent
    made = _absent_folders(parent)
    parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(parent):
        if _interrupted_creation(path, ATTR_KEY):
            shutil.rmtree(path)
        was_empty = path.is_dir() and not any(path.iterdir())
        fresh = was_empty or not path.exists()
        try:
            store = FeatureStore.create(path, spec, table)
        except BaseException:
            if fresh and _wanted(remove_on_failure):
                _remove_new_store(path, was_empty, made)
            raise
        held = os.open(path, os.O_RDONLY)
        fcntl.flock(held, fcntl.LOCK_SH)  # taken under the parent lock, so a failing run sees it
    try:
        yield store
    except BaseException:
        if fresh and _wanted(remove_on_failure):
            with _folder_lock(parent):
                if _sole_user(held) and not _any_chunk_finished(path):
                    _remove_new_store(path, was_empty, made)
        raise
    finally:
        os.close(held)


def _wanted(flag) -> bool:
    return bool(flag()) if callable(flag) else bool(flag)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _absent_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, innermost first."""
    out = []
    while not folder.exists():
        out.append(folder)
        folder = folder.parent
    return out


def _sole_user(held: int) -> bool:
    """Upgrade this run's shared lock on the store folder to exclusive without waiting: False if another process
    (a shard of the same store) holds it too."""
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _any_chunk_finished(path: Path) -> bool:
    from morphcache.store.feature_store import FeatureStore

    try:
        return bool(FeatureStore.open(path, "r").progress().any())
    except Exception:  # noqa: BLE001 - unreadable: keep it, as for a finished chunk
        return True


def _remove_new_store(path: Path, was_empty: bool, made: list[Path]) -> None:
    """Undo a store this run created: its files (``path`` stays if it was an empty folder before), then the
    parent folders the run made."""
    if was_empty:
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    elif path.exists():
        shutil.rmtree(path)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # no longer empty (another run uses it) or gone
            break


_CREATED_NAMES = {"zarr.json", "tokens", "scales", "pooled", "views", "images", "progress", "checksums", "shards"}


def _interrupted_creation(path: Path, attr_key: str) -> bool:
    import json

    meta = path / "zarr.json"
    if not meta.is_file() or not set(os.listdir(path)) <= _CREATED_NAMES:
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attr_key not in attrs
