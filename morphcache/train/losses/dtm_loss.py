"""DTM loss: morph predictions and targets with the same groups, then regress, averaged over L morphing cases.

For each case (n, k) the membership is computed on the targets only (:func:`morphcache.train.dtm.dtm_membership`,
with the per-iteration counts of :func:`morphcache.train.dtm.merge_schedule`); both the student's predictions U
and the targets V are replaced by their size-weighted group means at every position, and the token-wise
regression loss is taken over all T positions. With ``target_norm="morphed"`` each morphed target token is then
standardised over its channels (naver-ai/dtm ``--normalize_target``: ``(v - mean) / sqrt(var + 1e-6)``, unbiased
variance). The loss is ``weight`` (naver-ai/dtm ``--w_dtm``) times the mean over cases. ``n = 0`` with weight 1 is
exactly :func:`~morphcache.train.losses.tokenwise_loss.tokenwise_loss` (of the standardised targets when
``target_norm="morphed"``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from morphcache.errors import ConfigError
from morphcache.train.dtm import MERGE_RULES, dtm_membership, merge_schedule, morph, sample_morph_cases
from morphcache.train.losses.regression import regression_loss


def standardize_tokens(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(..., D) -> float32, each token standardised over D: ``(x - mean) / sqrt(unbiased var + eps)``."""
    x = x.float()
    return (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True) + eps).sqrt()


def morphed_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    groups: torch.Tensor,
    kind: str = "smooth_l1",
    beta: float = 2.0,
    standardize: bool = False,
) -> torch.Tensor:
    """pred, target (B, T, D), groups (B, T) -> scalar loss between morphed predictions and morphed targets
    (each morphed target token standardised first when ``standardize``)."""
    morphed = morph(target.float(), groups)
    if standardize:
        morphed = standardize_tokens(morphed)
    return regression_loss(morph(pred.float(), groups), morphed, kind, beta)


def dtm_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    cases: list[tuple[int, int]],
    kind: str = "smooth_l1",
    beta: float = 2.0,
    rule: str = "released",
    budget: int | None = None,
    protect_top_left: bool = False,
    standardize: bool = False,
    weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``weight`` x mean of :func:`morphed_loss` over ``cases`` [(n_merge, n_iters), ...]. Returns (loss, metrics).

    ``rule``, ``budget`` (N, default T) and ``protect_top_left`` choose each case's per-iteration merge counts,
    see :func:`morphcache.train.dtm.merge_schedule`; ``standardize`` is ``target_norm="morphed"``.
    """
    losses = []
    groups_left = []
    t = target.shape[1]
    for n, k in cases:
        schedule = merge_schedule(t, n, k, rule, budget, protect_top_left)
        groups = dtm_membership(target, schedule, protect_top_left)
        losses.append(morphed_loss(pred, target, groups, kind, beta, standardize))
        groups_left.append(float(t - sum(schedule)))
    loss = weight * torch.stack(losses).mean()
    metrics = {
        "dtm_merge": sum(n for n, _ in cases) / len(cases),
        "dtm_iters": sum(k for _, k in cases) / len(cases),
        "dtm_groups": sum(groups_left) / len(groups_left),
    }
    return loss, metrics


class DTMLoss:
    """Samples one (n in [0, N], k in [1, K]) per case range per call from its own ``torch.Generator`` (seeded with
    ``seed``, checkpointed with the run; the one objective RNG besides the loop's per-step ``rng``, see
    :mod:`morphcache.train.objectives`) once per step for the whole batch, and returns :func:`dtm_loss`. The
    released rule's budget is the first case's N (naver-ai/dtm compares with ``n1`` for both cases)."""

    def __init__(
        self,
        ranges: Sequence[tuple[int, int]] = ((196, 14), (196, 14)),
        kind: str = "smooth_l1",
        beta: float = 2.0,
        seed: int = 0,
        rule: str = "released",
        protect_top_left: bool = False,
        standardize: bool = False,
        weight: float = 1.0,
    ) -> None:
        if rule not in MERGE_RULES:
            raise ConfigError(f"DTM merge rule '{rule}' is unknown; use one of {', '.join(MERGE_RULES)}")
        self.ranges = [(int(n), int(k)) for n, k in ranges]
        self.kind, self.beta = kind, beta
        self.rule, self.protect_top_left = rule, protect_top_left
        self.standardize, self.weight = bool(standardize), float(weight)
        self.generator = torch.Generator().manual_seed(seed)
        sample_morph_cases(torch.Generator().manual_seed(0), self.ranges)  # validates the ranges

    @property
    def budget(self) -> int:
        return self.ranges[0][0]

    @classmethod
    def from_config(cls, config, seed: int | None = None, n_tokens: int | None = None) -> "DTMLoss":
        """From a RunConfig: case ranges (:meth:`RunConfig.dtm_ranges`; N = None is ``n_tokens``, the whole grid,
        as the released N = 196 is for a 14x14 grid), loss, smooth_l1_beta, seed, dtm_merge_rule,
        dtm_protect_top_left, target_norm ("morphed" standardises), dtm_weight."""
        return cls(
            config.dtm_ranges(196 if n_tokens is None else int(n_tokens)),
            config.loss,
            config.smooth_l1_beta,
            config.seed if seed is None else seed,
            config.dtm_merge_rule,
            config.dtm_protect_top_left,
            config.target_norm == "morphed",
            config.dtm_weight,
        )

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        cases = sample_morph_cases(self.generator, self.ranges)
        return dtm_loss(pred, target, cases, self.kind, self.beta, self.rule, self.budget, self.protect_top_left,
                        self.standardize, self.weight)
