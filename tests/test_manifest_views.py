"""Manifest building (folders, lists, hashes, sizes) and replayable view sampling."""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from morphcache.errors import MorphcacheError
from morphcache.extract.images import load_canonical_bytes
from morphcache.extract.manifest import build_manifest
from morphcache.extract.views import DRAWS_PER_VIEW, ViewSampler, view_generator
from morphcache.schemas.specs import AugmentSpec, ViewParams
from morphcache.store.image_table import STATUS_PENDING, ImageTable


def write_image(path, h, w, fmt=None, seed=0, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


# ---- manifest -------------------------------------------------------------------------------------------------


@pytest.fixture()
def class_folder(tmp_path):
    root = tmp_path / "data"
    write_image(root / "zebra" / "b.png", 20, 30)
    write_image(root / "zebra" / "a.JPG", 16, 12, fmt="JPEG")
    write_image(root / "ant" / "nested" / "c.webp", 10, 11, fmt="WEBP")
    write_image(root / "ant" / "d.bmp", 9, 8)
    write_image(root / "ant" / ".hidden.png", 5, 5)
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    (root / "empty_class" / "readme.md").write_text("x")
    (root / "zebra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def test_class_folders_give_sorted_labels_paths_hashes_and_sizes(class_folder):
    table, root = build_manifest(class_folder)
    assert root == class_folder.resolve()
    assert table.class_names == ["ant", "zebra"]
    assert table.path.tolist() == ["ant/d.bmp", "ant/nested/c.webp", "zebra/a.JPG", "zebra/b.png", "zebra/broken.png"]
    assert table.label.tolist() == [0, 0, 1, 1, 1]
    assert table.height.tolist() == [9, 10, 16, 20, 0] and table.width.tolist() == [8, 11, 12, 30, 0]
    assert (table.status == STATUS_PENDING).all()
    for p, h in zip(table.path, table.hash):
        assert h == hashlib.blake2b((root / p).read_bytes(), digest_size=16).hexdigest()
    assert table.labels_known
    assert table.height.dtype == np.int32 and table.status.dtype == np.uint8


def test_flat_folder_is_unlabeled_and_recursive(tmp_path):
    write_image(tmp_path / "x.png", 8, 8)
    write_image(tmp_path / "sub" / "y.jpeg", 8, 9, fmt="JPEG")
    table, _ = build_manifest(tmp_path)
    assert table.path.tolist() == ["sub/y.jpeg", "x.png"]
    assert table.label.tolist() == [-1, -1] and table.class_names == [] and not table.labels_known


def test_symlink_loops_are_walked_once(tmp_path):
    write_image(tmp_path / "cls" / "x.png", 4, 4)
    (tmp_path / "cls" / "up").symlink_to(tmp_path)
    table, _ = build_manifest(tmp_path)
    assert table.path.tolist() == ["cls/x.png"]


def test_manifest_size_matches_canonical_size_for_rotated_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    path = write_image(tmp_path / "r.jpg", 24, 40, fmt="JPEG", exif=exif.tobytes())
    table, _ = build_manifest(tmp_path)
    _, size = load_canonical_bytes(path)
    assert (int(table.height[0]), int(table.width[0])) == size == (40, 24)


def test_fingerprint_is_stable_and_content_sensitive(class_folder):
    a, _ = build_manifest(class_folder)
    b, _ = build_manifest(class_folder, workers=1)
    assert a.fingerprint() == b.fingerprint()
    write_image(class_folder / "zebra" / "b.png", 20, 30, seed=1)  # same name and size, other pixels
    c, _ = build_manifest(class_folder)
    assert c.fingerprint() != a.fingerprint()
    relabeled = a.subset(np.arange(len(a)))
    relabeled.label[0] = 1
    assert relabeled.fingerprint() != a.fingerprint()
    sub = a.subset([3, 1])
    assert sub.path.tolist() == ["zebra/b.png", "ant/nested/c.webp"] and sub.class_names == a.class_names
    assert len(a.subset(a.label == 1)) == 3


def test_file_list_with_labels_comments_and_absolute_paths(tmp_path):
    write_image(tmp_path / "imgs" / "one.png", 7, 9)
    write_image(tmp_path / "imgs" / "two.png", 5, 6)
    abs_path = write_image(tmp_path / "elsewhere" / "three.png", 4, 4)
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text(f"# comment\n../imgs/two.png\tcat\n\n../imgs/one.png\tdog\n{abs_path}\n")
    table, root = build_manifest(lst)
    assert root == lst.parent.resolve()
    assert table.path.tolist() == ["../imgs/two.png", "../imgs/one.png", "../elsewhere/three.png"]  # list order
    assert table.class_names == ["cat", "dog"] and table.label.tolist() == [0, 1, -1]
    assert table.height.tolist() == [5, 7, 4]
    lst.write_text("../imgs/one.png\t3\n../imgs/two.png\t0\n")
    table, _ = build_manifest(lst)
    assert table.label.tolist() == [3, 0] and table.class_names == []


def test_manifest_user_errors_are_one_line(tmp_path):
    cases = []
    with pytest.raises(MorphcacheError) as e:
        build_manifest(tmp_path / "nope")
    cases.append(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MorphcacheError) as e:
        build_manifest(tmp_path / "empty")
    cases.append(e.value)
    lst = tmp_path / "list.txt"
    lst.write_text("missing/a.png\nmissing/b.png\n")
    with pytest.raises(MorphcacheError) as e:
        build_manifest(lst)
    cases.append(e.value)
    write_image(tmp_path / "a.png", 4, 4)
    lst.write_text("a.png\n./a.png\n")
    with pytest.raises(MorphcacheError) as e:
        build_manifest(lst)
    cases.append(e.value)
    for err in cases:
        assert "\n" not in str(err)
    assert "nope" in str(cases[0]) and "listed twice" in str(cases[3])


def test_manifest_progress_is_reported(tmp_path, capsys):
    for k in range(3):
        write_image(tmp_path / f"{k}.png", 4, 4)
    build_manifest(tmp_path, progress=True)
    assert "[manifest] 3/3 files" in capsys.readouterr().err


def test_image_table_validates_columns():
    with pytest.raises(ValueError):
        ImageTable(path=["a", "b"], hash=["", ""], height=[1], width=[1, 1], label=[0, 0], status=[0, 0])
    assert len(ImageTable.empty()) == 0 and ImageTable.empty().size.shape == (0, 2)


# ---- views ----------------------------------------------------------------------------------------------------


def torchvision_reference(u: np.ndarray, H: int, W: int, aug: AugmentSpec) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, line by line, fed with our uniforms."""
    area = H * W
    log_ratio = (math.log(aug.ratio[0]), math.log(aug.ratio[1]))
    for k in range(10):
        target_area = area * (aug.scale[0] + u[k] * (aug.scale[1] - aug.scale[0]))
        aspect_ratio = math.exp(log_ratio[0] + u[10 + k] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= W and 0 < h <= H:
            i = int(u[20] * (H - h + 1))
            j = int(u[21] * (W - w + 1))
            return i, j, h, w
    in_ratio = float(W) / float(H)
    if in_ratio < min(aug.ratio):
        w = W
        h = int(round(w / min(aug.ratio)))
    elif in_ratio > max(aug.ratio):
        h = H
        w = int(round(h * max(aug.ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


@settings(max_examples=150, deadline=None)
@given(
    H=st.integers(1, 3000),
    W=st.integers(1, 3000),
    image=st.integers(0, 2**40),
    view=st.integers(0, 50),
    seed=st.integers(0, 2**64 - 1),
    lo=st.floats(0.01, 1.0),
)
def test_views_match_torchvision_semantics_and_stay_inside(H, W, image, view, seed, lo):
    aug = AugmentSpec(scale=(lo, 1.0), hue=0.1)
    sampler = ViewSampler(aug, seed)
    vp = sampler(image, view, H, W)
    assert 0 <= vp.top and vp.top + vp.height <= H and 0 <= vp.left and vp.left + vp.width <= W
    assert vp.height >= 1 and vp.width >= 1
    u = sampler.uniforms(image, view)
    np.testing.assert_array_equal(u, view_generator(seed, image, view).random(DRAWS_PER_VIEW))  # numpy's Philox
    assert (vp.top, vp.left, vp.height, vp.width) == torchvision_reference(u, H, W, aug)
    assert 0.6 <= vp.brightness <= 1.4 and 0.6 <= vp.contrast <= 1.4 and 0.6 <= vp.saturation <= 1.4
    assert -0.1 <= vp.hue <= 0.1
    assert vp.flip == (u[22] < 0.5)


def test_centre_crop_fallback_for_extreme_aspect():
    aug = AugmentSpec(scale=(0.9, 1.0))
    rows = ViewSampler(aug, 0).sample_rows(np.arange(20), np.full(20, 10), np.full(20, 1000), 2)
    # a 10 x 1000 strip: no attempt fits, so the fallback takes height 10 and width round(10 * 4/3) = 13, centred
    np.testing.assert_array_equal(rows[:, :4], np.tile([0, 493, 10, 13], (40, 1)))


def test_vectorised_rows_equal_per_view_calls_in_any_order():
    sampler = ViewSampler(AugmentSpec(hue=0.05), seed=11)
    heights = np.array([300, 17, 1, 640, 0])
    widths = np.array([200, 900, 1, 480, 50])
    ids = np.array([5, 0, 123456789, 42, 7])
    V = 4
    rows = sampler.sample_rows(ids, heights, widths, V)
    assert rows.shape == (len(ids) * V, 9) and rows.dtype == np.float32
    order = np.random.default_rng(0).permutation(len(ids) * V)
    for r in order:  # shuffled, fresh sampler each time: no hidden state
        k, v = divmod(int(r), V)
        single = ViewSampler(AugmentSpec(hue=0.05), seed=11).row(int(ids[k]), v, int(heights[k]), int(widths[k]))
        np.testing.assert_array_equal(rows[r], single)
    np.testing.assert_array_equal(rows[-V:], 0)  # zero-size image: zero rows
    with pytest.raises(ValueError):
        sampler(7, 0, 0, 50)
    vp = sampler(42, 3, 640, 480)
    assert isinstance(vp, ViewParams) and np.allclose(vp.to_row(), rows[3 * V + 3])


def _rows_in_worker(args):
    seed, ids, hs, ws, V = args
    return ViewSampler(AugmentSpec(), seed).sample_rows(ids, hs, ws, V)


def test_views_identical_across_worker_processes():
    ids = np.arange(40)
    hs = 100 + ids * 7
    ws = 300 - ids * 3
    whole = ViewSampler(AugmentSpec(), 5).sample_rows(ids, hs, ws, 3)
    parts = [(5, ids[a : a + 10], hs[a : a + 10], ws[a : a + 10], 3) for a in range(30, -1, -10)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_rows_in_worker, parts))
    np.testing.assert_array_equal(np.concatenate(results[::-1]), whole)


def test_views_differ_by_seed_image_and_view_and_streams_do_not_overlap():
    s = ViewSampler(AugmentSpec(), 0)
    base = s.row(3, 0, 500, 400)
    assert not np.array_equal(base, s.row(3, 1, 500, 400))
    assert not np.array_equal(base, s.row(4, 0, 500, 400))
    assert not np.array_equal(base, ViewSampler(AugmentSpec(), 1).row(3, 0, 500, 400))
    stream = view_generator(0, 3, 0).random(3 * DRAWS_PER_VIEW)
    np.testing.assert_array_equal(stream[DRAWS_PER_VIEW : 2 * DRAWS_PER_VIEW], s.uniforms(3, 1))
    with pytest.raises(ValueError):
        ViewSampler(AugmentSpec(), -1)


def test_view_statistics_follow_the_augmentation():
    aug = AugmentSpec(flip_p=0.3, brightness=0.2, contrast=0.0, saturation=1.5)
    rows = ViewSampler(aug, 9).sample_rows(np.arange(2000), np.full(2000, 400), np.full(2000, 600), 2)
    assert abs(rows[:, 4].mean() - 0.3) < 0.03
    assert rows[:, 5].min() >= 0.8 and rows[:, 5].max() <= 1.2 and abs(rows[:, 5].mean() - 1.0) < 0.01
    assert (rows[:, 6] == 1.0).all() and (rows[:, 8] == 0.0).all()
    assert rows[:, 7].min() >= 0.0 and rows[:, 7].max() <= 2.5
    area_frac = rows[:, 2] * rows[:, 3] / (400 * 600)
    assert 0.07 <= area_frac.min() and area_frac.max() <= 1.0


def test_crop_distribution_matches_torchvision():
    import torch
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(1, 300, 500)
    tv = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)], float)
    ours = ViewSampler(AugmentSpec(), 2).sample_rows(np.arange(2000), np.full(2000, 300), np.full(2000, 500), 2)
    ours = ours[:, :4].astype(float)
    for k in range(4):  # top, left, height, width: means within a few standard errors
        se = math.sqrt(tv[:, k].var() / len(tv) + ours[:, k].var() / len(ours))
        assert abs(tv[:, k].mean() - ours[:, k].mean()) < 4 * se, (k, tv[:, k].mean(), ours[:, k].mean())
    tv_area = tv[:, 2] * tv[:, 3]
    our_area = ours[:, 2] * ours[:, 3]
    assert abs(np.median(tv_area) - np.median(our_area)) / np.median(tv_area) < 0.05
