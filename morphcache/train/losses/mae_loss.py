"""MAE reconstruction loss: per-patch normalised pixel targets, mean squared error on masked patches only."""

from __future__ import annotations

import torch

from morphcache.errors import ConfigError


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, p*p*C) in row-major patch order (timm's token order), pixels (p, p, C) per patch."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ConfigError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, p*p*C) float32 targets; with ``norm_pix`` each patch is standardised (MAE)."""
    target = patchify(images.float(), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True)
        target = (target - mean) / (var + eps).sqrt()
    return target


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target (B, T, P), mask (B, T) bool (True = masked) -> MSE averaged over masked patches (float32)."""
    if pred.shape != target.shape:
        raise ConfigError(f"MAE prediction {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
        w = mask.to(device=pred.device, dtype=torch.float32)
        return (per_patch * w).sum() / w.sum().clamp_min(1.0)
