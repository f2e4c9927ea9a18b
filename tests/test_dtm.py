"""Dynamic Token Morphing: membership, morphing, loss, and the dtm / tokenwise objectives."""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from morphcache.errors import ConfigError
from morphcache.schemas.specs import RunConfig
from morphcache.train.dtm import (
    dtm_membership,
    membership_matrix,
    merge_schedule,
    morph,
    num_groups,
    sample_morph_cases,
)
from morphcache.train.losses import DTMLoss, dtm_loss, morphed_loss, tokenwise_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_membership(x: np.ndarray, n: int, k: int, rule: str = "released", budget: int | None = None,
                         protect_top_left: bool = False) -> np.ndarray:
    """One sample, written plainly (lists of groups, pairwise loops, float64), independent of morphcache.

    released: naver-ai/dtm engine_for_dtm.py asks for r = ceil(n/k) in each of the k iterations (floor(n/k) when
    ceil(n/k)*k exceeds the budget N) and bm/merge.py caps it at (M - protected) // 2, where the protected first
    token (class_token=True) has score -inf. exact: r_i = min(ceil(n/k), n left, M // 2).
    """
    t = x.shape[0]
    budget = t if budget is None else budget
    protected = 1 if protect_top_left else 0
    per_iter = -(-n // k)
    if rule == "released" and per_iter * k > budget:
        per_iter = n // k
    groups = [[j] for j in range(t)]
    left = n
    for _ in range(k):
        r = min(per_iter, (len(groups) - protected) // 2)
        if rule == "exact":
            r = min(r, left)
        if r <= 0:
            continue
        feats = []
        for g in groups:
            mean = sum(x[j] for j in g) / len(g)
            feats.append(mean / max(math.sqrt(float(np.dot(mean, mean))), 1e-12))
        a_ids, b_ids = list(range(0, len(groups), 2)), list(range(1, len(groups), 2))
        best, partner = [], []
        for ai in a_ids:
            scores = [float(np.dot(feats[ai], feats[bi])) for bi in b_ids]
            j = max(range(len(scores)), key=lambda q: (scores[q], -q))  # first maximum
            best.append(scores[j])
            partner.append(j)
        if protect_top_left:
            best[0] = -math.inf
        order = sorted(range(len(a_ids)), key=lambda i: -best[i])  # stable: ties keep the lower A position
        merged = set(order[:r])
        b_groups = [list(groups[bi]) for bi in b_ids]
        for i in order[:r]:
            b_groups[partner[i]] += groups[a_ids[i]]
        groups = [groups[a_ids[i]] for i in range(len(a_ids)) if i not in merged] + b_groups
        left -= r
    out = np.empty(t, dtype=np.int64)
    for gid, members in enumerate(groups):
        out[members] = gid
    return out


def _membership(x, n, k, rule="released", budget=None, protect_top_left=False):
    return dtm_membership(x, merge_schedule(x.shape[1], n, k, rule, budget, protect_top_left), protect_top_left)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 4), t=st.integers(1, 40), d=st.integers(1, 8), n=st.integers(0, 50),
       k=st.integers(1, 8), seed=st.integers(0, 10_000), rule=st.sampled_from(["released", "exact"]),
       protect=st.booleans())
def test_membership_is_a_partition_with_the_expected_group_count(b, t, d, n, k, seed, rule, protect):
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed))
    groups = _membership(x, n, k, rule, protect_top_left=protect)
    merged = sum(merge_schedule(t, n, k, rule, protect_top_left=protect))
    assert groups.shape == (b, t) and groups.dtype == torch.long
    if rule == "exact":
        assert merged <= n
    assert (num_groups(groups) == t - merged).all()
    for row in groups:
        # every original token is in exactly one group and every group id in [0, G) is non-empty
        assert (torch.bincount(row, minlength=t - merged)[: t - merged] > 0).all()
        assert int(row.min()) == 0 and int(row.max()) == t - merged - 1
    s = membership_matrix(groups)
    assert (s.sum(dim=1) == 1).all()
    if protect:
        assert (groups[:, 0] == 0).all() and (groups[:, 1:] != 0).all()  # the top-left patch stays alone


