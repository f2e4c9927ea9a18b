"""The one way to get a stored image's canonical bytes, whether the store was extracted from loose files or from
tar shards: extraction, ``store replay-check``, ``store show``, the report and both training loaders call
:meth:`StoredImages.load`.

Loose files go through :func:`morphcache.extract.images.load_stored_image_bytes`; tar members are read by
(shard, offset, size) with no scan (:class:`morphcache.extract.tar_shards.TarMembers`) and go through the same
hash check and canonicalization (:func:`morphcache.extract.images.canonicalize_stored_bytes`).
"""

from __future__ import annotations

import os
from pathlib import Path


class StoredImages:
    """Canonical bytes of the images of an :class:`~morphcache.store.image_table.ImageTable`.

    Args:
        root: dataset root the table's paths are relative to.
        images: the store's image table (a :class:`~morphcache.extract.tar_shards.TarImageTable` for tar shards).
        max_open: tar shard files kept open per process.

    Picklable; file handles are reopened lazily in the process that reads.
    """

    def __init__(self, root: str | os.PathLike, images, max_open: int | None = None) -> None:
        from morphcache.extract.tar_shards import DEFAULT_MAX_OPEN_SHARDS, TarImageTable, TarMembers

        self.root = Path(root)
        self.images = images
        self.training_hint = False  # from_store: bad-image messages suggest --image-root, not --on-bad-image
        self._tar = (TarMembers(self.root, images, max_open or DEFAULT_MAX_OPEN_SHARDS)
                     if isinstance(images, TarImageTable) else None)

    @classmethod
    def from_store(cls, store, root: str | os.PathLike | None = None, max_open: int | None = None) -> "StoredImages":
        """For an open ``FeatureStore``; ``root`` overrides the recorded dataset root (``--image-root``). Used by
        the training loaders: a bad image's message suggests ``--image-root`` instead of ``--on-bad-image``."""
        stored = cls(store.spec.dataset_root if root is None else root, store.image_table(), max_open)
        stored.training_hint = True
        return stored

    def name(self, i: int) -> Path:
        """Row ``i``'s source as named in messages (``root/path``; ``root/<shard>/<member>`` for tar members)."""
        return self.root / str(self.images.path[i])

    def load(self, i: int, *, check_hash: bool = True, verify: bool = True) -> tuple[bytes, tuple[int, int]]:
        """Canonical encoded bytes and (height, width) of image ``i``.

        ``check_hash``: refuse bytes whose content hash differs from the manifest's (:class:`MorphcacheError`);
        ``verify``: the cheap integrity check of pass-through JPEG/PNG. Bad images raise
        :class:`~morphcache.errors.BadImageError` (``.reason`` = status code), naming the file or shard and key.
        """
        from morphcache.errors import BadImageError
        from morphcache.extract.images import load_stored_image_bytes, with_training_hint

        expected = str(self.images.hash[i]) if check_hash else ""
        try:
            if self._tar is not None:
                return self._tar.load(i, expected, verify=verify)
            return load_stored_image_bytes(self.name(i), expected, verify=verify)
        except BadImageError as exc:
            if not self.training_hint:
                raise
            raise with_training_hint(exc, self.root) from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
