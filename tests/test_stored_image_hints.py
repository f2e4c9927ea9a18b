"""A bad stored image's message says what fixes it for the command at hand."""

from __future__ import annotations

import shutil

import pytest

from morphcache.errors import BadImageError
from morphcache.extract.stored_images import StoredImages
from morphcache.testing.stores import make_image_store


def test_training_suggests_image_root_and_extraction_on_bad_image(tmp_path):
    store = make_image_store(tmp_path / "s", n_images=2, views=1, chunk_images=2)
    root = tmp_path / "s_images"
    shutil.move(root, tmp_path / "moved")
    with pytest.raises(BadImageError) as training:  # train's loaders: the folder moved -> --image-root
        StoredImages.from_store(store).load(0)
    message = str(training.value)
    assert "missing file" in message and "--image-root DIR" in message and str(root) in message
    assert "--on-bad-image" not in message
    with pytest.raises(BadImageError, match="--on-bad-image skip"):  # extraction has the option
        StoredImages(store.spec.dataset_root, store.image_table()).load(0)
    data, _ = StoredImages.from_store(store, tmp_path / "moved").load(0)  # and --image-root does fix it
    assert data
