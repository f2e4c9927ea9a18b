"""The demo's images: every in-memory source becomes uint8 RGB through one conversion, with or without Fashion-MNIST."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from morphcache.demo_data import prepare_demo_images
from morphcache.errors import MorphcacheError
from morphcache.evaluate.datasets import FASHION_MNIST_DIR, FASHION_MNIST_ENV, fashion_mnist_dir
from morphcache.extract.images import to_uint8_rgb


def gray3(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.uint8)
    return np.repeat(v[..., None], 3, axis=-1)


@pytest.mark.parametrize("array, expected", [
    (np.array([[False, True]]), gray3([[0, 255]])),
    (np.array([[0, 7, 255]], dtype=np.uint8), gray3([[0, 7, 255]])),
    (np.array([[0, 255, 256, 65535]], dtype=np.uint16), gray3([[0, 0, 1, 255]])),  # high byte, as 16-bit files
    (np.array([[0, 2**32 - 1]], dtype=np.uint32), gray3([[0, 255]])),
    (np.array([[-128, -1, 0, 127]], dtype=np.int8), gray3([[0, 127, 128, 255]])),
    (np.array([[-32768, 0, 32767]], dtype=np.int16), gray3([[0, 128, 255]])),
    (np.array([[np.iinfo(np.int64).min, np.iinfo(np.int64).max]]), gray3([[0, 255]])),
    (np.array([[0.0, 0.5, 1.0]], dtype=np.float32), gray3([[0, 128, 255]])),
    (np.array([[0.25, 0.25]], dtype=np.float16), gray3([[64, 64]])),  # constant inside [0, 1]: kept
    (np.array([[-1.0, 0.0, 1.0]]), gray3([[0, 128, 255]])),  # outside [0, 1]: min..max stretched
    (np.array([[0.0, 16.0, 8.0]]), gray3([[0, 255, 128]])),
    (np.array([[3.0, 3.0]]), gray3([[0, 0]])),  # constant outside [0, 1]
    (np.array([[np.nan, 0.5, np.inf, -np.inf]]), gray3([[0, 128, 255, 0]])),
    (np.array([[np.nan, np.nan]]), gray3([[0, 0]])),
])
def test_every_dtype_becomes_uint8(array, expected):
    out = to_uint8_rgb(array)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


def test_every_channel_layout_becomes_rgb():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    alpha = rng.integers(0, 256, (5, 7, 1), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8_rgb(gray), gray3(gray))
    np.testing.assert_array_equal(to_uint8_rgb(gray[..., None]), gray3(gray))
    np.testing.assert_array_equal(to_uint8_rgb(np.concatenate([gray[..., None], alpha], -1)), gray3(gray))  # LA
    np.testing.assert_array_equal(to_uint8_rgb(rgb), rgb)
    np.testing.assert_array_equal(to_uint8_rgb(np.concatenate([rgb, alpha], -1)), rgb)  # RGBA: alpha dropped
    # RGBA of another dtype: the colour channels converted, alpha ignored
    rgba16 = np.concatenate([rgb, alpha], -1).astype(np.uint16) * 257
    np.testing.assert_array_equal(to_uint8_rgb(rgba16), rgb)
    # a non-contiguous view
    np.testing.assert_array_equal(to_uint8_rgb(rgb[::2, ::-1]), rgb[::2, ::-1])


def test_alpha_matches_the_file_decoder(tmp_path):
    """RGBA arrays become the pixels extraction's decoder gives for the same image saved as a file."""
    from morphcache.extract.images import decode_rgb, load_canonical_bytes

    rgba = np.random.default_rng(1).integers(0, 256, (6, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(decode_rgb(load_canonical_bytes(tmp_path / "a.png")[0]), to_uint8_rgb(rgba))


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 4), (2000, 3), (3, 2000, 3)])
def test_any_size(shape):
    assert to_uint8_rgb(np.ones(shape, dtype=bool)).shape == shape[:2] + (3,)


