"""MAE (random masking, light decoder, pixel loss), LUT (disjoint keeps, EMA teacher), and their objectives."""

import itertools

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from morphcache.errors import ConfigError
from morphcache.schemas.specs import IMAGENET_MEAN, IMAGENET_STD, RunConfig
from morphcache.train.losses import byol_loss, mae_loss, patchify, pixel_targets
from morphcache.train.lut import EMATeacher, MLPHead, cosine_momentum, disjoint_keep_sets
from morphcache.train.mae import MAEModel, keep_to_mask, random_masking, sincos_2d
from morphcache.train.objectives import build_objective
from morphcache.train.student import MIMStudent, load_student_backbone

SMALL = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4, proj_hidden=64, proj_dim=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0,
                             init_values=0.1)


def _images(b=8, seed=0):
    """Smooth structured images (gradients + a bright square), so pixels are predictable from context."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    imgs = []
    for _ in range(b):
        a, c, ph = torch.rand(3, generator=gen) * 3
        base = torch.stack([torch.sin(a * xx + ph), torch.cos(c * yy - ph), torch.sin(a * xx + c * yy)])
        top, left = torch.randint(0, 24, (2,), generator=gen).tolist()
        base[:, top : top + 8, left : left + 8] += 1.5
        imgs.append(base)
    return torch.stack(imgs)


def test_patchify_uses_row_major_token_order():
    img = torch.zeros(1, 3, 16, 24)
    for r in range(2):
        for c in range(3):
            img[..., r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = r * 3 + c
    patches = patchify(img, 8)
    assert patches.shape == (1, 6, 192)
    assert torch.equal(patches[0].mean(dim=1), torch.arange(6, dtype=torch.float32))
    with pytest.raises(ConfigError):
        patchify(torch.zeros(1, 3, 20, 20), 8)


def test_pixel_targets_are_normalised_per_patch():
    t = pixel_targets(torch.randn(2, 3, 32, 32) * 5 + 3, 8, norm_pix=True)
    assert torch.allclose(t.mean(dim=-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(t.std(dim=-1), torch.ones(2, 16), atol=1e-3)


def test_random_masking_counts_and_reproducibility():
    keep, mask = random_masking(5, 196, 0.75, np.random.default_rng(0))
    assert keep.shape == (5, 49) and mask.shape == (5, 196)
    assert (mask.sum(dim=1) == 147).all()
    assert (keep.diff(dim=1) > 0).all()
    assert not mask.gather(1, keep).any()
    keep2, _ = random_masking(5, 196, 0.75, np.random.default_rng(0))
    assert torch.equal(keep, keep2)
    keep3, _ = random_masking(5, 196, 0.75, np.random.default_rng(1))
    assert not torch.equal(keep, keep3)
    with pytest.raises(TypeError, match="numpy"):
        random_masking(1, 16, 0.5, torch.Generator())
    with pytest.raises(ConfigError):
        random_masking(1, 16, 1.0, np.random.default_rng(0))


def test_mae_encoder_never_sees_masked_pixels_and_loss_covers_masked_only():
    model = MAEModel(_tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=4).eval()
    x = torch.randn(2, 3, 32, 32)
    keep, mask = model.sample_keep(2, np.random.default_rng(1))
    y = x.clone()
    for b in range(2):
        for pos in torch.nonzero(mask[b]).flatten().tolist():
            r, c = divmod(pos, 4)
            y[b, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = torch.randn(3, 8, 8)
    with torch.no_grad():
        out_x, out_y = model(x, keep), model(y, keep)
    assert out_x.latent.shape == (2, 1 + 4, 48)
    assert out_x.pixels.shape == (2, 16, 192) and out_x.features.shape == (2, 16, 32)
    assert torch.allclose(out_x.latent, out_y.latent, atol=1e-6)
    assert torch.allclose(out_x.pixels, out_y.pixels, atol=1e-6)
    # the loss only looks at masked patches
    target = pixel_targets(x, 8)
    pred = torch.where(mask.unsqueeze(-1), target, torch.full_like(target, 1e3))
    assert float(mae_loss(pred, target, mask)) == 0.0
    assert float(mae_loss(pred, target, ~mask)) > 1e5


def test_decoder_position_table():
    table = sincos_2d(32, (4, 4))
    assert table.shape == (1, 16, 32)
    assert len({tuple(row.tolist()) for row in table[0]}) == 16
    with pytest.raises(ConfigError):
        sincos_2d(30, (4, 4))


def test_lut_keep_sets_are_disjoint():
    k1, k2 = disjoint_keep_sets(16, 196, 49, np.random.default_rng(0))
    assert k1.shape == k2.shape == (16, 49)
    for a, b in zip(k1.tolist(), k2.tolist()):
        assert len(set(a)) == 49 and len(set(b)) == 49 and not set(a) & set(b)
    assert not torch.equal(keep_to_mask(k1, 196), keep_to_mask(k2, 196))
    with pytest.raises(ConfigError):
        disjoint_keep_sets(1, 10, 6, np.random.default_rng(0))


def test_momentum_schedule_is_cosine_from_0996_to_1():
    assert cosine_momentum(0, 100) == pytest.approx(0.996)
    assert cosine_momentum(50, 100) == pytest.approx(0.998)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    values = [cosine_momentum(s, 100) for s in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_ema_teacher_gets_no_gradient_and_follows_the_update_rule():
    student = MLPHead(8, 16, 4)
    teacher = EMATeacher({"head": student})
    x = torch.randn(6, 8)
    (byol_loss(student(x), teacher.parts["head"](x))).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    teacher.update({"head": student}, 0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s)


def test_lut_teacher_batchnorm_runs_in_eval_mode_with_emad_running_statistics():
    """naver-ai/lut: the teacher is a deep copy in eval mode; its BN running stats are EMA'd like the weights."""
    student = MLPHead(8, 16, 4)
    teacher = EMATeacher({"head": student})
    bn_t, bn_s = teacher.parts["head"][1], student[1]
    teacher.train()  # the objective's .train() reaches the teacher: it must stay in eval mode
    assert not teacher.training and not bn_t.training
    mean0, var0 = bn_t.running_mean.clone(), bn_t.running_var.clone()
    student(torch.randn(32, 8) * 3 + 2)  # a training forward moves the student's running statistics
    assert not torch.allclose(bn_s.running_mean, mean0)
    teacher.update({"head": student}, 0.9)
    assert torch.allclose(bn_t.running_mean, 0.9 * mean0 + 0.1 * bn_s.running_mean)
    assert torch.allclose(bn_t.running_var, 0.9 * var0 + 0.1 * bn_s.running_var)
    assert bn_t.num_batches_tracked == bn_s.num_batches_tracked
    # eval mode: the output uses the running statistics, so one sample's output does not depend on its batch
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(teacher.parts["head"](x)[:1], teacher.parts["head"](x[:1]), atol=1e-6)
    before = bn_t.running_mean.clone()  # and a teacher forward never updates them
    with torch.no_grad():
        teacher.parts["head"](x * 10)
    assert torch.equal(bn_t.running_mean, before)
    # projector / predictor layers carry no bias (release _build_mlp)
    assert student[0].bias is None and student[3].bias is None


