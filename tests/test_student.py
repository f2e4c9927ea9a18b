"""MIM student: timm ViT wrapper, mask token semantics, checkpoint round trip."""

import numpy as np
import pytest
import torch

from morphcache.errors import ConfigError, MorphcacheError
from morphcache.schemas.specs import IMAGENET_MEAN, IMAGENET_STD, RunConfig
from morphcache.train.student import (
    create_student,
    embed_patches,
    load_student_backbone,
    resolve_model_name,
    student_backbone_state,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return create_student("vit_tiny_patch16", img_size=32, target_dim=24, patch_size=8).eval()


def test_aliases_and_unknown_names():
    assert resolve_model_name("vit_small_patch16") == "vit_small_patch16_224"
    assert resolve_model_name("vit_base_patch16_224") == "vit_base_patch16_224"
    with pytest.raises(ConfigError, match="unknown student model"):
        resolve_model_name("not_a_vit")


def test_shapes_grid_and_layer_scale(student):
    x = torch.randn(2, 3, 32, 32)
    assert student.grid == (4, 4)
    assert student(x).shape == (2, 16, 24)
    assert student(x, torch.zeros(2, 16, dtype=torch.bool)).shape == (2, 16, 24)
    feats = student.forward_features(x)
    assert feats.shape == (2, 17, 192)
    assert torch.allclose(feats, student.backbone.forward_features(x))
    gamma = student.backbone.blocks[0].ls1.gamma
    assert torch.allclose(gamma, torch.full_like(gamma, 0.1))
    assert isinstance(student.backbone.norm, torch.nn.LayerNorm)


def test_unmasked_path_equals_timm_forward_features(student):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = student.encode(x, None)
        ours_empty_mask = student.encode(x, torch.zeros(2, 16, dtype=torch.bool))
    assert torch.allclose(ours, student.backbone.forward_features(x), atol=1e-6)
    assert torch.allclose(ours, ours_empty_mask, atol=1e-6)


def test_masked_patches_hide_their_pixels(student):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True  # grid row 1, col 1 -> pixels [8:16, 8:16]
    y = x.clone()
    y[..., 8:16, 8:16] = torch.randn(1, 3, 8, 8, generator=gen)
    with torch.no_grad():
        # the masked patch's pixels do not reach any output token
        assert torch.allclose(student(x, mask), student(y, mask), atol=1e-6)
        # without the mask they do
        assert not torch.allclose(student(x), student(y), atol=1e-4)


def test_mask_token_learns_and_is_trunc_normal():
    torch.manual_seed(0)
    s = create_student("vit_tiny_patch16_224", img_size=32, target_dim=8, patch_size=8)
    assert 0.015 < float(s.mask_token.detach().std()) < 0.025  # trunc-normal std 0.02 (BEiT's init)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    s(torch.randn(2, 3, 32, 32), mask).pow(2).mean().backward()
    assert s.mask_token.grad is not None and float(s.mask_token.grad.abs().sum()) > 0
    s.zero_grad()
    s(torch.randn(2, 3, 32, 32), None).pow(2).mean().backward()
    assert s.mask_token.grad is None or float(s.mask_token.grad.abs().sum()) == 0


def test_embed_patches_with_all_positions_kept_equals_plain_path(student):
    tokens = student.backbone.patch_embed(torch.randn(2, 3, 32, 32))
    keep = torch.arange(16).expand(2, 16)
    assert torch.allclose(embed_patches(student.backbone, tokens), embed_patches(student.backbone, tokens, keep))
    rev = keep.flip(1)
    subset = embed_patches(student.backbone, tokens.flip(1), rev)
    assert torch.allclose(subset[:, 1:], embed_patches(student.backbone, tokens)[:, 1:].flip(1))


def _checkpoint(student, path, **overrides):
    ckpt = {
        "model": student.state_dict(),
        "config": RunConfig(store="s", model="vit_tiny_patch16").model_dump(mode="json"),
        "target_dim": student.target_dim,
        "img_size": 32,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "step": 7,
    }
    ckpt.update(overrides)
    torch.save(ckpt, path)
    return path


def test_checkpoint_round_trip_returns_the_trained_backbone(student, tmp_path):
    path = _checkpoint(student, tmp_path / "ckpt.pt")
    backbone, info = load_student_backbone(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone.forward_features(x), student.forward_features(x), atol=1e-6)
    assert not backbone.training
    assert info["patch_size"] == 8 and info["grid"] == (4, 4) and info["width"] == 192
    assert info["step"] == 7 and info["target_dim"] == 24 and info["model_name"] == "vit_tiny_patch16_224"
    assert "model" not in info

    # a plain backbone state dict (student_backbone_state) is accepted too
    plain = _checkpoint(student, tmp_path / "plain.pt", model=student_backbone_state(student))
    backbone2, _ = load_student_backbone(plain)
    with torch.no_grad():
        assert torch.allclose(backbone2.forward_features(x), student.forward_features(x), atol=1e-6)


def test_bad_checkpoints_raise_one_line_errors(student, tmp_path):
    with pytest.raises(MorphcacheError, match="does not exist"):
        load_student_backbone(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MorphcacheError, match="cannot be loaded"):
        load_student_backbone(tmp_path / "junk.pt")
    torch.save({"model": student.state_dict()}, tmp_path / "partial.pt")
    with pytest.raises(MorphcacheError, match="lacks keys"):
        load_student_backbone(tmp_path / "partial.pt")
    wrong = _checkpoint(student, tmp_path / "wrong.pt",
                        config=RunConfig(store="s", model="vit_small_patch16").model_dump(mode="json"))
    with pytest.raises(MorphcacheError, match="does not fit"):
        load_student_backbone(wrong)


def test_mask_shape_mismatch_is_refused(student):
    with pytest.raises(ConfigError, match="mask shape"):
        student(torch.randn(1, 3, 32, 32), torch.zeros(1, 15, dtype=torch.bool))


def test_beit_students_use_relative_position_bias_and_train_with_dtm(tmp_path):
    """timm BEiT as the student (the release's family): relative position bias per block and shared, q/v bias
    only, layer scale; the unmasked path equals timm's forward_features, DTM trains it, checkpoints load back."""
    from morphcache.train.mae import MAEModel
    from morphcache.train.objectives import build_objective

    torch.manual_seed(0)
    beit = create_student("beit_base_patch16_224", img_size=32, target_dim=12, patch_size=8)
    bb = beit.backbone
    assert bb.pos_embed is None and bb.rel_pos_bias is not None
    assert bb.blocks[0].attn.relative_position_bias_table is not None
    assert bb.blocks[0].attn.q_bias is not None and bb.blocks[0].attn.v_bias is not None
    assert torch.allclose(bb.blocks[0].gamma_1, torch.full_like(bb.blocks[0].gamma_1, 0.1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        bb.eval()
        assert torch.allclose(beit.encode(x, None), bb.forward_features(x), atol=1e-5)
        # the relative position bias is used: changing the shared table changes the output
        before = beit(x)
        table = bb.rel_pos_bias.relative_position_bias_table
        saved = table.clone()
        table.add_(torch.randn_like(table))
        assert not torch.allclose(beit(x), before, atol=1e-4)
        table.copy_(saved)
        bb.train()
    cfg = RunConfig(store="s", model="beit_base_patch16_224", mask_min_block=2, dtm_max_merge=8, dtm_max_iters=3)
    obj = build_objective("dtm", cfg, beit, 12, (4, 4))
    groups = obj.param_groups(0.05)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(bb.blocks[0].attn.relative_position_bias_table) in no_decay
    batch = {"images": torch.randn(4, 3, 32, 32), "targets": torch.randn(4, 16, 12), "rng": np.random.default_rng(0)}
    loss, _ = obj(batch)
    loss.backward()
    assert bb.rel_pos_bias.relative_position_bias_table.grad is not None
    path = _checkpoint(beit, tmp_path / "beit.pt",
                       config=RunConfig(store="s", model="beit_base_patch16_224").model_dump(mode="json"))
    loaded, info = load_student_backbone(path)
    with torch.no_grad():
        bb.eval()
        assert torch.allclose(loaded.forward_features(x), bb.forward_features(x), atol=1e-5)
    assert info["grid"] == (4, 4)
    with pytest.raises(ConfigError, match="vit_"):
        MAEModel(bb)
