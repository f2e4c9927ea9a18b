"""Plain token-wise distillation (DTM with n = 0): regress every predicted token onto its own target token."""

from __future__ import annotations

import torch

from morphcache.train.losses.regression import regression_loss


def tokenwise_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str = "smooth_l1",
    beta: float = 2.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """pred, target (B, T, D) -> scalar, averaged over channels and all T positions (masked and visible).

    ``weight`` (B, T) restricts the average (e.g. to masked positions only); ``None`` covers all tokens.
    """
    return regression_loss(pred, target, kind, beta, weight)