def test_lut_reconstructs_view_1_only():
    """Changing view 2 leaves the MAE loss unchanged; changing view 1 changes it (naver-ai/lut forward_loss)."""
    obj = _lut_objective()
    x1, x2 = _images(4, 0), _images(4, 1)
    out = {}
    for name, (a, b) in {"base": (x1, x2), "v2": (x1, x2 * 0.5 + 1), "v1": (x1 * 0.5 + 1, x2)}.items():
        with torch.no_grad():
            out[name] = obj({"images": a, "images2": b, "rng": np.random.default_rng(9)})[1]
    assert out["v2"]["mae"] == pytest.approx(out["base"]["mae"], rel=1e-6)
    assert out["v2"]["unmasked"] != pytest.approx(out["base"]["unmasked"], rel=1e-4)
    assert out["v1"]["mae"] != pytest.approx(out["base"]["mae"], rel=1e-4)


def _lut_objective(seed=0):
    cfg = RunConfig(store="s", objective="lut", **SMALL)
    return build_objective("lut", cfg, MIMStudent(_tiny_vit(seed), 12), 12, (4, 4))


def test_lut_steps_lower_both_losses_and_move_the_teacher_by_ema():
    obj = _lut_objective()
    x1 = _images(8, 0)
    x2 = torch.flip(_images(8, 0), dims=[3]) * 0.9  # a second view of the same images
    opt = torch.optim.AdamW(obj.param_groups(0.05), lr=2e-3)
    teacher_params = list(obj.learner.teacher.parameters())
    assert teacher_params and all(not p.requires_grad for p in teacher_params)
    ids = {id(p) for group in obj.param_groups(0.05) for p in group["params"]}
    assert not ids & {id(p) for p in teacher_params}
    hist = {"mae": [], "unmasked": []}
    steps = 30
    for step in range(steps):
        # same masks every step: a fixed problem to fit
        loss, metrics = obj({"images": x1, "images2": x2, "rng": np.random.default_rng(123)})
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher_params)
        opt.step()
        student_w = obj.model.backbone.patch_embed.proj.weight.detach().clone()
        teacher_w = obj.learner.teacher.parts["backbone"].patch_embed.proj.weight.detach().clone()
        obj.after_step(step, steps)
        m = cosine_momentum(step, steps)
        new_teacher = obj.learner.teacher.parts["backbone"].patch_embed.proj.weight
        assert torch.allclose(new_teacher, m * teacher_w + (1 - m) * student_w, atol=1e-7)
        for k in hist:
            hist[k].append(metrics[k])
    # metrics report the momentum of the latest teacher update before this forward (step steps - 2)
    assert metrics["momentum"] == pytest.approx(cosine_momentum(steps - 2, steps))
    assert np.mean(hist["mae"][-5:]) < 0.9 * np.mean(hist["mae"][:5])
    assert np.mean(hist["unmasked"][-5:]) < 0.9 * np.mean(hist["unmasked"][:5])


