"""DTM loss: morph predictions and targets with the same groups, then regress, averaged over L morphing cases.

For each case (n, k) the membership is computed on the targets only (:func:`morphcache.train.dtm.dtm_membership`,
with the per-iteration counts of :func:`morphcache.train.dtm.merge_schedule`);
both the student's predictions U and the targets V are replaced by their size-weighted group means at every
position, and the token-wise regression loss is taken over all T positions. ``n = 0`` is exactly
:func:`~morphcache.train.losses.tokenwise_loss.tokenwise_loss`.
"""

from __future__ import annotations

import torch

from morphcache.errors import ConfigError
from morphcache.train.dtm import MERGE_RULES, dtm_membership, merge_schedule, morph, sample_morph_cases
from morphcache.train.losses.regression import regression_loss


def morphed_loss(
    pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, kind: str = "smooth_l1", beta: float = 2.0
) -> torch.Tensor:
    """pred, target (B, T, D), groups (B, T) -> scalar loss between morphed predictions and morphed targets."""
    return regression_loss(morph(pred.float(), groups), morph(target.float(), groups), kind, beta)


def dtm_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    cases: list[tuple[int, int]],
    kind: str = "smooth_l1",
    beta: float = 2.0,
    rule: str = "released",
    budget: int | None = None,
    protect_top_left: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean of :func:`morphed_loss` over ``cases`` [(n_merge, n_iters), ...]. Returns (loss, metrics).

    ``rule``, ``budget`` (N, default T) and ``protect_top_left`` choose each case's per-iteration merge counts,
    see :func:`morphcache.train.dtm.merge_schedule`.
    """
    losses = []
    groups_left = []
    t = target.shape[1]
    for n, k in cases:
        schedule = merge_schedule(t, n, k, rule, budget, protect_top_left)
        groups = dtm_membership(target, schedule, protect_top_left)
        losses.append(morphed_loss(pred, target, groups, kind, beta))
        groups_left.append(float(groups.max().item()) + 1.0)
    loss = torch.stack(losses).mean()
    metrics = {
        "dtm_merge": sum(n for n, _ in cases) / len(cases),
        "dtm_iters": sum(k for _, k in cases) / len(cases),
        "dtm_groups": sum(groups_left) / len(groups_left),
    }
    return loss, metrics


class DTMLoss:
    """Samples L cases of (n in [0, N], k in [1, K]) per call from its own generator (once per step, whole batch)."""

    def __init__(
        self,
        max_merge: int = 196,
        max_iters: int = 14,
        cases: int = 2,
        kind: str = "smooth_l1",
        beta: float = 2.0,
        seed: int = 0,
        rule: str = "released",
        protect_top_left: bool = False,
    ) -> None:
        if rule not in MERGE_RULES:
            raise ConfigError(f"DTM merge rule '{rule}' is unknown; use one of {', '.join(MERGE_RULES)}")
        self.max_merge, self.max_iters, self.cases = max_merge, max_iters, cases
        self.kind, self.beta = kind, beta
        self.rule, self.protect_top_left = rule, protect_top_left
        self.generator = torch.Generator().manual_seed(seed)
        sample_morph_cases(torch.Generator().manual_seed(0), max_merge, max_iters, cases)  # validates arguments

    @classmethod
    def from_config(cls, config, seed: int | None = None, n_tokens: int | None = None) -> "DTMLoss":
        """From a RunConfig: dtm_max_merge (None = ``n_tokens``, the whole grid, as the released N = 196 is for a
        14x14 grid), dtm_max_iters, dtm_cases, loss, smooth_l1_beta, seed, dtm_merge_rule, dtm_protect_top_left."""
        max_merge = config.dtm_max_merge
        if max_merge is None:
            max_merge = 196 if n_tokens is None else int(n_tokens)
        return cls(
            max_merge,
            config.dtm_max_iters,
            config.dtm_cases,
            config.loss,
            config.smooth_l1_beta,
            config.seed if seed is None else seed,
            config.dtm_merge_rule,
            config.dtm_protect_top_left,
        )

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        cases = sample_morph_cases(self.generator, self.max_merge, self.max_iters, self.cases)
        # The merge budget N of the released rule is the top of the range n is drawn from.
        return dtm_loss(pred, target, cases, self.kind, self.beta, self.rule, self.max_merge, self.protect_top_left)