@settings(max_examples=40, deadline=None)
@given(t=st.integers(2, 30), n=st.integers(0, 40), k=st.integers(1, 6), seed=st.integers(0, 10_000),
       rule=st.sampled_from(["released", "exact"]), protect=st.booleans(), budget=st.sampled_from([None, 12]))
def test_batched_membership_matches_the_plain_reference(t, n, k, seed, rule, protect, budget):
    x = torch.randn(3, t, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    groups = _membership(x, n, k, rule, budget, protect)
    for i in range(3):
        assert groups[i].tolist() == reference_membership(x[i].numpy(), n, k, rule, budget, protect).tolist()


@functools.lru_cache(maxsize=1)
def _real_like_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 196, D) float64 tokens with image structure: 16x16 RGB patch pixels of smooth synthetic images with
    shapes and mild noise, and the final tokens of a random-weight timm ViT-Tiny on the same images."""
    from timm.models.vision_transformer import VisionTransformer

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    images = []
    for i in range(2):
        img = np.stack([xx * (0.3 + 0.2 * i), yy * 0.5, 0.5 * (xx + yy)], 0)
        cy, cx, rad = rng.uniform(0.3, 0.7, 3) * np.array([1, 1, 0.5])
        img[:, (yy - cy) ** 2 + (xx - cx) ** 2 < rad**2] = rng.uniform(0, 1, (3, 1))
        img[:, 20:90, 120:200] = rng.uniform(0, 1, (3, 1, 1))
        images.append(img + rng.normal(0, 0.02, img.shape))
    images = torch.from_numpy(np.stack(images))
    pixels = images.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(2, 196, 768)
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=0)
    with torch.no_grad():
        feats = vit.forward_features(images.float())[:, 1:].double()
    return pixels, feats


@pytest.mark.parametrize("protect", [False, True])
def test_released_rule_matches_the_plain_reference_on_real_like_tokens(protect):
    pixels, feats = _real_like_tokens()
    for tokens in (pixels, feats):
        for n, k in [(196, 14), (100, 14), (5, 9), (196, 13)]:
            groups = _membership(tokens, n, k, "released", 196, protect)
            for i in range(tokens.shape[0]):
                ref = reference_membership(tokens[i].numpy(), n, k, "released", 196, protect)
                assert groups[i].tolist() == ref.tolist(), (n, k, i)


def test_released_rule_per_iteration_counts():
    # the same r = ceil(n/k) in every iteration: n < k merges k tokens, n = 100, k = 14 merges 112
    assert merge_schedule(196, 5, 9) == [1] * 9
    assert merge_schedule(196, 100, 14) == [8] * 14 and sum(merge_schedule(196, 100, 14)) == 112
    # floor(n/k) when ceil(n/k) * k > N: ceil(196/13) = 16, 16 * 13 = 208 > 196
    assert merge_schedule(196, 196, 13) == [15] * 12 + [8]  # capped at half the tokens near the end
    assert merge_schedule(196, 196, 13, budget=300)[0] == 16
    assert merge_schedule(196, 0, 5) == []
    # half the current tokens per iteration: 196 -> ... -> 14 -> 7
    assert merge_schedule(196, 196, 14) == [14] * 13 + [7]
    # protecting the top-left patch caps each iteration at (M - 1) // 2
    assert merge_schedule(9, 100, 1) == [4] and merge_schedule(8, 100, 1, protect_top_left=True) == [3]


def test_exact_rule_per_iteration_counts():
    assert merge_schedule(196, 0, 5, "exact") == []
    assert merge_schedule(196, 10, 3, "exact") == [4, 4, 2]  # ceil(10/3) each, capped by what is left of n
    assert merge_schedule(196, 5, 9, "exact") == [1] * 5
    assert merge_schedule(8, 100, 1, "exact") == [4]  # never more than half the current tokens
    assert sum(merge_schedule(196, 196, 14, "exact")) == 189
    with pytest.raises(ConfigError):
        merge_schedule(10, 3, 0)
    with pytest.raises(ConfigError, match="merge rule"):
        merge_schedule(10, 3, 1, "tome")


def test_membership_takes_the_schedule_directly_and_checks_it():
    x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(0))
    assert num_groups(dtm_membership(x, [3, 2, 1])).tolist() == [4, 4]
    assert torch.equal(dtm_membership(x, []), torch.arange(10).expand(2, 10))
    with pytest.raises(ConfigError, match="iteration 1"):
        dtm_membership(x, [5, 3])  # 5 tokens left, at most 2 may merge
    with pytest.raises(ConfigError, match="iteration 0"):
        dtm_membership(x, [5], protect_top_left=True)  # (10 - 1) // 2 = 4
    with pytest.raises(ConfigError, match="iteration 0"):
        dtm_membership(x, [0])


def test_top_left_patch_merges_only_without_protection():
    """Token 0 is the most similar token to token 1: it merges by default and never with protect_top_left."""
    gen = torch.Generator().manual_seed(0)
    x = torch.linalg.qr(torch.randn(64, 64, generator=gen))[0][:16].unsqueeze(0)
    x[:, 1] = x[:, 0]
    assert _membership(x, 1, 1)[0, 0] == _membership(x, 1, 1)[0, 1]
    g = _membership(x, 1, 1, protect_top_left=True)[0]
    assert g[0] == 0 and g[1] != 0 and num_groups(g[None]).item() == 15
    # and under the released rule with every token asked to merge, it stays alone
    g = _membership(torch.randn(4, 196, 8, generator=gen), 196, 14, protect_top_left=True)
    assert (g[:, 0] == 0).all() and (g[:, 1:] > 0).all()


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_the_most_similar_pair_merges_first(scale):
    gen = torch.Generator().manual_seed(0)
    x = torch.linalg.qr(torch.randn(64, 64, generator=gen))[0][:16].unsqueeze(0).repeat(2, 1, 1)  # orthonormal
    x[:, 9] = scale * x[:, 4]  # token 4 (set A) and token 9 (set B) have cosine similarity 1
    groups = _membership(x, 1, 1)
    g = groups[0]
    assert g[4] == g[9]
    assert len(set(g.tolist())) == 15
    assert torch.equal(groups[0], groups[1])


def test_groups_of_a_sample_do_not_depend_on_its_batch():
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 49, 16, generator=gen)
    batch_a = torch.cat([torch.randn(2, 49, 16, generator=gen), sample, torch.randn(4, 49, 16, generator=gen)])
    batch_b = torch.cat([sample, torch.randn(1, 49, 16, generator=gen)])
    ga = _membership(batch_a, 30, 4)
    gb = _membership(batch_b, 30, 4)
    assert torch.equal(ga[2], gb[0])
    assert not torch.equal(ga[0], ga[2])


def test_morph_broadcasts_size_weighted_group_means():
    x = torch.arange(12, dtype=torch.float32).view(1, 6, 2)
    groups = torch.tensor([[0, 1, 0, 2, 0, 1]])
    out = morph(x, groups)
    expected = torch.tensor([[[4.0, 5.0], [6.0, 7.0], [4.0, 5.0], [6.0, 7.0], [4.0, 5.0], [6.0, 7.0]]])
    assert torch.allclose(out, expected)
    # equivalently S V / rowsum(S) broadcast back through S^T
    s = membership_matrix(groups).float()
    means = (s @ x) / s.sum(dim=2, keepdim=True)
    assert torch.allclose(out, s.transpose(1, 2) @ means)


def test_morph_is_differentiable_and_identity_without_merges():
    x = torch.randn(2, 10, 4, requires_grad=True)
    ident = torch.arange(10).expand(2, 10)
    assert torch.equal(morph(x, ident), x)
    groups = _membership(x.detach(), 5, 2)
    morph(x, groups).sum().backward()
    # the gradient of sum(morph(x)) w.r.t. every token is 1 (each group's mean appears |g| times)
    assert torch.allclose(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("kind", ["smooth_l1", "cosine", "l2"])
def test_n_zero_equals_the_tokenwise_loss_exactly(kind):
    gen = torch.Generator().manual_seed(2)
    pred, target = torch.randn(3, 16, 8, generator=gen), torch.randn(3, 16, 8, generator=gen)
    loss, metrics = dtm_loss(pred, target, [(0, 3), (0, 1)], kind, beta=2.0)
    assert torch.equal(loss, tokenwise_loss(pred, target, kind, 2.0))
    assert metrics["dtm_groups"] == 16


def test_morphing_changes_the_loss_and_matches_its_definition():
    gen = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
    loss, _ = dtm_loss(pred, target, [(8, 2)])
    groups = _membership(target, 8, 2)
    manual = torch.nn.functional.smooth_l1_loss(morph(pred, groups), morph(target, groups), beta=2.0)
    assert torch.allclose(loss, manual)
    assert not torch.allclose(loss, tokenwise_loss(pred, target))
    # two cases average
    l2, _ = dtm_loss(pred, target, [(8, 2), (0, 1)])
    assert torch.allclose(l2, (manual + tokenwise_loss(pred, target)) / 2)
    assert morphed_loss(target, target, groups) == 0


def test_membership_runs_in_float32_under_bf16_autocast():
    x = torch.randn(2, 16, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = _membership(x, 6, 2)
        pred = torch.randn(2, 16, 8, requires_grad=True)
        loss, _ = dtm_loss(pred.to(torch.bfloat16), x, [(6, 2)])
    assert torch.equal(g, _membership(x.float(), 6, 2))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_case_sampling_ranges_and_reproducibility():
    cases = sample_morph_cases(torch.Generator().manual_seed(0), [(196, 14)] * 500)
    ns, ks = zip(*cases)
    assert min(ns) >= 0 and max(ns) <= 196 and min(ks) >= 1 and max(ks) <= 14
    assert len(set(ns)) > 100 and set(ks) == set(range(1, 15))
    assert cases[:5] == sample_morph_cases(torch.Generator().manual_seed(0), [(196, 14)] * 500)[:5]
    # separate ranges per case (naver-ai/dtm n1, k1, n2, k2)
    pairs = [sample_morph_cases(torch.Generator().manual_seed(s), [(196, 14), (20, 3)]) for s in range(300)]
    assert max(p[1][0] for p in pairs) <= 20 and max(p[1][1] for p in pairs) <= 3
    assert max(p[0][0] for p in pairs) > 100 and max(p[0][1] for p in pairs) > 10
    with pytest.raises(ConfigError):
        sample_morph_cases(torch.Generator(), [(5, 0)])
    loss_a = DTMLoss(seed=4)
    loss_b = DTMLoss(seed=4)
    pred, target = torch.randn(2, 196, 8), torch.randn(2, 196, 8)
    assert loss_a(pred, target)[0] == loss_b(pred, target)[0]


def _tiny_student(target_dim):
    from timm.models.vision_transformer import VisionTransformer

    from morphcache.train.student import MIMStudent

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0,
                            init_values=0.1)
    return MIMStudent(vit, target_dim)


@pytest.mark.parametrize("name", ["dtm", "tokenwise"])
def test_distillation_objectives_train(name):
    from morphcache.train.objectives import build_objective

    cfg = RunConfig(store="s", objective=name, mask_patches=75, mask_min_block=2, dtm_max_merge=8, dtm_max_iters=3)
    student = _tiny_student(12)
    obj = build_objective(name, cfg, student, 12, (4, 4))
    gen = torch.Generator().manual_seed(5)
    batch = {"images": torch.randn(4, 3, 32, 32, generator=gen), "targets": torch.randn(4, 16, 12, generator=gen)}
    opt = torch.optim.AdamW(obj.param_groups(0.05), lr=3e-3)
    losses = []
    for step in range(25):
        loss, metrics = obj({**batch, "rng": np.random.default_rng(step)})  # mask drawn by the objective
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_step(step, 25)
        losses.append(metrics["loss"])
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    if name == "dtm":
        assert {"dtm_merge", "dtm_iters", "dtm_groups"} <= set(metrics)


def test_objective_refuses_mismatched_targets_and_grid():
    from morphcache.train.objectives import build_objective

    cfg = RunConfig(store="s")
    student = _tiny_student(12)
    with pytest.raises(ConfigError, match="grid"):
        build_objective("dtm", cfg, student, 12, (5, 5))
    obj = build_objective("dtm", cfg, student, 12, (4, 4))
    with pytest.raises(ConfigError, match="targets"):
        obj({"images": torch.randn(2, 3, 32, 32), "targets": torch.randn(2, 16, 7)})
    with pytest.raises(ConfigError, match="targets"):
        obj({"images": torch.randn(2, 3, 32, 32)})
    with pytest.raises(ConfigError, match="unknown objective"):
        build_objective("beit", cfg, student, 12, (4, 4))


def test_default_schedule_matches_released_bounds():
    # N = 196, K = 14 at a 14x14 grid: r_p = ceil(n / k), at most half the tokens per iteration
    for n, k in [(196, 14), (100, 1), (13, 7)]:
        sched = merge_schedule(196, n, k)
        assert all(r <= math.ceil(n / k) for r in sched)
        assert len(sched) <= k


def test_default_merge_budget_scales_to_the_grid():
    """Released N = 196 means 'every token of a 14x14 grid'; by default N follows the store's grid."""
    from morphcache.schemas import RunConfig
    from morphcache.train.losses.dtm_loss import DTMLoss

    assert DTMLoss.from_config(RunConfig(store="s"), n_tokens=64).ranges == [(64, 14), (64, 14)]
    assert DTMLoss.from_config(RunConfig(store="s"), n_tokens=256).budget == 256
    assert DTMLoss.from_config(RunConfig(store="s", dtm_max_merge=10), n_tokens=64).budget == 10
    per_case = RunConfig(store="s", dtm_case_ranges=[(30, 4), (10, 2), (5, 1)])
    assert DTMLoss.from_config(per_case, n_tokens=64).ranges == [(30, 4), (10, 2), (5, 1)]


