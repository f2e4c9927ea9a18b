"""Bad and unusual images: skip records the reason and loses nothing else; fail stops with one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from morphcache.testing.images import EXPECTED, write_image_zoo
from morphcache.cli import main
from morphcache.store.image_table import STATUS_CORRUPT, STATUS_OK

ARGS = ["--teacher", "timm:vit_tiny_patch16_224", "--image-size", "32", "--views", "2", "--batch-size", "4", "--threads", "1",
        "--chunk-images", "2", "--dtype", "float16", "--seed", "11"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return write_image_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def skipped_store(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("skip") / "store"
    return out


def test_skip_records_reasons_and_keeps_everything_else(zoo, skipped_store, capsys):
    from morphcache.store.feature_store import FeatureStore

    assert main(["extract", "--data", str(zoo), "--out", str(skipped_store), *ARGS]) == 0
    stdout = capsys.readouterr().out
    store = FeatureStore.open(skipped_store)
    assert store.is_complete()
    table = store.image_table()
    names = [str(p) for p in table.path]
    assert names == sorted(EXPECTED)
    status = store.image_status()
    assert {n: int(s) for n, s in zip(names, status)} == EXPECTED
    good = np.array([EXPECTED[n] == STATUS_OK for n in names])
    rows_good = np.repeat(good, 2)
    np.testing.assert_array_equal(store.ok_rows(), np.flatnonzero(rows_good))
    tokens = store.read_tokens_numpy(slice(0, store.n_rows))
    views = store.read_views(slice(0, store.n_rows))
    assert not tokens[~rows_good].any() and not views[~rows_good].any()  # skipped rows keep zeros
    assert (np.abs(tokens[rows_good]).sum(axis=(1, 2)) > 0).all()  # every other view was extracted
    assert (views[rows_good, 2] > 0).all()
    huge = names.index("l_huge.png")
    assert table.height[huge] == 10000 and views[2 * huge:2 * huge + 2, :4].max() <= 10000
    assert "skipped images:" in stdout
    for reason in ("truncated file 2", "empty file 1", "not an image 1", "corrupt or unreadable image data 1"):
        assert reason in stdout
    # the summary names the skipped files with their reasons and says where the full list is
    for name, reason in (("b_corrupt.png", "corrupt or unreadable image data"), ("e_empty.png", "empty file"),
                         ("h_truncated.jpg", "truncated file"), ("j_notes.jpg", "not an image")):
        assert f"  {name}: {reason}\n" in stdout
    assert f"full list: morphcache store skipped {skipped_store}" in stdout


SKIPPED = {"b_corrupt.png": "corrupt or unreadable image data", "e_empty.png": "empty file",
           "h_truncated.jpg": "truncated file", "j_notes.jpg": "not an image", "m_truncated.png": "truncated file"}


def test_store_skipped_and_info_list_every_skipped_file(zoo, skipped_store, tmp_path, capsys):
    import csv
    import json

    assert main(["store", "skipped", str(skipped_store)]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert {r["path"]: r["reason"] for r in rows} == SKIPPED
    names = sorted(EXPECTED)
    assert [int(r["image"]) for r in rows] == [names.index(r["path"]) for r in rows]
    assert all(r["file"] == str(zoo / r["path"]) and int(r["status"]) == EXPECTED[r["path"]] for r in rows)
    out_csv = tmp_path / "skipped.csv"
    assert main(["store", "skipped", str(skipped_store), "--csv", str(out_csv)]) == 0
    assert f"5 skipped images written to {out_csv}" in capsys.readouterr().out
    assert list(csv.DictReader(out_csv.open(newline=""))) == rows
    assert main(["store", "skipped", str(skipped_store), "--csv", str(tmp_path)]) == 2  # a folder: one line
    assert "--csv" in capsys.readouterr().err
    assert main(["store", "info", str(skipped_store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {s["path"]: s["reason"] for s in info["skipped"]} == SKIPPED
    assert main(["store", "info", str(skipped_store)]) == 0
    text = capsys.readouterr().out
    assert "skipped     5 images" in text and "  j_notes.jpg: not an image" in text and "store skipped" in text


def test_skipped_lines_name_the_first_few_then_the_full_list():
    from morphcache.store.skipped import SkippedImage, skipped_lines

    items = [SkippedImage(i, f"d/{i}.png", f"/r/d/{i}.png", 2, "truncated file") for i in range(7)]
    lines = skipped_lines(items, "S", shown=3)
    assert lines[:3] == ["  d/0.png: truncated file", "  d/1.png: truncated file", "  d/2.png: truncated file"]
    assert lines[3] == "  (4 more; full list: morphcache store skipped S [--csv FILE], or store info --json)"
    assert skipped_lines([], "S") == []


def test_skipped_store_replays(skipped_store):
    """The good views of a store with skipped images are exactly the teacher's tokens of the rendered views."""
    from morphcache.extract.replay import replay_check

    report = replay_check(skipped_store, rows=6)
    assert report.rows == 6 and report.passed, report.line()


