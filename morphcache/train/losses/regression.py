"""Per-token regression losses between predicted and target tokens, registered in
:data:`morphcache.registries.losses` (``RunConfig.loss`` names one).

Built in (all computed in float32, safe under bf16 autocast, reducing over channels first):

- ``smooth_l1``: Huber with transition ``beta`` (DTM's released default 2.0), mean over channels;
- ``l1``: absolute error, mean over channels (naver-ai/dtm ``--loss_type l1``);
- ``l2``: squared error, mean over channels;
- ``cosine``: ``1 - cos(pred, target)`` per token.

A new loss is one function plus a decorator, taking float32 ``pred`` and ``target`` ``(B, T, D)`` (the target
detached) and the keyword ``beta`` (``RunConfig.smooth_l1_beta``; ignore it if the loss has no such knob), and
returning the per-token loss ``float32 (B, T)``::

    @morphcache.registries.losses.register("my_loss")
    def my_loss(pred, target, *, beta):
        return (pred - target).abs().max(dim=-1).values
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from morphcache import registries
from morphcache.errors import ConfigError


@registries.losses.register("smooth_l1")
def smooth_l1(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 2.0) -> torch.Tensor:
    """Huber loss with transition ``beta`` (> 0), mean over channels: ``(B, T, D) -> (B, T)``.

    Raises:
        ConfigError: ``beta <= 0``.
    """
    if beta <= 0:
        raise ConfigError(f"smooth_l1_beta={beta} must be > 0")
    return F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(dim=-1)


@registries.losses.register("l1")
def l1(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 2.0) -> torch.Tensor:
    """Absolute error, mean over channels: ``(B, T, D) -> (B, T)`` (``beta`` unused)."""
    return (pred - target).abs().mean(dim=-1)


@registries.losses.register("l2")
def l2(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 2.0) -> torch.Tensor:
    """Squared error, mean over channels: ``(B, T, D) -> (B, T)`` (``beta`` unused)."""
    return (pred - target).pow(2).mean(dim=-1)


@registries.losses.register("cosine")
def cosine(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 2.0) -> torch.Tensor:
    """``1 - cos(pred, target)`` per token: ``(B, T, D) -> (B, T)`` (``beta`` unused)."""
    return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)


def token_regression_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1", beta: float = 2.0
) -> torch.Tensor:
    """pred, target ``(B, T, D)`` -> per-token loss ``float32 (B, T)`` of the registered loss ``kind``.

    Raises:
        ConfigError: shapes differ, ``kind`` is not registered (the message lists what is), or the loss's own check
            fails (e.g. smooth_l1 with ``beta <= 0``).
    """
    if pred.shape != target.shape:
        raise ConfigError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ")
    loss = registries.lookup(registries.losses, kind)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        return loss(pred.float(), target.float().detach(), beta=beta)


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
