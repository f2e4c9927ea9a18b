"""One folder rule and one decoder for every stage; file names that are not UTF-8; image lists as users write them.

Evaluation's ``folder:DIR`` dataset and extraction's manifest both list folders with
``extract.folders.walk_image_folder`` and decode with ``extract.images.load_canonical_bytes``; these tests check
that over every kind of file extraction's tests cover (morphcache/testing/images.py's zoo), hidden and AppleDouble
files, notebook checkpoints, symbolic links and an EXIF-rotated JPEG.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from morphcache.testing.images import EXPECTED, encode, image_zoo_files, picture
from morphcache.errors import MorphcacheError
from morphcache.evaluate.dataset_loading import load_dataset
from morphcache.extract.folders import (
    SKIP_BROKEN_LINK,
    SKIP_EMPTY_CLASS,
    SKIP_HIDDEN,
    SKIP_NOT_IMAGE_NAME,
    walk_image_folder,
)
from morphcache.extract.manifest import build_manifest
from morphcache.store.image_table import STATUS_OK, STATUS_REASONS, ImageTable, path_from_text, path_to_text

LATIN1 = b"latin1_\xe9.png"  # not valid UTF-8


def _png(path: Path, value: int, h: int = 20, w: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _messy_split(split: Path) -> None:
    """Two classes plus everything a real folder collects: hidden files, AppleDouble, notebook checkpoints, notes,
    a broken link, a linked folder, an empty class folder."""
    _png(split / "cat" / "0.png", 40)
    _png(split / "cat" / "1.png", 50)
    _png(split / "dog" / "sub" / "0.png", 200)
    (split / "cat" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork, not an image")
    (split / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    _png(split / ".ipynb_checkpoints" / "x-checkpoint.png", 0)
    _png(split / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png", 0)
    (split / "dog" / "notes.txt").write_text("not an image")
    (split / "dog" / "gone.png").symlink_to(split / "nowhere.png")
    (split / "empty").mkdir()
    (split / "empty" / "readme.md").write_text("no images here")
    _png(split.parent / "elsewhere" / "9.png", 210)
    (split / "dog" / "linked").symlink_to(split.parent / "elsewhere")
    (split / "cat" / "2.png").symlink_to(split.parent / "elsewhere" / "9.png")


def test_walk_rule_hidden_links_empty_classes_and_numbering(tmp_path):
    _messy_split(tmp_path / "train")
    listing = walk_image_folder(tmp_path / "train")
    assert listing.classes == ["cat", "dog"]
    assert listing.paths == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/linked/9.png", "dog/sub/0.png"]
    assert listing.labels == [0, 0, 0, 1, 1]
    skipped = dict(listing.skipped)
    assert skipped == {
        ".ipynb_checkpoints/": SKIP_HIDDEN,
        "cat/.ipynb_checkpoints/": SKIP_HIDDEN,
        "cat/.DS_Store": SKIP_HIDDEN,
        "cat/._0.jpg": SKIP_HIDDEN,
        "dog/gone.png": SKIP_BROKEN_LINK,
        "dog/notes.txt": SKIP_NOT_IMAGE_NAME,
        "empty/readme.md": SKIP_NOT_IMAGE_NAME,
        "empty/": SKIP_EMPTY_CLASS,
    }
    # extraction's manifest follows the same rule
    table, _ = build_manifest(tmp_path / "train")
    assert table.path.tolist() == listing.paths and table.label.tolist() == listing.labels
    assert table.class_names == listing.classes


def test_eval_folder_ignores_hidden_and_appledouble_files(tmp_path):
    """Before: .ipynb_checkpoints became a class and ._0.jpg stopped the run with "cannot decode image"."""
    _messy_split(tmp_path / "train")
    _messy_split(tmp_path / "test")
    d = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert d.classes == ("cat", "dog")
    assert d.train_labels.tolist() == [0, 0, 0, 1, 1] and d.test_labels.tolist() == [0, 0, 0, 1, 1]
    assert [int(x.mean()) for x in d.train_images] == [40, 50, 210, 210, 200]
    assert any(p.endswith("._0.jpg") and r == SKIP_HIDDEN for p, r in d.skipped)
    assert "skipped 16 file(s)" in d.skipped_line()  # 8 entries in each split


def test_eval_folder_decodes_exif_rotated_jpeg_upright(tmp_path):
    """Before: a JPEG with EXIF orientation 6 was evaluated sideways (82 levels from the upright image)."""
    yy, xx = np.mgrid[0:48, 0:32]  # 32 wide, 48 tall: a portrait photo as displayed, smooth (small JPEG loss)
    upright = Image.fromarray(np.stack([yy * 5, xx * 7, 255 - yy * 5], -1).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the file holds the picture turned 90 degrees, width 48, height 32
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "r.jpg").write_bytes(encode(stored, "JPEG", quality=95, subsampling=0, exif=exif.tobytes()))
        (tmp_path / split / "a" / "u.png").write_bytes(encode(upright, "PNG"))
    d = load_dataset(f"folder:{tmp_path}", image_size=32)
    rotated, reference = d.train_images[0].astype(np.int16), d.train_images[1].astype(np.int16)
    assert np.abs(rotated - reference).mean() < 3  # JPEG loss only
    sideways = np.asarray(Image.fromarray(d.train_images[1]).transpose(Image.Transpose.ROTATE_90), np.int16)
    assert np.abs(rotated - sideways).mean() > 30


def test_eval_folder_treats_every_zoo_file_as_extraction_does(tmp_path):
    """Every kind of file extraction is tested on: the good ones are evaluated, the bad ones skipped with the
    reason extraction records for them (extraction stores STATUS_REASONS codes; evaluation reports their text)."""
    files = {k: v for k, v in image_zoo_files().items() if k != "l_huge.png"}  # 10000 x 10000: decode time only
    for split in ("train", "test"):
        for name, data in files.items():
            (tmp_path / split / "c" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / split / "c" / name).write_bytes(data)
    d = load_dataset(f"folder:{tmp_path}", image_size=16)
    good = [n for n in files if EXPECTED[n] == STATUS_OK]
    assert len(d.train_images) == len(d.test_images) == len(good)
    reasons = {Path(p).name: r for p, r in d.skipped if "/train/" in p}
    assert reasons == {n: STATUS_REASONS[EXPECTED[n]] for n in files if EXPECTED[n] != STATUS_OK}


def test_eval_folder_refuses_images_outside_class_folders(tmp_path):
    _png(tmp_path / "train" / "loose.png", 1)
    _png(tmp_path / "test" / "a" / "x.png", 1)
    with pytest.raises(MorphcacheError, match="class sub-folders"):
        load_dataset(f"folder:{tmp_path}")


def test_folders_without_usable_images_are_one_line_errors(tmp_path):
    _png(tmp_path / "train" / "a" / "x.png", 1)
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a" / "y.png").write_bytes(b"")
    with pytest.raises(MorphcacheError, match=r"test: no image could be decoded, e\.g\. .*y\.png: empty file"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "only_hidden" / "c").mkdir(parents=True)
    (tmp_path / "only_hidden" / "c" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(MorphcacheError, match=r"no images found .*left out, e\.g\. c/\._x\.jpg: hidden"):
        build_manifest(tmp_path / "only_hidden")


# ---------------------------------------------------------------- names that are not UTF-8


def test_path_text_round_trips_every_name():
    alphabet = ["\\", "x", "8", "f", "a", "0", "\udce9", "\udc80", "é", "/", "X"]
    rng = random.Random(0)
    for _ in range(20000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        text = path_to_text(name)
        text.encode("utf-8")  # storable
        assert path_from_text(text) == name
        if "\\" not in name and "\udce9" not in name and "\udc80" not in name:
            assert text == name  # ordinary names are stored as they are
    assert path_to_text(os.fsdecode(LATIN1)) == "latin1_\\xe9.png"


def test_fingerprint_of_a_non_utf8_name(tmp_path):
    """Before: ImageTable.fingerprint raised UnicodeEncodeError."""
    name = os.fsdecode(LATIN1)
    t = ImageTable(path=[name], hash=["h"], height=[1], width=[1], label=[-1], status=[255])
    u = ImageTable(path=[name.replace("\udce9", "\u00e9")], hash=["h"], height=[1], width=[1], label=[-1], status=[255])
    assert t.fingerprint() != u.fingerprint()
    same = ImageTable(path=["a.png"], hash=["h"], height=[1], width=[1], label=[-1], status=[255])
    before = hashlib.blake2b(b"morphcache-manifest-v1 1\na.png\x00h\x00-1\n", digest_size=16).hexdigest()
    assert same.fingerprint() == before  # UTF-8 names hash as before, so existing stores still resume


def test_non_utf8_class_folder_is_a_text_class_name(tmp_path):
    os.makedirs(os.fsencode(tmp_path) + b"/caf\xe9")
    _png(Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9")) / "a.png", 3)
    _png(tmp_path / "tea" / "b.png", 4)
    table, root = build_manifest(tmp_path)
    assert table.class_names == ["caf\\xe9", "tea"]  # shown and stored as text
    assert table.path.tolist() == [os.fsdecode(b"caf\xe9/a.png"), "tea/b.png"]  # opened by its real name
    assert (root / table.path[0]).is_file() and len(table.fingerprint()) == 32


def test_non_utf8_name_in_eval_folder(tmp_path):
    for split in ("train", "test"):
        _png(tmp_path / split / "a" / "ok.png", 10)
        with open(os.fsencode(tmp_path / split / "a") + b"/" + LATIN1, "wb") as f:
            f.write(encode(Image.new("RGB", (20, 20), (90, 90, 90)), "PNG"))
    d = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert sorted(int(x.mean()) for x in d.train_images) == [10, 90]


def test_non_utf8_name_extracts_hashes_and_replays_in_training(tmp_path):
    """A file named with latin-1 bytes is stored, hashed, replayed by the training loader and replay-check."""
    from morphcache.cli import main
    from morphcache.extract.replay import replay_check
    from morphcache.store.feature_store import FeatureStore
    from morphcache.train.loader import ViewSource
    from morphcache.train.sampler import EpochSampler

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(encode(picture(1), "PNG"))
    with open(os.fsencode(data) + b"/" + LATIN1, "wb") as f:
        f.write(encode(picture(2), "PNG"))
    out = tmp_path / "store"
    args = ["--teacher", "timm:vit_tiny_patch16_224", "--image-size", "32", "--views", "2", "--batch-size", "4",
            "--threads", "1", "--chunk-images", "2", "--dtype", "float16"]
    assert main(["extract", "--data", str(data), "--out", str(out), *args]) == 0
    store = FeatureStore.open(out)
    assert store.image_paths() == ["a.png", os.fsdecode(LATIN1)]
    assert store.image_status().tolist() == [STATUS_OK, STATUS_OK]
    assert main(["extract", "--data", str(data), "--out", str(out), *args]) == 0  # resumes: same fingerprint
    report = replay_check(out, rows=4)
    assert report.rows == 4 and report.passed, report.line()
    source = ViewSource(str(out), EpochSampler(store.ok_rows(), 2, batch_size=2, seed=0))
    assert source.image_bytes(2).tobytes() == encode(picture(2), "PNG")  # row 2 = image 1, the latin-1 file


# ---------------------------------------------------------------- image lists


@pytest.mark.parametrize("encoding,newline", [("utf-8-sig", "\n"), ("utf-8-sig", "\r\n"), ("utf-8", "\r"),
                                              ("utf-16", "\r\n")])
def test_image_list_as_users_write_it(tmp_path, encoding, newline):
    """Before: a list starting with a UTF-8 byte-order mark lost its first image ("missing file")."""
    for name in ("one.png", "two.png", "three.png"):
        _png(tmp_path / "imgs" / name, 5)
    lst = tmp_path / "list.txt"
    lines = ["imgs/one.png\tcat", "", "# a comment", "imgs/two.png\tdog", "imgs/three.png", ""]
    lst.write_bytes(newline.join(lines).encode(encoding))
    table, root = build_manifest(lst)
    assert root == tmp_path.resolve()
    assert table.path.tolist() == ["imgs/one.png", "imgs/two.png", "imgs/three.png"]
    assert table.class_names == ["cat", "dog"] and table.label.tolist() == [0, 1, -1]
    assert table.height.tolist() == [20, 20, 20]


def test_image_list_with_non_utf8_names_opens_those_files(tmp_path):
    with open(os.fsencode(tmp_path) + b"/" + LATIN1, "wb") as f:
        f.write(encode(picture(3), "PNG"))
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"./" + LATIN1 + b"\n")  # as `find . -name '*.png' > list.txt` writes it
    table, _ = build_manifest(lst)
    assert table.path.tolist() == [os.fsdecode(LATIN1)] and table.height.tolist() == [40]


def test_binary_file_as_list_is_one_line_error(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes("a.png\n".encode("utf-16-le"))  # UTF-16 without a byte-order mark
    with pytest.raises(MorphcacheError, match="NUL"):
        build_manifest(lst)