def test_lut_needs_a_second_view_and_ignores_targets():
    obj = _lut_objective()
    with pytest.raises(ConfigError, match="images2"):
        obj({"images": _images(4), "rng": np.random.default_rng(0)})


@pytest.mark.parametrize("name", ["mae", "mae+dtm"])
def test_mae_objectives_train(name):
    cfg = RunConfig(store="s", objective=name, dtm_max_merge=8, dtm_max_iters=3, **SMALL)
    student = MIMStudent(_tiny_vit(), 12)
    obj = build_objective(name, cfg, student, 12, (4, 4))
    assert obj.model.backbone is student.backbone
    gen = torch.Generator().manual_seed(3)
    batch = {"images": _images(8, 1), "targets": torch.randn(8, 16, 12, generator=gen)}
    opt = torch.optim.AdamW(obj.param_groups(0.05), lr=2e-3)
    losses = []
    for step in range(25):
        loss, metrics = obj({**batch, "rng": np.random.default_rng(7)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(metrics)
    assert np.mean([m["mae"] for m in losses[-5:]]) < 0.9 * np.mean([m["mae"] for m in losses[:5]])
    if name == "mae+dtm":
        assert np.mean([m["dtm"] for m in losses[-5:]]) < 0.9 * np.mean([m["dtm"] for m in losses[:5]])
        assert metrics["loss"] == pytest.approx(cfg.mae_weight * metrics["mae"] + metrics["dtm"], rel=1e-5)
        with pytest.raises(ConfigError, match="targets"):
            obj({"images": batch["images"], "rng": np.random.default_rng(7)})


def test_mae_objective_model_checkpoint_loads_as_the_backbone(tmp_path):
    from morphcache.train.student import create_student

    cfg = RunConfig(store="s", objective="mae+dtm", model="vit_tiny_patch16", **SMALL)
    student = create_student(cfg.model, img_size=32, target_dim=12, patch_size=8)
    obj = build_objective("mae+dtm", cfg, student, 12, (4, 4))
    with torch.no_grad():
        for p in obj.model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained" weights differ from any fresh init
    torch.save({"model": obj.model.state_dict(), "config": cfg.model_dump(mode="json"), "target_dim": 12,
                "img_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, tmp_path / "ckpt.pt")
    backbone, info = load_student_backbone(tmp_path / "ckpt.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone.forward_features(x), obj.model.backbone.eval().forward_features(x), atol=1e-6)
    assert info["grid"] == (4, 4)


def test_objectives_are_bf16_autocast_safe():
    for name in ("mae+dtm", "lut"):
        cfg = RunConfig(store="s", objective=name, dtm_max_merge=8, dtm_max_iters=3, **SMALL)
        obj = build_objective(name, cfg, MIMStudent(_tiny_vit(), 12), 12, (4, 4))
        batch = {"images": _images(4), "images2": _images(4, 5), "targets": torch.randn(4, 16, 12),
                 "rng": np.random.default_rng(0)}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, metrics = obj(batch)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(np.isfinite(v) for v in metrics.values())


def test_lut_view_parameters_follow_the_release_recipe():
    """Statistics of the sampled view rows against naver-ai/lut's TwoGlobalViewAugmentation: near-full square
    crops (shorter side; offsets over the whole 4-pixel reflect padding, i.e. reaching outside the image), flip
    1/2, view 1 without colour or effects, view 2 jittered with p 0.8 in the release's ranges (the four ops in a
    uniformly random order) and then exactly one of grayscale / solarize / blur (radius U(0.1, 2)) with p 1/3
    each, independently of the jitter. n = 24000:
    every tolerance is >= 4.5 standard errors, and a changed probability (e.g. jitter 0.5 or 1.0, a choice of
    1/2 or 1/4) misses it by far."""
    from morphcache.extract.render_pil import reflect_pads
    from morphcache.train.lut_views import lut_view_rows

    n, size = 24000, 32
    h, w = 48, 80  # resized to 32 x 53: top offsets in [-4, 4], left in [-4, 25] resized pixels (x 1.5 source)
    rows = [lut_view_rows((h, w), size, seed=0, sample=i, row=i % 7) for i in range(n)]
    v1 = np.stack([r[0] for r in rows])
    v2 = np.stack([r[1] for r in rows])
    assert v1.shape == v2.shape == (n, 13)
    for v in (v1, v2):
        assert np.all(v[:, 2] == 48) and np.all(v[:, 3] == 48)  # the shorter side, square
        assert set(np.unique(v[:, 0])) == {round(1.5 * k) for k in range(-4, 5)}  # both borders, 4 px past each
        assert v[:, 1].min() == -6 and v[:, 1].max() == round(1.5 * 25)  # up to 4 resized pixels past either side
        assert abs(np.mean(v[:, 0] < 0) - 4 / 9) < 0.015 and abs(np.mean(v[:, 0] > 0) - 4 / 9) < 0.015
        assert abs(np.mean(v[:, 1] < 0) - 4 / 30) < 0.01 and abs(np.mean(v[:, 1] > w - 48) - 4 / 30) < 0.01
        assert abs(v[:, 4].mean() - 0.5) < 0.015
        for r in v[:200]:  # the renderers mirror what lies outside: never more than the release's 4 pixels
            assert max(reflect_pads(*(int(x) for x in r[:4]), h, w, size)) <= 4
    assert np.all(v1[:, 5:] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # view 1: no colour op, no effect
    jittered = v2[:, 5] != 1.0
    assert abs(jittered.mean() - 0.8) < 0.015
    assert np.all((v2[~jittered, 5:8] == 1.0)) and np.all(v2[~jittered, 8] == 0.0) and np.all(v2[~jittered, 12] == 0)
    orders = v2[jittered, 12].astype(int)
    assert set(orders) == {int("".join(map(str, p))) for p in itertools.permutations((1, 2, 3, 4))}  # all 24
    for op in "1234":  # each op comes first (and last) a quarter of the time
        assert abs(np.mean([str(o)[0] == op for o in orders]) - 0.25) < 0.016
        assert abs(np.mean([str(o)[-1] == op for o in orders]) - 0.25) < 0.016
    b, c, s, hue = v2[jittered, 5], v2[jittered, 6], v2[jittered, 7], v2[jittered, 8]
    assert b.min() >= 0.6 and b.max() <= 1.4 and c.min() >= 0.6 and c.max() <= 1.4
    assert b.min() < 0.61 and b.max() > 1.39 and c.min() < 0.61 and c.max() > 1.39
    assert abs(hue).max() <= 0.1 and abs(hue).max() > 0.099 and abs(hue.mean()) < 0.005
    assert abs(b.mean() - 1) < 0.01 and abs(c.mean() - 1) < 0.01
    assert s.min() >= 0.8 and s.max() <= 1.2 and s.min() < 0.81 and s.max() > 1.19
    gray, sol, blur = v2[:, 11] == 1.0, v2[:, 9] == 1.0, v2[:, 10] > 0
    assert np.all(gray.astype(int) + sol + blur == 1)  # exactly one of the three on every second view
    assert np.all((v2[:, 9] == 0) | sol) and np.all((v2[:, 11] == 0) | gray) and np.all(v2[~blur, 10] == 0)
    for share in (gray, sol, blur):
        assert abs(share.mean() - 1 / 3) < 0.015
        assert abs(share[jittered].mean() - 1 / 3) < 0.017  # independent of the jitter
    sigma = v2[blur, 10]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and sigma.min() < 0.11 and sigma.max() > 1.99
    assert abs(sigma.mean() - 1.05) < 0.03 and abs(np.mean(sigma < 0.575) - 0.25) < 0.025  # uniform
    # a pure function of (seed, sample, row): the DALI workers and the PIL fallback draw the same rows
    again = lut_view_rows((h, w), size, seed=0, sample=5, row=5 % 7)
    assert np.array_equal(again[0], rows[5][0]) and np.array_equal(again[1], rows[5][1])


def test_lut_views_render_alike_with_dali_and_the_pil_fallback():
    """LUT's rows (bicubic, as the loaders render them) with ordered jitter, grayscale, solarize, blur and
    mirrored windows:
    within test_render's cubic bounds (a pixel next to the solarize threshold may flip by ~1 level)."""
    from morphcache.extract.images import canonicalize_bytes, encode_png
    from morphcache.extract.render_fidelity import compare_renderers
    from morphcache.train.lut_views import lut_view_rows

    rng = np.random.default_rng(0)
    encs, params, hws = [], [], []
    for i, (h, w) in enumerate([(40, 64), (64, 48), (50, 50)]):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1) + rng.normal(0, 8, (h, w, 3))
        enc, _ = canonicalize_bytes(encode_png(np.clip(img, 0, 255).astype(np.uint8)), "x.png")
        for sample in range(8):
            for view in lut_view_rows((h, w), 32, seed=1, sample=sample, row=i):
                encs.append(enc)
                params.append(view)
                hws.append((h, w))
    params, hws = np.stack(params), np.array(hws)
    second = params[1::2]
    assert (second[:, 11] == 1).any() and (second[:, 9] == 1).any() and (second[:, 10] > 0).any()
    assert (second[:, 12] > 0).any()
    outside = (params[:, 0] < 0) | (params[:, 1] < 0) | (params[:, 0] + params[:, 2] > hws[:, 0]) \
        | (params[:, 1] + params[:, 3] > hws[:, 1])
    assert outside.any()
    stats = compare_renderers(encs, params, size=32, interpolation="cubic", batch_size=8)
    assert stats["mean_abs_pixel"] < 0.03 and stats["max_abs_pixel"] < 1.5, stats


@pytest.mark.parametrize("fields", [dict(decoder_dim=48, decoder_heads=4), dict(decoder_depth=2),
                                    dict(decoder_heads=8), dict(mask_ratio=0.5), dict(proj_hidden=32),
                                    dict(proj_dim=16), dict(norm_pix=False)])
def test_every_lut_size_knob_reaches_the_loss(fields):
    def loss_of(**extra):
        torch.manual_seed(0)
        cfg = RunConfig(store="s", objective="lut", **{**SMALL, **extra})
        obj = build_objective("lut", cfg, MIMStudent(_tiny_vit(0), 12), 12, (4, 4))
        torch.manual_seed(1)
        with torch.no_grad():
            return float(obj({"images": _images(4, 0), "images2": _images(4, 1), "rng": np.random.default_rng(4)})[0])

    assert loss_of(**fields) != pytest.approx(loss_of(), rel=1e-6)


def test_release_sizes_are_the_defaults_and_cpu_small_is_named():
    from morphcache.schemas.specs import RUN_PRESETS

    cfg = RunConfig(store="s", objective="lut")
    assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.mask_ratio) == (512, 8, 16, 0.75)
    assert (cfg.proj_hidden, cfg.proj_dim) == (4096, None) and cfg.effective_betas() == (0.9, 0.95)
    obj = build_objective("lut", cfg.model_copy(update={"decoder_depth": 1}), MIMStudent(_tiny_vit(), 12), 12, (4, 4))
    proj = obj.learner.projector
    assert (proj[0].in_features, proj[0].out_features, proj[3].out_features) == (48, 4096, 48)  # width -> 4096 -> width
    assert RUN_PRESETS["cpu-small"]["decoder_dim"] == 256
