"""Contract test suites every implementation of an extension point must pass (in the style of zarr-python's
``StoreTests``). Subclass one in a test module under a ``Test*`` name, implement its factory, and pytest runs the
whole contract against your implementation::

    class TestMyTeacher(TeacherContract):
        def make_teacher(self, tmp_path):
            return load_teacher("my_kind", "my_arch", image_size=32)

The suites:

- :class:`TeacherContract`: a teacher (``registries.teachers``): shapes, frozen, batch independence, rebuild from spec.
- :class:`TrainLoaderContract`: a training loader (``registries.loaders``): the :class:`TrainLoader` protocol,
  batch shapes, the sampler's rows (seeded order, epoch coverage, ``views_used`` / ``view_order``, resume), targets
  equal to the store's rows read with plain zarr, pixels equal to the stored views rendered by PIL within tolerance.
- :class:`RendererContract`: a view renderer (``extract.renderers.RENDERERS``): output shape / dtype / range,
  crop, flip and colour jitter equal to the reference renderer (DALI on the CPU) within the fidelity tolerance,
  identity view = plain resize, batch independence.
- :class:`RowReaderContract`: a read path of the store's row reader (memory-mapped, ``preadv``, blosc, partial
  shards, plain-zarr fallback): the same rows as zarr for random, sorted, repeated and shard-crossing row lists;
  a fallback path logs its warning once, the others none.

The factories are fixtures where a suite runs over a registry: override ``make`` with a parametrized fixture and a
newly registered implementation is picked up without editing the tests (see ``tests/test_loader_contract.py``).
Each suite builds tiny stores and images from :mod:`morphcache.testing`, once per test class.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from morphcache.errors import ConfigError


class TeacherContract:
    """What extraction, replay and the online teacher rely on from any :class:`~morphcache.extract.teachers.Teacher`.

    Subclasses implement :meth:`make_teacher`; ``batch`` images of the teacher's input size are drawn per test.
    """

    batch = 3
    #: largest elementwise difference allowed between a sample's tokens alone and inside a batch (float32 run).
    batch_tolerance = 1e-4

    def make_teacher(self, tmp_path):
        raise NotImplementedError

    @pytest.fixture()
    def teacher(self, tmp_path):
        return self.make_teacher(tmp_path)

    def _images(self, teacher, n: int | None = None, seed: int = 0) -> torch.Tensor:
        s = teacher.spec.image_size
        return torch.randn(n or self.batch, 3, s, s, generator=torch.Generator().manual_seed(seed))

    def test_tokens_and_pooled_have_the_spec_shapes(self, teacher):
        spec = teacher.spec
        tokens, pooled = teacher.forward_tokens(self._images(teacher))
        side = spec.image_size // spec.patch_size
        assert spec.image_size % spec.patch_size == 0 and spec.n_tokens == side * side
        assert tuple(tokens.shape) == (self.batch, spec.n_tokens, spec.dim) and tokens.dtype == torch.float32
        assert tuple(pooled.shape) == (self.batch, spec.pooled_dim) and pooled.dtype == torch.float32
        assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()

    def test_is_frozen_and_in_eval_mode(self, teacher):
        assert not teacher.model.training
        assert not any(p.requires_grad for p in teacher.model.parameters())

    def test_a_sample_does_not_depend_on_its_batch(self, teacher):
        x = self._images(teacher)
        batched, _ = teacher.forward_tokens(x)
        alone, _ = teacher.forward_tokens(x[1:2])
        torch.testing.assert_close(alone[0], batched[1], atol=self.batch_tolerance, rtol=self.batch_tolerance)

    def test_spec_rebuilds_the_same_teacher(self, teacher):
        from morphcache import registries
        from morphcache.extract.teachers import load_teacher_from_spec
        from morphcache.schemas import TeacherSpec

        spec = TeacherSpec.model_validate_json(teacher.spec.model_dump_json())  # as stored and read back
        assert spec.kind in registries.names(registries.teachers)
        again = load_teacher_from_spec(spec, precision=teacher.precision)
        x = self._images(teacher, seed=1)
        np.testing.assert_array_equal(again.forward_tokens(x)[0].numpy(), teacher.forward_tokens(x)[0].numpy())

    def test_wrong_input_size_is_a_one_line_error(self, teacher):
        s = teacher.spec.image_size
        with pytest.raises(ConfigError, match="expects images of shape"):
            teacher.forward_tokens(torch.zeros(1, 3, s + teacher.spec.patch_size, s + teacher.spec.patch_size))


# ---------------------------------------------------------------------------------------------------- loaders
def _zarr_rows(store_path, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of array ``name`` read with plain zarr (the whole array, then numpy indexing): the reference."""
    import zarr

    return np.asarray(zarr.open_group(str(store_path), mode="r")[name][:])[np.asarray(rows, dtype=np.int64)]


