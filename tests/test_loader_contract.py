"""Every registered training loader passes the loader contract (morphcache.testing.contracts.TrainLoaderContract),
and LoaderOptions is built and validated in one place."""

from __future__ import annotations

import pytest

from morphcache import registries
from morphcache.errors import ConfigError
from morphcache.extract.renderers import dali_available
from morphcache.testing.contracts import TrainLoaderContract
from morphcache.train.loader import LoaderOptions, RenderSpec
from morphcache.train.torch_loader import build_loader  # registers the built-in loaders

#: loaders that need an optional dependency: name -> whether it is importable here.
_NEEDS = {"dali": dali_available}


class TestRegisteredLoader(TrainLoaderContract):
    """The contract for every name in ``registries.loaders`` (a plug-in's loader is picked up automatically)."""

    @pytest.fixture(scope="class", params=registries.names(registries.loaders))
    @classmethod
    def make(cls, request):
        kind = request.param
        if not _NEEDS.get(kind, lambda: True)():
            pytest.skip(f"loader {kind!r} needs a package that is not importable here")
        return lambda options: build_loader(kind, options)


def test_builtin_loaders_are_registered():
    assert {"dali", "torch"} <= set(registries.names(registries.loaders))


def test_loader_options_are_validated(tmp_path):
    from morphcache.testing.stores import make_image_store
    from morphcache.train.sampler import EpochSampler

    store = make_image_store(tmp_path / "s", n_images=4)
    sampler = EpochSampler(store.ok_rows(), 2, batch_size=2)
    render = RenderSpec(16, (0.5,) * 3, (0.5,) * 3)
    for bad, match in (({"start_step": -1}, "start_step"), ({"workers": -1}, "workers"), ({"threads": 0}, "threads"),
                       ({"prefetch": 0}, "prefetch"), ({"start_method": "thread"}, "start_method")):
        with pytest.raises(ConfigError, match=match):
            LoaderOptions(store, sampler, render, **bad)
    with pytest.raises(ConfigError, match="LoaderOptions"):
        build_loader("torch", store)  # the old loose-argument call is a one-line error
    with pytest.raises(ConfigError, match="unknown loader 'nope'"):
        build_loader("nope", LoaderOptions(store, sampler, render))


def test_loader_options_for_a_run(tmp_path):
    """``for_run`` builds what build_train_state passed before: the store's normalization and interpolation, the
    second view (and LUT's recipe views) from the sampler, workers from the RunConfig."""
    from morphcache.schemas import RunConfig
    from morphcache.testing.stores import make_image_store
    from morphcache.train.sampler import EpochSampler

    store = make_image_store(tmp_path / "s", n_images=4)
    t = store.spec.teacher
    config = RunConfig(store=str(store.path), workers=3)
    plain = EpochSampler(store.ok_rows(), 2, batch_size=2)
    o = LoaderOptions.for_run(config, store, plain, 24, start_step=5, read_targets=False, target_device="cuda:1")
    assert o.render == RenderSpec(24, tuple(t.mean), tuple(t.std), store.spec.augment.interpolation)
    assert (o.store, o.sampler, o.start_step, o.workers, o.read_targets, o.target_device) == (
        store, plain, 5, 3, False, "cuda:1")
    assert o.batch_size == 2 and o.lut_size is None
    two = EpochSampler(store.ok_rows(), 2, batch_size=2, second_view=True)
    lut = LoaderOptions.for_run(config, store, two, 24, teacher_size=32)
    assert lut.render.second_view and lut.render.lut_views and lut.lut_size == 24 and lut.render.sizes == (24, 32)
    stored = LoaderOptions.for_run(config.model_copy(update={"lut_views": "stored"}), store, two, 24)
    assert stored.render.second_view and not stored.render.lut_views and stored.lut_size is None