@pytest.mark.parametrize("array", [
    np.zeros((0, 4)), np.zeros(5), np.zeros((2, 2, 5)), np.zeros((2, 2, 3, 1)),
    np.zeros((2, 2), dtype=complex), np.array([[None]], dtype=object),
])
def test_refuses_what_is_not_an_image(array):
    with pytest.raises(MorphcacheError, match="image array"):
        to_uint8_rgb(array)


def test_fashion_mnist_folder_is_one_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    assert str(fashion_mnist_dir()) == FASHION_MNIST_DIR
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    assert fashion_mnist_dir() == tmp_path


def test_photo_fallback_writes_skimages_boolean_horse(tmp_path):
    """Regression: the fallback crashed in np.ptp on skimage's boolean ``horse`` (numpy 2 refuses bool
    subtraction); every bundled photo, whatever its dtype, is now written as RGB."""
    import skimage.data

    from morphcache.demo_data import SKIMAGE_PHOTOS, _photo_folder

    assert "horse" in SKIMAGE_PHOTOS and skimage.data.horse().dtype == bool  # the case this test is about
    data = _photo_folder(tmp_path, 2 * len(SKIMAGE_PHOTOS) + 8, seed=0)
    photos = sorted((tmp_path / "photos").glob("*.png"))
    assert data.n_images == 2 * len(SKIMAGE_PHOTOS) + 8 and len(photos) == len(SKIMAGE_PHOTOS) + 4
    assert all(Image.open(p).mode == "RGB" for p in photos)


def test_demo_images_without_fashion_mnist(monkeypatch, tmp_path):
    """Regression: without Fashion-MNIST, skimage's boolean ``horse`` crashed np.ptp (numpy 2.4)."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "empty"))
    data = prepare_demo_images(tmp_path / "images", 40, seed=0)
    assert data.eval_spec == "digits" and data.n_images == 40
    files = sorted((tmp_path / "images").rglob("*.png"))
    assert len(files) == 40
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "RGB" and min(im.size) >= 1
    # re-running reuses the folder; pointing the setting elsewhere does not mix sources
    assert prepare_demo_images(tmp_path / "images", 40, seed=0).n_images == 40


def _write_idx(path, arr: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
                     + arr.astype(np.uint8).tobytes())


def test_demo_images_from_the_fashion_mnist_setting(monkeypatch, tmp_path):
    """The setting points the demo at any idx folder (here a small one written by the test)."""
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28)))
    _write_idx(root / "train-labels-idx1-ubyte", np.arange(30) % 10)
    _write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)))
    _write_idx(root / "t10k-labels-idx1-ubyte", np.arange(10))
    monkeypatch.setenv(FASHION_MNIST_ENV, str(root))
    data = prepare_demo_images(tmp_path / "images", 20, seed=0)
    assert data.eval_spec == f"fashion-mnist:{root}" and data.n_images == 20
    files = sorted((tmp_path / "images").rglob("*.png"))
    assert len(files) == 20 and len({f.parent.name for f in files}) == 10
    with Image.open(files[0]) as im:
        assert im.mode == "RGB" and im.size == (28, 28)
    # the same folder, once the setting points at an empty one, is rebuilt from the fallback photos
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "empty"))
    assert prepare_demo_images(tmp_path / "images", 20, seed=0).eval_spec == "digits"
    assert {f.parent.name for f in (tmp_path / "images").rglob("*.png")} == {"photos", "digits"}


def test_a_fashion_mnist_setting_without_the_data_says_it_falls_back(tmp_path, monkeypatch, capsys):
    import morphcache.demo_data as demo_data

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "empty"))

    def photos(out, n, seed):  # the real photo folder is not this test's subject
        out.mkdir(parents=True)
        return demo_data.DemoData(out, "digits", "photos", n)

    monkeypatch.setattr(demo_data, "_photo_folder", photos)
    data = prepare_demo_images(tmp_path / "out", 4)
    assert data.eval_spec == "digits"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and FASHION_MNIST_ENV in err[0] and str(tmp_path / "empty") in err[0]
    assert "falling back" in err[0]