def test_layernorm_targets_are_scale_invariant():
    """--target-norm layernorm regresses per-token standardized teacher tokens (MaskDistill-style)."""
    from morphcache.schemas import RunConfig
    from morphcache.train.objectives import build_objective, normalize_targets
    from morphcache.train.student import create_student

    t = torch.randn(2, 4, 8) * 5 + 3
    n = normalize_targets(t, "layernorm")
    assert torch.allclose(n.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(n.var(-1, unbiased=False), torch.ones(2, 4), atol=1e-3)
    assert normalize_targets(t, "none") is t

    torch.manual_seed(0)
    student = create_student("vit_tiny_patch16_224", 32, 8)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    losses = {}
    for norm in ("layernorm", "none"):
        objective = build_objective("tokenwise", RunConfig(store="s", target_norm=norm), student, 8, (2, 2))
        with torch.no_grad():
            losses[norm] = [float(objective({"images": images, "targets": t * s, "mask": mask})[0]) for s in (1.0, 10.0)]
    assert losses["layernorm"][0] == pytest.approx(losses["layernorm"][1], rel=1e-4)
    assert losses["none"][1] > 5 * losses["none"][0]


def test_merge_rule_and_top_left_options_reach_the_loss():
    cfg = RunConfig(store="s", dtm_max_merge=30, dtm_max_iters=14, dtm_cases=8)
    assert (cfg.dtm_merge_rule, cfg.dtm_protect_top_left) == ("released", False)
    gen = torch.Generator().manual_seed(6)
    pred, target = torch.randn(2, 49, 8, generator=gen), torch.randn(2, 49, 8, generator=gen)
    losses = {}
    for rule in ("released", "exact"):
        for protect in (False, True):
            loss_fn = DTMLoss.from_config(cfg.model_copy(update={"dtm_merge_rule": rule, "dtm_protect_top_left": protect}),
                                          n_tokens=49)
            assert (loss_fn.rule, loss_fn.protect_top_left) == (rule, protect)
            losses[rule, protect] = float(loss_fn(pred, target)[0])  # same seed, so the same (n, k) cases
    assert len(set(losses.values())) == 4
    with pytest.raises(ValueError):
        RunConfig(store="s", dtm_merge_rule="tome")


def _knob_loss(objective_name="dtm", **fields):
    """The loss of one dtm / tokenwise objective step with a fixed student, batch, mask and morphing cases."""
    from morphcache.train.objectives import build_objective

    base = dict(store="s", objective=objective_name, mask_min_block=2, dtm_max_merge=12, dtm_max_iters=4)
    cfg = RunConfig(**{**base, **fields})
    obj = build_objective(objective_name, cfg, _tiny_student(12), 12, (4, 4))
    gen = torch.Generator().manual_seed(11)
    batch = {"images": torch.randn(4, 3, 32, 32, generator=gen),
             "targets": torch.randn(4, 16, 12, generator=gen) * 3 + 1, "rng": np.random.default_rng(11)}
    with torch.no_grad():
        return float(obj(batch)[0])


@pytest.mark.parametrize("fields", [
    dict(dtm_case_ranges=[(12, 4), (2, 1)]),
    dict(dtm_weight=0.5),
    dict(loss="l1"),
    dict(target_norm="morphed"),
    dict(mask_max_block=3),
    dict(mask_scale_blocks=True, mask_min_block=60),
])
def test_every_dtm_knob_reaches_the_loss(fields):
    assert _knob_loss(**fields) != pytest.approx(_knob_loss(), rel=1e-6)


def test_dtm_weight_scales_the_loss_and_l1_is_the_mean_absolute_error():
    assert _knob_loss(dtm_weight=0.5) == pytest.approx(0.5 * _knob_loss(), rel=1e-5)
    pred, target = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    assert torch.allclose(tokenwise_loss(pred, target, "l1"), torch.nn.functional.l1_loss(pred, target))


def test_morphed_target_norm_standardises_each_morphed_target_token():
    """naver-ai/dtm --normalize_target: morph the targets, then standardise each token (unbiased var, eps 1e-6)."""
    from morphcache.train.losses.dtm_loss import standardize_tokens

    gen = torch.Generator().manual_seed(8)
    pred, target = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen) * 4 + 2
    loss, _ = dtm_loss(pred, target, [(6, 2)], standardize=True)
    groups = _membership(target, 6, 2)  # matching sees the raw targets
    morphed = morph(target, groups)
    ref = (morphed - morphed.mean(-1, keepdim=True)) / (morphed.var(-1, keepdim=True) + 1e-6).sqrt()
    manual = torch.nn.functional.smooth_l1_loss(morph(pred, groups), ref, beta=2.0)
    assert torch.allclose(loss, manual, atol=1e-6)
    assert torch.allclose(standardize_tokens(morphed), ref, atol=1e-6)
    # standardising before morphing (layernorm) is a different target: a morphed mean of standardised tokens is
    # not itself standardised
    assert not torch.allclose(morph(standardize_tokens(target), groups), ref, atol=1e-3)
    # so the loss does not depend on the targets' scale
    scaled, _ = dtm_loss(pred, target * 7.0, [(6, 2)], standardize=True)
    assert torch.allclose(scaled, loss, rtol=1e-4)
