"""morphcache extract: the overlapped pipeline end to end on a tiny random ViT and a few generated images.

Covers: a complete store whose views/tokens are what the sampler + DALI + teacher give, resume as a no-op,
spec mismatch refusal, shards giving byte-identical arrays, fixed-size teacher batches, the async writer's
error handling, bf16, and recovery from a store whose creation was killed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from morphcache.cli import main

TEACHER = "timm:vit_tiny_patch16_224"
BASE = ["--teacher", TEACHER, "--image-size", "32", "--views", "2", "--batch-size", "4", "--threads", "1", "--chunk-images", "3",
        "--seed", "7"]


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    """n small images in two class folders: PNG and JPEG, RGB and grayscale, sizes 20..70 px."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(20, 70, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 7 + i * 13) % 256, (yy * 5 + i * 29) % 256, (xx * yy + i) % 256], -1)
        img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        cls = folder / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img).convert("L") if i % 5 == 4 else Image.fromarray(img)
        if i % 3 == 2:
            im.save(cls / f"im{i:03d}.jpg", quality=90)
        else:
            im.save(cls / f"im{i:03d}.png")
    return folder


def store_arrays(path) -> dict[str, np.ndarray]:
    """Every array of a zarr store by name (strings as Python lists)."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    out = {}
    for name, arr in group.members(max_depth=None):
        if isinstance(arr, zarr.Array):
            data = np.asarray(arr[:])
            out[name] = data.tolist() if data.dtype.kind in "OUT" else data
    return out


def assert_same_arrays(a, b) -> None:
    x, y = store_arrays(a), store_arrays(b)
    assert sorted(x) == sorted(y)
    for name in x:
        if isinstance(x[name], list):
            assert x[name] == y[name], name
        else:
            assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
            assert x[name].tobytes() == y[name].tobytes(), f"array {name} differs"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("imgs"), 14)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("ref") / "store"
    assert main(["extract", "--data", str(data), "--out", str(out), *BASE, "--dtype", "float16"]) == 0
    return out


def test_store_holds_sampled_views_and_teacher_tokens(reference, data):
    from morphcache.extract.images import load_canonical_bytes
    from morphcache.extract.engine import load_store_teacher
    from morphcache.extract.render_dali import DaliRenderer
    from morphcache.extract.views import ViewSampler
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.quantize import token_cosine

    store = FeatureStore.open(reference)
    spec = store.spec
    assert store.is_complete() and spec.n_images == 14 and spec.n_chunks == 5 and spec.views_per_image == 2
    assert (store.image_status() == 0).all() and len(store.ok_rows()) == 28
    paths = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.*"))
    heights, widths, encoded = [], [], []
    for p in paths:
        enc, (h, w) = load_canonical_bytes(data / p)
        encoded += [enc, enc]
        heights.append(h)
        widths.append(w)
    expected_views = ViewSampler(spec.augment, 7).sample_rows(np.arange(14), heights, widths, 2)
    np.testing.assert_array_equal(store.read_views(slice(0, 28)), expected_views)
    # independent recomputation: render all 28 views at once, run the teacher in one batch of 28
    teacher = load_store_teacher(spec.teacher)
    images = DaliRenderer(sizes=(32,), mean=spec.teacher.mean, std=spec.teacher.std, batch_size=28,
                          num_threads=1).render(encoded, expected_views)[0]
    tokens, pooled = teacher.forward_tokens(images)
    cached = store.read_tokens_numpy(slice(0, 28))
    assert cached.shape == (28, 4, 192)
    assert token_cosine(tokens.numpy(), cached).min() > 0.999
    np.testing.assert_allclose(store.read_pooled(slice(0, 28)), pooled.numpy(), rtol=2e-3, atol=2e-3)


def test_rerun_resumes_as_noop_and_other_spec_is_refused(reference, data, capsys):
    before = store_arrays(reference)["checksums"].copy()
    capsys.readouterr()
    assert main(["extract", "--data", str(data), "--out", str(reference), *BASE, "--dtype", "float16"]) == 0
    assert "0 chunks, 0 views" in capsys.readouterr().out
    np.testing.assert_array_equal(store_arrays(reference)["checksums"], before)
    rc = main(["extract", "--data", str(data), "--out", str(reference), *BASE, "--dtype", "int8"])
    err = capsys.readouterr().err
    assert rc == 2 and "dtype" in err and len(err.strip().splitlines()) == 1


def test_shards_give_byte_identical_store(reference, data, tmp_path):
    out = tmp_path / "sharded"
    for shard in ("1/2", "0/2"):  # odd chunks first: chunk results must not depend on what ran before
        assert main(["extract", "--data", str(data), "--out", str(out), *BASE, "--dtype", "float16",
                     "--shard", shard]) == 0
    assert_same_arrays(reference, out)


def test_shard_syntax_is_checked(data, tmp_path, capsys):
    assert main(["extract", "--data", str(data), "--out", str(tmp_path / "s"), *BASE, "--shard", "2/2"]) == 2
    assert "--shard" in capsys.readouterr().err


def test_teacher_sees_fixed_size_batches(reference):
    """6 rows per chunk with batch 4: every rendered batch is (4, 3, 32, 32), the last padded."""
    from morphcache.extract.renderers import build_teacher_renderer
    from morphcache.extract.views import ViewSampler
    from morphcache.extract.workers import BatchRenderer, ChunkSource
    from morphcache.store.feature_store import FeatureStore

    store = FeatureStore.open(reference)
    spec = store.spec
    source = ChunkSource(spec.dataset_root, store.image_table(), ViewSampler(spec.augment, spec.seed), 2, 3)
    plan, encoded = source.load_chunk(4)  # the last chunk: 2 images, 4 rows
    batches = list(BatchRenderer(build_teacher_renderer(spec.teacher, spec.augment, 4, 1), 4).batches(plan, encoded))
    assert [tuple(b.images.shape) for b in batches] == [(4, 3, 32, 32)]
    plan, encoded = source.load_chunk(0)  # 3 images, 6 rows -> 4 + (2 real + 2 padding)
    batches = list(BatchRenderer(build_teacher_renderer(spec.teacher, spec.augment, 4, 1), 4).batches(plan, encoded))
    assert [tuple(b.images.shape) for b in batches] == [(4, 3, 32, 32)] * 2
    assert [b.rows.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert np.array_equal(batches[1].images[2].numpy(), batches[1].images[1].numpy())  # pad repeats the last row


def test_int8_and_bf16(reference, data, tmp_path):
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.quantize import token_cosine

    out = tmp_path / "bf16"
    assert main(["extract", "--data", str(data), "--out", str(out), *BASE, "--dtype", "int8",
                 "--precision", "bf16", "--limit", "6"]) == 0
    store = FeatureStore.open(out)
    assert store.spec.n_images == 6 and store.is_complete() and store.spec.dtype == "int8"
    ref = FeatureStore.open(reference).read_tokens_numpy(slice(0, 12))
    cos = token_cosine(store.read_tokens_numpy(slice(0, 12)), ref)
    assert cos.mean() > 0.95  # bf16 autocast + int8 against fp32 + float16
    # the precision is recorded: a resume in another precision is refused, replays default to it
    assert store.spec.teacher.precision == "bf16" and FeatureStore.open(reference).spec.teacher.precision == "fp32"
    assert main(["extract", "--data", str(data), "--out", str(out), *BASE, "--dtype", "int8", "--limit", "6"]) == 2
    from morphcache.extract.replay import replay_check

    assert replay_check(out, rows=4).passed


class _FailingStore:
    def __init__(self, fail_on: int):
        self.fail_on, self.written = fail_on, []

    def write_chunk(self, c, tokens, pooled, views, status):
        if c == self.fail_on:
            raise OSError(f"disk full at chunk {c}")
        self.written.append(c)
        return c


def _result(c):
    from morphcache.extract.writer import ChunkResult

    z = np.zeros((2, 4, 8), np.float32)
    return ChunkResult(c, z, z[:, 0], np.zeros((2, 9), np.float32), np.zeros(1, np.uint8))


def test_async_writer_keeps_order_and_reraises_errors():
    from morphcache.extract.writer import AsyncWriter

    store = _FailingStore(fail_on=-1)
    with AsyncWriter(store, max_pending=1) as w:
        for c in range(5):
            w.submit(_result(c))
    assert store.written == [0, 1, 2, 3, 4]

    store = _FailingStore(fail_on=1)
    w = AsyncWriter(store, max_pending=1)
    with pytest.raises(OSError, match="disk full"):
        for c in range(6):
            w.submit(_result(c))
        w.close()
    assert store.written == [0]


def test_writer_finishes_submitted_chunks_when_the_caller_fails():
    from morphcache.extract.writer import AsyncWriter

    store = _FailingStore(fail_on=-1)
    with pytest.raises(KeyError), AsyncWriter(store, max_pending=3) as w:
        for c in range(3):
            w.submit(_result(c))
        raise KeyError("bad image")
    assert store.written == [0, 1, 2]


def test_interrupted_store_creation_is_redone(reference, data, tmp_path):
    import zarr

    out = tmp_path / "half"
    zarr.open_group(str(out), mode="w-", zarr_format=3).create_array("progress", shape=(5,), dtype="uint8")
    assert main(["extract", "--data", str(data), "--out", str(out), *BASE, "--dtype", "float16"]) == 0
    assert_same_arrays(reference, out)


def test_view_distribution_options_reach_the_store_and_are_part_of_its_identity(reference, data, tmp_path, capsys):
    """--augment FILE then --crop-scale / --interpolation (flags win) define the stored views; resuming the
    store with another distribution is refused; a bad file or value is one line naming it."""
    from morphcache.store.feature_store import FeatureStore

    aug = tmp_path / "aug.json"
    aug.write_text('{"scale": [0.2, 0.9], "flip_p": 0.0, "brightness": 0.1}')
    out = tmp_path / "s"
    argv = ["extract", "--data", str(data), "--out", str(out), *BASE, "--dtype", "float16", "--augment", str(aug),
            "--crop-scale", "0.6", "1.0", "--interpolation", "cubic"]
    assert main(argv) == 0
    spec = FeatureStore.open(out).spec
    assert spec.augment.scale == (0.6, 1.0) and spec.augment.flip_p == 0.0 and spec.augment.brightness == 0.1
    assert spec.augment.interpolation == "cubic"
    views = FeatureStore.open(out).read_views(slice(None))  # (R, P): top, left, height, width, flip, ...
    ref_views = FeatureStore.open(reference).read_views(slice(None))
    assert not views[:, 4].any() and ref_views[:, 4].any()  # no flips with flip_p 0
    assert np.abs(views[:, 5] - 1).max() <= 0.1 + 1e-6 < np.abs(ref_views[:, 5] - 1).max()
    capsys.readouterr()
    assert main([*argv[:-4], "0.3", "1.0", "--interpolation", "cubic"]) == 2  # another --crop-scale
    err = capsys.readouterr().err
    assert "augment.scale" in err and len(err.strip().splitlines()) == 1
    bad_cases = [(["--crop-scale", "0.5", "0.2"], "scale"), (["--interpolation", "nearest"], "interpolation"),
                 (["--augment", str(tmp_path / "missing.json")], "missing.json: cannot read")]
    for extra, needle in bad_cases:
        assert main(["extract", "--data", str(data), "--out", str(tmp_path / "t"), *BASE, *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()