def _reference_views(store, rows: np.ndarray, size: int, mean, std, interpolation: str) -> torch.Tensor:
    """float32 (B, 3, size, size): the stored views of ``rows`` (ViewParams read with zarr) rendered by PIL."""
    from morphcache.extract.images import load_canonical_bytes
    from morphcache.extract.render_pil import render_pil

    root = Path(store.spec.dataset_root)
    paths = store.image_paths()
    V = store.spec.views_per_image
    encoded = [load_canonical_bytes(root / paths[int(r) // V])[0] for r in rows]
    return render_pil(encoded, _zarr_rows(store.path, "views", rows), size, mean, std, interpolation)


class TrainLoaderContract:
    """What the training loop relies on from a training loader (an entry of ``registries.loaders``).

    Subclasses implement :meth:`build_loader` (``LoaderOptions -> TrainLoader``) or override the class-scoped
    ``make`` fixture (``tests/test_loader_contract.py`` parametrizes it over ``registries.loaders``, so a
    registered plug-in loader runs the contract with no test edit). The store is
    :func:`~morphcache.testing.stores.make_image_store` (``n_images`` images of ``views`` views, real PNGs,
    synthetic int8 targets), built once per class; batches of ``batch`` rows at ``img_size`` pixels.
    """

    n_images = 8
    views = 3
    batch = 2
    img_size = 16
    #: worker processes for most tests (the resume test uses 1, so worker processes are exercised once).
    workers = 0
    #: PIL reference vs the loader's pixels, 8-bit pixel units (the DALI / PIL fidelity the loader tests measure).
    pixel_mean_tolerance = 0.01
    pixel_max_tolerance = 0.5

    def build_loader(self, options):
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def make(cls):
        return cls().build_loader

    @pytest.fixture(scope="class")
    @classmethod
    def store(cls, tmp_path_factory):
        from morphcache.testing.stores import make_image_store

        return make_image_store(tmp_path_factory.mktemp("loader_contract") / "store", n_images=cls.n_images,
                                views=cls.views, chunk_images=4)

    def options(self, store, seed: int = 0, start_step: int = 0, views_used: int | None = None,
                view_order: str = "random", second_view: bool = False, teacher_size: int | None = None, **kwargs):
        """:class:`~morphcache.train.loader.LoaderOptions` over ``store`` (``kwargs``: its other fields)."""
        from morphcache.train.loader import LoaderOptions, RenderSpec
        from morphcache.train.sampler import EpochSampler

        spec = store.spec
        sampler = EpochSampler(store.ok_rows(), spec.views_per_image, self.batch, seed, second_view=second_view,
                               views_used=views_used, view_order=view_order)
        render = RenderSpec(self.img_size, tuple(spec.teacher.mean), tuple(spec.teacher.std),
                            spec.augment.interpolation, teacher_size=teacher_size, second_view=second_view)
        kwargs.setdefault("workers", self.workers)
        return LoaderOptions(store, sampler, render, start_step=start_step, **kwargs)

    @staticmethod
    def take(make, options, n: int) -> list:
        """The first ``n`` batches of a loader built from ``options`` (closed afterwards)."""
        loader = make(options)
        try:
            it = iter(loader)
            return [next(it) for _ in range(n)]
        finally:
            loader.close()

    @pytest.fixture(scope="class")
    @classmethod
    def two_epochs(cls, make, store):
        """(options, the first two epochs of batches) for seed 0 from micro-batch 0."""
        options = cls().options(store, seed=0)
        return options, cls.take(make, options, 2 * options.sampler.steps_per_epoch)

    def test_is_a_train_loader_of_its_options(self, make, store):
        from morphcache.train.loader import TrainLoader

        options = self.options(store)
        loader = make(options)
        try:
            assert isinstance(loader, TrainLoader) and loader.options is options
        finally:
            loader.close()
        loader.close()  # idempotent

    def test_batches_have_the_documented_shapes_and_dtypes(self, two_epochs, store):
        options, batches = two_epochs
        B, S, spec = self.batch, self.img_size, store.spec
        for b in batches:
            assert tuple(b.images.shape) == (B, 3, S, S) and b.images.dtype == torch.float32
            assert torch.isfinite(b.images).all()
            assert tuple(b.rows.shape) == (B,) and b.rows.dtype == torch.int64
            assert tuple(b.targets.shape) == (B, spec.n_tokens, spec.dim) and b.targets.dtype == torch.float32
            assert b.images2 is None and b.rows2 is None and b.teacher_images is None

    def test_batches_hold_the_samplers_rows_epoch_by_epoch(self, two_epochs):
        options, batches = two_epochs
        sampler, V = options.sampler, self.views
        for g, b in enumerate(batches):
            np.testing.assert_array_equal(b.rows.numpy(), sampler.batch_rows(g))
        per_epoch = sampler.steps_per_epoch
        epochs = [np.concatenate([b.rows.numpy() for b in batches[e * per_epoch:(e + 1) * per_epoch]])
                  for e in range(2)]
        for rows in epochs:  # every image exactly once per epoch (n_images is a multiple of the batch)
            assert sorted((rows // V).tolist()) == list(range(self.n_images))
        assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch

    def test_targets_are_the_stored_rows(self, two_epochs, store):
        from morphcache.store.quantize import dequantize

        _, batches = two_epochs
        for b in batches:
            rows = b.rows.numpy()
            expected = dequantize(_zarr_rows(store.path, "tokens", rows), _zarr_rows(store.path, "scales", rows))
            np.testing.assert_array_equal(b.targets.numpy(), expected)

    def test_pixels_are_the_stored_views(self, two_epochs, store):
        from morphcache.extract.render_fidelity import pixel_differences

        options, batches = two_epochs
        r = options.render
        for b in batches[:3]:
            ref = _reference_views(store, b.rows.numpy(), r.img_size, r.mean, r.std, r.interpolation)
            diff = pixel_differences(b.images, ref, r.std)
            assert diff.mean() < self.pixel_mean_tolerance and diff.max() < self.pixel_max_tolerance, (
                diff.mean(), diff.max())

    def test_same_seed_same_batches_other_seed_other_order(self, make, store, two_epochs):
        _, first = two_epochs
        again = self.take(make, self.options(store, seed=0), 2)
        for a, b in zip(first, again):
            assert torch.equal(a.rows, b.rows) and torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
        other_options = self.options(store, seed=1)
        other = self.take(make, other_options, other_options.sampler.steps_per_epoch)
        rows = np.concatenate([b.rows.numpy() for b in other])
        np.testing.assert_array_equal(rows, other_options.sampler.epoch_rows(0)[0])
        assert not np.array_equal(rows, np.concatenate([b.rows.numpy() for b in first[:len(other)]]))

    def test_views_used_and_view_order_are_honoured(self, make, store):
        """views_used=2 with view_order="epoch": epochs 0 and 1 serve views 0 and 1, every used row exactly once."""
        options = self.options(store, seed=2, views_used=2, view_order="epoch")
        batches = self.take(make, options, 2 * options.sampler.steps_per_epoch)
        rows = np.concatenate([b.rows.numpy() for b in batches])
        R = self.n_images * self.views
        assert sorted(rows.tolist()) == [r for r in range(R) if r % self.views < 2]
        for g, b in enumerate(batches):
            np.testing.assert_array_equal(b.rows.numpy() % self.views, options.sampler.position(g)[0] % 2)

    def test_resume_from_a_step_continues_the_same_stream(self, make, store, two_epochs):
        """A loader built with ``start_step=g`` (here across an epoch boundary, with worker processes) serves
        exactly batches g, g+1, ... of a loader started at 0: resuming is a new loader, not set_epoch."""
        options, first = two_epochs
        g = options.sampler.steps_per_epoch - 1
        resumed = self.take(make, self.options(store, seed=0, start_step=g, workers=1), 2)
        for a, b in zip(first[g:g + 2], resumed):
            assert torch.equal(a.rows, b.rows) and torch.equal(a.targets, b.targets)
            assert torch.equal(a.images, b.images)

    def test_second_view_and_teacher_size_without_targets(self, make, store):
        """LUT's second view (another view of the same image) and the online teacher's input (the same view at the
        teacher's side), no targets read."""
        from morphcache.extract.render_fidelity import pixel_differences

        St = self.img_size + 8
        options = self.options(store, seed=3, second_view=True, read_targets=False, teacher_size=St)
        (b,) = self.take(make, options, 1)
        rows, rows2 = options.sampler.batch_rows_pair(0)
        assert b.targets is None
        np.testing.assert_array_equal(b.rows.numpy(), rows)
        np.testing.assert_array_equal(b.rows2.numpy(), rows2)
        assert np.all(rows2 // self.views == rows // self.views) and np.all(rows2 != rows)
        r = options.render
        ref = _reference_views(store, rows2, r.img_size, r.mean, r.std, r.interpolation)
        assert tuple(b.images2.shape) == tuple(b.images.shape)
        assert pixel_differences(b.images2, ref, r.std).max() < self.pixel_max_tolerance
        assert tuple(b.teacher_images.shape) == (self.batch, 3, St, St) and b.teacher_images.dtype == torch.float32
        ref = _reference_views(store, rows, St, r.mean, r.std, r.interpolation)
        assert pixel_differences(b.teacher_images, ref, r.std).max() < self.pixel_max_tolerance


# ---------------------------------------------------------------------------------------------------- renderers
class RendererContract:
    """What extraction, replay and the loaders rely on from a view renderer (``render(encoded, params) ->
    [float32 (B, 3, S, S)]``, one output size, on the CPU here).

    Subclasses implement :meth:`build_renderer` or override the class-scoped ``make`` fixture
    (``(size, mean, std, interpolation, batch_size) -> renderer``). The reference is DALI on the CPU (the
    definition of a view); tests against it skip when DALI is not importable.
    """

    size = 32
    interpolation = "linear"
    #: this renderer vs the reference, 8-bit pixel units (tests/test_render.py's linear fidelity bounds).
    pixel_mean_tolerance = 0.01
    pixel_max_tolerance = 0.1
    RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean/std that leave pixels in [0, 1]

    def build_renderer(self, size, mean, std, interpolation, batch_size):
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def make(cls):
        return cls().build_renderer

    @pytest.fixture(scope="class")
    @classmethod
    def images(cls):
        """[(canonical bytes, (height, width), RGB uint8 (H, W, 3))] of four generated pictures of varied sizes."""
        from morphcache.extract.images import canonicalize_bytes, decode_rgb, encode_png
        from morphcache.testing.images import picture

        out = []
        for k, (h, w) in enumerate([(40, 52), (64, 48), (37, 61), (56, 56)]):
            enc, size = canonicalize_bytes(encode_png(picture(k, h, w)), f"picture{k}.png")
            out.append((enc, size, decode_rgb(enc)))
        return out

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls):
        from morphcache.extract.renderers import dali_available

        if not dali_available():
            pytest.skip("NVIDIA DALI is not importable: no reference renderer")
        from morphcache.extract.renderers import build_renderer

        return lambda size, mean, std, interpolation, batch_size: build_renderer(
            "dali-cpu", size, mean, std, interpolation, batch_size, 1)

    @staticmethod
    def views(images, seed: int = 8) -> np.ndarray:
        """float32 (2 * len(images), P): two views per image from extraction's sampler, hue jitter on."""
        from morphcache.extract.views import ViewSampler
        from morphcache.schemas import AugmentSpec

        sampler = ViewSampler(AugmentSpec(hue=0.1), seed)
        return np.stack([sampler.row(i, v, *im[1]) for i, im in enumerate(images) for v in range(2)])

    @staticmethod
    def handmade_views(h: int, w: int) -> np.ndarray:
        """float32 (4, P): a crop, the same crop flipped, colour jitter only, all three together."""
        crop = [h // 5, w // 7, h // 2, (2 * w) // 3]
        return np.array([crop + [0, 1, 1, 1, 0], crop + [1, 1, 1, 1, 0], [0, 0, h, w, 0, 1.3, 0.7, 1.4, 0.08],
                         crop + [1, 0.8, 1.2, 0.6, -0.05]], dtype=np.float32)

    def test_output_shape_dtype_and_range(self, make, images):
        from morphcache.schemas.specs import CLIP_MEAN, CLIP_STD

        rows = self.views(images)
        encoded = [im[0] for im in images for _ in range(2)]
        for mean, std in (self.RAW, (CLIP_MEAN, CLIP_STD)):
            out = make(self.size, mean, std, self.interpolation, len(encoded)).render(encoded, rows)
            assert isinstance(out, list) and len(out) == 1
            (x,) = out
            assert tuple(x.shape) == (len(encoded), 3, self.size, self.size) and x.dtype == torch.float32
            assert x.device.type == "cpu" and torch.isfinite(x).all()
            pixels = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
            assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5

    def test_crop_flip_and_jitter_match_the_reference(self, make, reference, images):
        from morphcache.extract.render_fidelity import pixel_differences

        mean, std = self.RAW
        enc, (h, w), _ = images[1]
        for encoded, rows in (([im[0] for im in images for _ in range(2)], self.views(images)),
                              ([enc] * 4, self.handmade_views(h, w))):
            (got,) = make(self.size, mean, std, self.interpolation, len(encoded)).render(encoded, rows)
            (ref,) = reference(self.size, mean, std, self.interpolation, len(encoded)).render(encoded, rows)
            diff = pixel_differences(got, ref, std)
            assert diff.mean() < self.pixel_mean_tolerance and diff.max() < self.pixel_max_tolerance, (
                diff.mean(), diff.max())

    def test_flip_is_exactly_a_mirror(self, make, images):
        enc, (h, w), _ = images[2]
        rows = self.handmade_views(h, w)[:2]
        (x,) = make(self.size, *self.RAW, self.interpolation, 2).render([enc, enc], rows)
        torch.testing.assert_close(x[1], x[0].flip(-1), atol=1e-6, rtol=0)

    def test_identity_view_is_a_plain_resize(self, make, images):
        """The whole image, unflipped, no colour change = PIL's bilinear resize (interior: uint8 rounding only;
        the border rows may differ where DALI repeats the edge)."""
        from PIL import Image

        from morphcache.extract.views import identity_view

        for enc, (h, w), rgb in images:
            (x,) = make(self.size, *self.RAW, "linear", 1).render([enc], identity_view(h, w)[None])
            ref = np.asarray(Image.fromarray(rgb).resize((self.size, self.size), Image.BILINEAR), np.float32) / 255
            diff = np.abs(x[0].permute(1, 2, 0).numpy() - ref) * 255
            assert diff.mean() < 0.5 and diff[2:-2, 2:-2].max() < 1.5, (diff.mean(), diff[2:-2, 2:-2].max())

    def test_a_view_does_not_depend_on_its_batch(self, make, images):
        encoded = [im[0] for im in images for _ in range(2)]
        rows = self.views(images)
        renderer = make(self.size, *self.RAW, self.interpolation, len(encoded))
        (batched,) = renderer.render(encoded, rows)
        (alone,) = renderer.render(encoded[3:4], rows[3:4])
        torch.testing.assert_close(alone[0], batched[3], atol=1e-6, rtol=0)

    def test_params_of_the_wrong_shape_are_refused(self, make, images):
        renderer = make(self.size, *self.RAW, self.interpolation, 2)
        with pytest.raises(ValueError, match="params must be"):
            renderer.render([images[0][0]] * 2, self.views(images)[:1])


# ---------------------------------------------------------------------------------------------------- row reader
class RowReaderContract:
    """What the target reads rely on from one read path of the store's row reader
    (:class:`~morphcache.store.shard_reader.ShardRowReader` and its plain-zarr fallback in ``FeatureStore``).

    Subclasses set the store's layout (``compression``, ``complete``, ``inner`` rows per inner chunk) and implement
    :meth:`open_reader` (``store path -> read(rows) -> (tokens (B, T, D) int8, scales (B, T) float16)``), and set
    ``fallback = True`` for a path that reads through zarr (it must log one warning per array and handle, the others
    none). The store (``make_store``: ``n_images`` of ``views`` views, 2 images per chunk, i.e. shards of
    ``2 * views`` rows) is built once per class; the reference is plain zarr.
    """

    n_images = 9
    views = 2
    compression = "none"
    complete = True
    inner = 1
    fallback = False

    def make_store_dir(self, path: Path) -> Path:
        """Create the store this path reads (override to change its layout after creation)."""
        from morphcache.store.feature_store import FeatureStore
        from morphcache.testing.stores import make_chunk, make_image_table, make_spec

        spec = make_spec(n_images=self.n_images, views=self.views, chunk_images=2)
        store = FeatureStore.create(path, spec, make_image_table(self.n_images), rows_per_inner_chunk=self.inner,
                                    compression=self.compression)
        for c in range(store.n_chunks - (0 if self.complete else 1)):
            store.write_chunk(c, *make_chunk(spec, c, skipped=(4,)))
        return path

    def open_reader(self, path: Path):
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def store_dir(cls, tmp_path_factory) -> Path:
        return cls().make_store_dir(tmp_path_factory.mktemp("row_reader") / "store")

    @pytest.fixture(scope="class")
    @classmethod
    def zarr_arrays(cls, store_dir):
        import zarr

        g = zarr.open_group(str(store_dir), mode="r")
        return np.asarray(g["tokens"][:]), np.asarray(g["scales"][:])

    def row_lists(self, n_rows: int) -> dict[str, np.ndarray]:
        """Named row lists: random (with repeats), permuted, sorted, repeated, shard-crossing, edges, empty, all."""
        rng = np.random.default_rng(0)
        S = 2 * self.views  # rows per shard
        return {
            "random": rng.integers(0, n_rows, 13),
            "permuted": rng.permutation(n_rows)[: n_rows // 2 + 1],
            "sorted": np.sort(rng.choice(n_rows, 7, replace=False)),
            "repeated": np.array([5, 5, 5, 0, 0, n_rows - 1, 5]),
            "crossing": np.arange(S - 2, 2 * S + 2),  # contiguous: read as one slice over three shards
            "crossing_reversed": np.arange(2 * S + 1, S - 3, -1),
            "crossing_scattered": np.array([S - 1, S, 3 * S - 1, 3 * S, 1]),
            "first_and_last": np.array([0, n_rows - 1]),
            "one": np.array([S]),
            "empty": np.array([], dtype=np.int64),
            "all": np.arange(n_rows),
        }

    def test_reads_equal_zarr(self, store_dir, zarr_arrays):
        tok, sc = zarr_arrays
        read = self.open_reader(store_dir)
        for name, rows in self.row_lists(len(tok)).items():
            rows = np.asarray(rows, dtype=np.int64)
            q, s = read(rows)
            assert q.dtype == tok.dtype and tuple(q.shape) == (rows.size,) + tok.shape[1:], name
            np.testing.assert_array_equal(q, tok[rows], err_msg=name)
            np.testing.assert_array_equal(s, sc[rows], err_msg=name)

    def test_reading_twice_gives_the_same_rows(self, store_dir):
        read = self.open_reader(store_dir)
        rows = self.row_lists(self.n_images * self.views)["random"]
        first = read(rows)[0].copy()
        np.testing.assert_array_equal(read(rows)[0], first)

    def test_fallback_warning_is_logged_once_and_only_for_the_fallback(self, store_dir, caplog):
        with caplog.at_level(logging.WARNING, logger="morphcache.store.shard_reader"):
            read = self.open_reader(store_dir)
            for rows in self.row_lists(self.n_images * self.views).values():
                read(np.asarray(rows, dtype=np.int64))
        warnings = [r for r in caplog.records if "through zarr" in r.getMessage()]
        if self.fallback:
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert "tokens" in warnings[0].getMessage()
        else:
            assert warnings == [], [r.getMessage() for r in warnings]
