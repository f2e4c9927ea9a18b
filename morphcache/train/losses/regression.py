"""Per-token regression losses between predicted and target tokens (smooth-L1, L1, cosine, L2).

All are computed in float32 (safe under bf16 autocast) and reduce over channels first:

- ``smooth_l1``: Huber with transition ``beta`` (DTM's released default 2.0), mean over channels;
- ``l1``: absolute error, mean over channels (naver-ai/dtm ``--loss_type l1``);
- ``l2``: squared error, mean over channels;
- ``cosine``: ``1 - cos(pred, target)`` per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from morphcache.errors import ConfigError

LOSS_KINDS = ("smooth_l1", "l1", "cosine", "l2")


def token_regression_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1", beta: float = 2.0
) -> torch.Tensor:
    """pred, target (B, T, D) -> per-token loss (B, T) float32."""
    if pred.shape != target.shape:
        raise ConfigError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p = pred.float()
        t = target.float().detach()
        if kind == "smooth_l1":
            if beta <= 0:
                raise ConfigError(f"smooth_l1_beta={beta} must be > 0")
            return F.smooth_l1_loss(p, t, reduction="none", beta=beta).mean(dim=-1)
        if kind == "l1":
            return (p - t).abs().mean(dim=-1)
        if kind == "l2":
            return (p - t).pow(2).mean(dim=-1)
        if kind == "cosine":
            return 1.0 - F.cosine_similarity(p, t, dim=-1, eps=1e-6)
    raise ConfigError(f"unknown loss '{kind}'; use one of {', '.join(LOSS_KINDS)}")


def regression_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str = "smooth_l1",
    beta: float = 2.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar mean of :func:`token_regression_loss` over tokens (and the batch).

    ``weight`` (B, T) optionally selects / weighs tokens (e.g. a bool mask); the mean is then weighted.
    """
    per_token = token_regression_loss(pred, target, kind, beta)
    if weight is None:
        return per_token.mean()
    w = weight.to(device=per_token.device, dtype=torch.float32)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)
