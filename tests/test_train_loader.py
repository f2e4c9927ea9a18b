"""The training loader: epoch row order, DALI rendering of stored views, cached targets, the torch fallback, the
online teacher.

The stores here are real: generated PNG images, views from extraction's ViewSampler, rendered by DaliRenderer at
the teacher's size, a tiny random timm ViT teacher (weights saved to a file, so it can be reloaded), tokens
quantized into zarr by FeatureStore.write_chunk. Targets are thus a deterministic function of the pixels.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from morphcache.errors import ConfigError
from morphcache.store.feature_store import FeatureStore
from morphcache.train.sampler import EpochSampler
from morphcache.testing.teacher_stores import TEACHER_SIZE, build_teacher_store, teacher_weights

# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    torch.set_num_threads(1)
    return build_teacher_store(tmp_path_factory.mktemp("loader"), n_images=12, views=2, chunk_images=4)


def _render_reference(store: FeatureStore, rows: np.ndarray, size: int) -> torch.Tensor:
    """Extraction's renderer on the stored views of ``rows``: what the student must see."""
    from morphcache.extract.images import load_canonical_bytes
    from morphcache.extract.render_dali import DaliRenderer

    root = Path(store.spec.dataset_root)
    paths = np.asarray(store.array("images/path")[:]).astype(object)
    V = store.spec.views_per_image
    encoded = [load_canonical_bytes(root / str(paths[r // V]))[0] for r in rows]
    t = store.spec.teacher
    renderer = DaliRenderer(sizes=(size,), mean=t.mean, std=t.std, batch_size=len(rows), num_threads=1)
    return renderer.render(encoded, store.read_views(rows))[0]


def _take(loader, n: int) -> list:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    loader.close()
    return out


# ---------------------------------------------------------------- sampler
def test_sampler_one_view_per_image_per_epoch_seeded_and_sharded():
    V, n_img = 3, 20
    ok = np.arange(n_img * V, dtype=np.int64)
    s = EpochSampler(ok, V, batch_size=4, seed=5)
    assert s.steps_per_epoch == 5
    e0 = np.concatenate([s.batch_rows(g) for g in range(5)])
    e1 = np.concatenate([s.batch_rows(g) for g in range(5, 10)])
    for rows in (e0, e1):
        assert sorted(rows // V) == list(range(n_img))  # every image exactly once
    assert not np.array_equal(e0, e1)  # a new order and new views each epoch
    assert len(set(e0 % V) | set(e1 % V)) > 1
    again = EpochSampler(ok, V, batch_size=4, seed=5)
    assert np.array_equal(again.batch_rows(7), s.batch_rows(7))  # a pure function of (seed, step)
    other = EpochSampler(ok, V, batch_size=4, seed=6)
    assert not np.array_equal(other.epoch_rows(0)[0], s.epoch_rows(0)[0])
    # ranks: disjoint shards of the same epoch order, equal length
    shards = [EpochSampler(ok, V, batch_size=2, seed=5, rank=r, world_size=3) for r in range(3)]
    rows = [sh.epoch_rows(1)[0] for sh in shards]
    assert len({len(r) for r in rows}) == 1 and shards[0].steps_per_epoch == 3
    assert len(np.unique(np.concatenate(rows) // V)) == sum(len(r) for r in rows)
    # pickles without its cache; the second view is another view of the same image
    lut = pickle.loads(pickle.dumps(EpochSampler(ok, V, batch_size=4, seed=1, second_view=True)))
    r1, r2 = lut.batch_rows_pair(3)
    assert np.array_equal(r1 // V, r2 // V) and np.all(r1 != r2)


def test_sampler_uses_only_images_with_all_views_and_refuses_tiny_stores():
    ok = np.array([0, 1, 2, 3, 5, 6, 7], dtype=np.int64)  # image 2 (rows 4, 5) lost row 4
    s = EpochSampler(ok, 2, batch_size=1)
    assert sorted(s.images.tolist()) == [0, 1, 3]
    with pytest.raises(ConfigError, match="batch_size"):
        EpochSampler(ok, 2, batch_size=4)


# ---------------------------------------------------------------- target prefetcher
@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_target_prefetcher_reads_batches_in_order_through_one_staging_buffer(tmp_path, dtype):
    """Targets come in the batch's own row order, equal the store's dequantized rows, survive later reads
    (they never alias the reused staging buffer), and the staging buffer is allocated once."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from morphcache.testing.stores import make_store

    from morphcache.train.targets import TargetPrefetcher

    make_store(tmp_path / "s", n_images=24, views=2, dtype=dtype, chunk_images=4, T=16, D=32)
    store = FeatureStore.open(tmp_path / "s")
    sampler = EpochSampler(store.ok_rows(), 2, batch_size=5, seed=3)
    pre = TargetPrefetcher(store, sampler, depth=2)
    try:
        got = [pre.get(g, sampler.batch_rows(g)) for g in range(2, 9)]  # crosses into epoch 1
        staging = pre._stage[0].data_ptr()
        got.append(pre.get(9, sampler.batch_rows(9)))
        assert pre._stage[0].data_ptr() == staging
        assert any(not np.array_equal(sampler.batch_rows(g), np.sort(sampler.batch_rows(g))) for g in range(2, 10))
        for g, targets in zip(range(2, 10), got):
            rows = sampler.batch_rows(g)
            assert targets.dtype == torch.float32 and torch.equal(targets, store.read_tokens(rows))
        with pytest.raises(RuntimeError, match="out of step at micro-batch 10"):
            pre.get(10, sampler.batch_rows(11))
    finally:
        pre.close()


def test_view_source_refuses_an_image_edited_after_extraction(tmp_path):
    """The loaders read each image through the manifest hash: an edited file would pair new pixels with the old
    cached targets, so it is refused with its path, both in-process and from DALI's worker processes."""
    from PIL import Image

    from morphcache.errors import MorphcacheError
    from morphcache.train.loader import DaliTrainLoader, LoaderOptions, RenderSpec, ViewSource

    store = build_teacher_store(tmp_path, n_images=4, views=2, chunk_images=2)
    sampler = EpochSampler(store.ok_rows(), 2, batch_size=4, seed=0)
    source = ViewSource(str(store.path), sampler)
    assert source.sample(0)[0].size > 0
    victim = Path(store.spec.dataset_root) / "im002.png"
    pixels = np.asarray(Image.open(victim)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(victim)
    bad = [g for g in range(4) if sampler.sample_rows(g)[0] // 2 == 2][0]
    with pytest.raises(MorphcacheError, match=r"im002\.png: file changed since the store was extracted"):
        ViewSource(str(store.path), sampler).sample(bad)
    from morphcache.train.torch_loader import TorchTrainLoader

    t = store.spec.teacher
    for make in (DaliTrainLoader, TorchTrainLoader):  # the worker's error arrives as one line, not a traceback
        loader = make(LoaderOptions(store, sampler, RenderSpec(t.image_size, t.mean, t.std), workers=1))
        with pytest.raises(MorphcacheError, match=r"im002\.png: file changed since the store was extracted") as info:
            _take(loader, 1)
        assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


# ---------------------------------------------------------------- DALI loader
def test_dali_loader_renders_stored_views_with_cached_targets(store):
    from morphcache.train.loader import DaliTrainLoader, LoaderOptions, RenderSpec, ViewSource

    t = store.spec.teacher
    sampler = EpochSampler(store.ok_rows(), store.spec.views_per_image, batch_size=4, seed=3)
    render = RenderSpec(64, t.mean, t.std)
    batches = _take(DaliTrainLoader(LoaderOptions(store, sampler, render, start_step=2, workers=1)), 3)
    for g, b in enumerate(batches, start=2):  # steps 2, 3 (epoch 0) and 4 (epoch 1)
        rows = sampler.batch_rows(g)
        assert b.images.shape == (4, 3, 64, 64) and b.images.dtype == torch.float32
        assert np.array_equal(b.rows.numpy(), rows)
        assert torch.equal(b.targets, store.read_tokens(rows))  # batch-aligned, dequantized
        assert torch.equal(b.images, _render_reference(store, rows, 64))  # extraction's pixels exactly
    # the callable shipped to the workers is small and stateless
    src = ViewSource(str(store.path), sampler, start_step=0)
    blob = pickle.dumps(src)
    assert len(blob) < 10_000
    a = pickle.loads(blob).sample(9)
    assert int(a[2][0]) == sampler.batch_rows(2)[1] and np.array_equal(a[1], store.read_views([int(a[2][0])])[0])


def test_dali_loader_student_size_differs_from_teacher_size(store):
    """A patch-8 student reads the same crops at 32 px (4x4 grid); teacher-size views come along."""
    from morphcache.train.loader import DaliTrainLoader, LoaderOptions, RenderSpec

    t = store.spec.teacher
    sampler = EpochSampler(store.ok_rows(), store.spec.views_per_image, batch_size=4, seed=0, second_view=True)
    render = RenderSpec(32, t.mean, t.std, teacher_size=64, second_view=True)
    (b,) = _take(DaliTrainLoader(LoaderOptions(store, sampler, render, workers=1)), 1)
    rows, rows2 = sampler.batch_rows_pair(0)
    assert b.images.shape == (4, 3, 32, 32) and b.teacher_images.shape == (4, 3, 64, 64)
    assert torch.equal(b.images, _render_reference(store, rows, 32))
    assert torch.equal(b.teacher_images, _render_reference(store, rows, 64))
    assert np.array_equal(b.rows2.numpy(), rows2) and torch.equal(b.images2, _render_reference(store, rows2, 32))


def test_torch_fallback_serves_the_same_batches(store):
    """Same rows and targets exactly; PIL pixels within the renderer tolerance measured against DALI."""
    from morphcache.extract.render_fidelity import pixel_differences
    from morphcache.train.loader import DaliTrainLoader, LoaderOptions, RenderSpec
    from morphcache.train.torch_loader import build_loader

    t = store.spec.teacher
    sampler = EpochSampler(store.ok_rows(), store.spec.views_per_image, batch_size=4, seed=1)
    render = RenderSpec(64, t.mean, t.std)
    dali = _take(DaliTrainLoader(LoaderOptions(store, sampler, render, start_step=1, workers=1)), 2)
    fallback = _take(build_loader("torch", LoaderOptions(store, sampler, render, start_step=1, workers=0)), 2)
    for a, b in zip(dali, fallback):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.targets, b.targets)
        diff = pixel_differences(a.images, b.images, t.std)  # 8-bit pixel units
        # measured here: mean 1.2e-5, max 9e-5 pixel levels; refuse anything near half an 8-bit level
        assert diff.mean() < 0.01 and diff.max() < 0.5, (diff.mean(), diff.max())


def test_online_teacher_reproduces_the_stored_targets(store):
    from morphcache.train.loader import DaliTrainLoader, LoaderOptions, RenderSpec
    from morphcache.train.online_teacher import OnlineTeacher

    teacher = OnlineTeacher(store.spec)
    t = store.spec.teacher
    sampler = EpochSampler(store.ok_rows(), store.spec.views_per_image, batch_size=4, seed=2)
    render = RenderSpec(64, t.mean, t.std, teacher_size=teacher.size)
    (b,) = _take(DaliTrainLoader(LoaderOptions(store, sampler, render, workers=1, read_targets=False)), 1)
    assert b.targets is None
    teacher.fill_targets(b)
    stored = store.read_tokens(b.rows.numpy())
    _, scales = store.read_raw(b.rows.numpy())
    step = torch.from_numpy(scales.astype(np.float32))[..., None]  # int8 absmax: value = q * scale
    err = (b.targets - stored).abs()
    assert torch.all(err <= 0.5 * step + 1e-3), float((err - 0.5 * step).max())
    # a teacher with other weights is not the store's teacher
    other = store.spec.model_copy(update={"teacher": t.model_copy(update={"weights_sha256": "0" * 64})})
    with pytest.raises(ConfigError, match="sha256|weights"):
        OnlineTeacher(other)


def test_moved_teacher_weights_are_found_by_hash(tmp_path, capsys):
    """Replays and the online teacher load the store's teacher from its recorded path; --teacher-weights points
    them at the same weights elsewhere (checked by sha256), and other weights are refused."""
    import shutil

    from morphcache.cli import main
    from morphcache.extract.replay import replay_check
    from morphcache.train.online_teacher import OnlineTeacher

    store = build_teacher_store(tmp_path, n_images=4, views=2, chunk_images=2)
    recorded = Path(store.spec.teacher.pretrained)
    moved = tmp_path / "elsewhere" / "teacher.pth"
    moved.parent.mkdir()
    shutil.move(recorded, moved)
    assert main(["store", "replay-check", str(store.path), "--rows", "4"]) == 2  # recorded path is gone
    assert "pass --teacher-weights" in capsys.readouterr().err
    assert replay_check(store.path, rows=4, weights=str(moved)).passed
    assert main(["store", "replay-check", str(store.path), "--rows", "4", "--teacher-weights", str(moved)]) == 0
    assert OnlineTeacher(store.spec, weights=str(moved)).size == TEACHER_SIZE
    other = teacher_weights(tmp_path / "other.pth", seed=1)
    with pytest.raises(ConfigError, match="sha256"):
        OnlineTeacher(store.spec, weights=other)


def test_lut_views_render_bicubic_with_effects_in_both_loaders(store):
    """LUT's rows (ordered jitter, grayscale / solarize / blur, mirrored windows) reach the effects graph, bicubic whatever the store's
    interpolation: the DALI loader gives DaliRenderer(effects=True, cubic)'s pixels exactly, the torch fallback
    the same within the cubic renderer tolerance (test_render: mean 0.03, max 1.5 levels)."""
    from morphcache.extract.render_dali import DaliRenderer
    from morphcache.extract.render_fidelity import pixel_differences
    from morphcache.train.loader import DaliTrainLoader, LoaderOptions, RenderSpec, ViewSource
    from morphcache.train.torch_loader import build_loader

    t = store.spec.teacher
    assert store.spec.augment.interpolation == "linear"
    sampler = EpochSampler(store.ok_rows(), store.spec.views_per_image, batch_size=8, seed=2, second_view=True)
    render = RenderSpec(32, t.mean, t.std, second_view=True, lut_views=True)
    assert render.view_interpolation == "cubic" and RenderSpec(32, t.mean, t.std).view_interpolation == "linear"
    (a,) = _take(DaliTrainLoader(LoaderOptions(store, sampler, render, workers=1)), 1)
    (b,) = _take(build_loader("torch", LoaderOptions(store, sampler, render, workers=0)), 1)
    samples = [ViewSource(str(store.path), sampler, lut_size=32).sample(i) for i in range(8)]
    encoded = [s[0].tobytes() for s in samples]
    p1, p2 = np.stack([s[1] for s in samples]), np.stack([s[3] for s in samples])
    assert p1.shape == p2.shape == (8, 13) and (p2[:, 9:] != 0).any(axis=0).all()  # each effect among them
    renderer = DaliRenderer(sizes=(32,), mean=t.mean, std=t.std, interpolation="cubic", batch_size=8, effects=True)
    assert torch.equal(a.images, renderer.render(encoded, p1)[0])
    assert torch.equal(a.images2, renderer.render(encoded, p2)[0])
    for x, y in ((a.images, b.images), (a.images2, b.images2)):
        diff = pixel_differences(x, y, t.std)
        assert diff.mean() < 0.03 and diff.max() < 1.5, (diff.mean(), diff.max())