def test_fail_stops_with_one_line_and_keeps_finished_chunks(zoo, skipped_store, tmp_path, capsys):
    from morphcache.store.feature_store import FeatureStore

    data = tmp_path / "mostly_good"
    data.mkdir()
    for name in ("a_good.png", "c_cmyk.jpg", "d_gray.png", "f_rgba.png", "g_palette.png", "i_sixteen_bit.png"):
        (data / name).write_bytes((zoo / name).read_bytes())
    (data / "z_truncated.jpg").write_bytes((zoo / "h_truncated.jpg").read_bytes())  # last chunk (3 of 0..3)
    good_only = tmp_path / "skip"
    assert main(["extract", "--data", str(data), "--out", str(good_only), *ARGS]) == 0
    capsys.readouterr()
    out = tmp_path / "fail"
    rc = main(["extract", "--data", str(data), "--out", str(out), *ARGS, "--on-bad-image", "fail"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[extract")]
    assert rc == 2
    assert len(err) == 1 and "z_truncated.jpg" in err[0] and "truncated" in err[0], err
    store, ref = FeatureStore.open(out), FeatureStore.open(good_only)
    assert store.progress().tolist() == [1, 1, 1, 0]
    a, b = store.read_raw(slice(0, 12)), ref.read_raw(slice(0, 12))
    assert a[0].tobytes() == b[0].tobytes()  # finished chunks intact and identical to the skip run
    np.testing.assert_array_equal(store.read_views(slice(0, 12)), ref.read_views(slice(0, 12)))
    # after removing the file the same command cannot resume (the manifest changed): refused, not overwritten
    (data / "z_truncated.jpg").unlink()
    assert main(["extract", "--data", str(data), "--out", str(out), *ARGS, "--on-bad-image", "fail"]) == 2
    assert "dataset_fingerprint" in capsys.readouterr().err


def test_an_image_dali_rejects_late_is_skipped_without_losing_its_batch(zoo, tmp_path):
    """If DALI fails on an image that passed the checks, that image is marked corrupt and the rest still renders."""
    from morphcache.errors import BadImageError
    from morphcache.extract.manifest import build_manifest
    from morphcache.extract.renderers import build_teacher_renderer
    from morphcache.extract.views import ViewSampler
    from morphcache.extract.workers import BatchRenderer, ChunkSource
    from morphcache.schemas import AugmentSpec, TeacherSpec

    table, root = build_manifest(zoo)
    keep = [i for i, p in enumerate(table.path) if str(p) in ("a_good.png", "c_cmyk.jpg", "d_gray.png")]
    table = table.subset(keep)
    source = ChunkSource(root, table, ViewSampler(AugmentSpec(), 0), 2, 3)
    plan, encoded = source.load_chunk(0)
    poisoned = encoded[1]  # c_cmyk.jpg's canonical bytes

    class RejectingRenderer:
        """The real DALI renderer, except that it reports one image as undecodable (as DaliRenderer does)."""

        def __init__(self):
            spec = TeacherSpec(kind="timm", name="t", image_size=32, patch_size=16, dim=8, pooled_dim=8)
            self.inner = build_teacher_renderer(spec, AugmentSpec(), 4, 1)

        def render(self, enc, params):
            for k, e in enumerate(enc):
                if e is poisoned:
                    err = BadImageError("view could not be rendered by DALI")
                    err.reason, err.index = STATUS_CORRUPT, k
                    raise err
            return self.inner.render(enc, params)

    batches = list(BatchRenderer(RejectingRenderer(), 4).batches(plan, encoded))
    assert plan.status.tolist() == [STATUS_OK, STATUS_CORRUPT, STATUS_OK]
    assert plan.bad == [("c_cmyk.jpg", STATUS_CORRUPT)]
    assert not plan.views[2:4].any() and plan.views[[0, 1, 4, 5], 2].min() > 0
    assert [b.rows.tolist() for b in batches] == [[0, 1, 4, 5]]  # the failed batch was re-rendered without it
    assert plan.render_rows.tolist() == [0, 1, 4, 5]
