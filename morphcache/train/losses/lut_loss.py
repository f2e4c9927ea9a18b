"""LUT's loss on unmasked tokens: BYOL's ``2 - 2 cos`` between the online prediction and the EMA target."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """online (B, d) prediction, target (B, d) teacher projection (no gradient) -> mean of 2 - 2 cos, float32."""
    with torch.autocast(device_type=online.device.type, enabled=False):
        p = F.normalize(online.float(), dim=-1, eps=1e-6)
        z = F.normalize(target.float().detach(), dim=-1, eps=1e-6)
        return (2.0 - 2.0 * (p * z).sum(dim=-1)).mean()


def lut_total_loss(
    mae: torch.Tensor, unmasked: torch.Tensor, mae_weight: float = 1.0, unmasked_weight: float = 0.25
) -> torch.Tensor:
    """L = mae_weight * L_MAE + unmasked_weight * L_unmasked (LUT: 1.0 and 0.25)."""
    return mae_weight * mae + unmasked_weight * unmasked
