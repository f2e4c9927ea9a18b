"""LUT (Kim, Chun, Heo, Han, ECCV 2024): MAE plus a BYOL-style loss on the student's unmasked tokens.

Per step, two views x1, x2 of each image:

- one random permutation of the T grid positions per sample gives two *disjoint* keep sets of K = T(1 - ratio)
  positions each (view 1 keeps ``perm[:K]``, view 2 keeps ``perm[K:2K]``; needs ratio >= 0.5);
- the student (an :class:`~morphcache.train.mae.MAEModel`) encodes each view's kept patches; the decoder
  reconstructs the masked patches (MAE loss on normalised pixels);
- the mean of the student's unmasked (kept) patch tokens -> projector -> predictor gives q1, q2;
- an EMA teacher (copies of the backbone and projector, no gradient) encodes the *full* other view, mean of its
  patch tokens -> projector gives z2, z1;
- L_unmasked = (byol(q1, z2) + byol(q2, z1)) / 2 with byol = 2 - 2 cos; L_MAE = mean over both views;
  total = mae_weight * L_MAE + unmasked_weight * L_unmasked (LUT: 1.0 and 0.25).

The teacher's momentum follows a cosine schedule from 0.996 to 1 over training (:func:`cosine_momentum`); call
:meth:`LUTLearner.update_teacher` after every optimizer step. Projector / predictor: Linear -> BatchNorm1d ->
ReLU -> Linear (BYOL). The teacher's BatchNorm runs on batch statistics like the student's (BYOL); its running
buffers are copied from the student at every update.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from morphcache.errors import ConfigError
from morphcache.train.losses.lut_loss import byol_loss, lut_total_loss
from morphcache.train.losses.mae_loss import mae_loss, pixel_targets
from morphcache.train.mae import MAEModel, keep_to_mask


class MLPHead(nn.Sequential):
    """BYOL projector / predictor: (B, in_dim) -> Linear -> BN -> ReLU -> Linear -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


def cosine_momentum(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """EMA momentum at ``step`` of ``total_steps``: ``end - (end - start) * (cos(pi * step / total) + 1) / 2``."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


def disjoint_keep_sets(
    batch: int, num_tokens: int, n_keep: int, generator: torch.Generator, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sorted keep sets per sample, each (B, n_keep) long, from one random permutation per sample."""
    if n_keep < 1 or 2 * n_keep > num_tokens:
        raise ConfigError(f"LUT needs 1 <= 2 * n_keep <= T; got n_keep={n_keep}, T={num_tokens} (mask ratio >= 0.5)")
    perm = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    keep1 = perm[:, :n_keep].sort(dim=1).values
    keep2 = perm[:, n_keep : 2 * n_keep].sort(dim=1).values
    return keep1.to(device), keep2.to(device)


class EMATeacher(nn.Module):
    """Frozen copies of the student's modules, updated as ``t = m t + (1 - m) s``; never receives gradients."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({name: copy.deepcopy(m) for name, m in modules.items()})
        for p in self.parts.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], momentum: float) -> None:
        for name, student in modules.items():
            teacher = self.parts[name]
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
            for t, s in zip(teacher.buffers(), student.buffers()):
                t.copy_(s)


class LUTLearner(nn.Module):
    """MAE student + projector + predictor + EMA teacher. ``forward(x1, x2, generator) -> (loss, metrics)``."""

    def __init__(
        self,
        model: MAEModel,
        proj_hidden: int = 2048,
        proj_dim: int = 256,
        mae_weight: float = 1.0,
        unmasked_weight: float = 0.25,
        momentum: tuple[float, float] = (0.996, 1.0),
    ) -> None:
        super().__init__()
        self.model = model
        width = model.backbone.embed_dim
        self.projector = MLPHead(width, proj_hidden, proj_dim)
        self.predictor = MLPHead(proj_dim, proj_hidden, proj_dim)
        self.teacher = EMATeacher({"backbone": model.backbone, "projector": self.projector})
        self.mae_weight, self.unmasked_weight = float(mae_weight), float(unmasked_weight)
        self.momentum_range = (float(momentum[0]), float(momentum[1]))
        self.last_momentum = self.momentum_range[0]

    def _student_views(self, x: torch.Tensor, keep: torch.Tensor, target: torch.Tensor):
        out = self.model(x, keep)
        mask = keep_to_mask(keep, self.model.num_tokens)
        rec = mae_loss(out.pixels, target, mask)
        pooled = self.model.visible_patch_tokens(out.latent).mean(dim=1)
        return rec, self.predictor(self.projector(pooled))

    @torch.no_grad()
    def _teacher_target(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.teacher.parts["backbone"]
        tokens = backbone.forward_features(x)[:, backbone.num_prefix_tokens :]
        return self.teacher.parts["projector"](tokens.mean(dim=1))

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """x1, x2 (B, 3, S, S) two views of the same images -> (total loss, metrics)."""
        if x1.shape != x2.shape:
            raise ConfigError(f"LUT views differ in shape: {tuple(x1.shape)} vs {tuple(x2.shape)}")
        b, t = x1.shape[0], self.model.num_tokens
        n_keep = max(1, int(round(t * (1.0 - self.model.mask_ratio))))
        keep1, keep2 = disjoint_keep_sets(b, t, n_keep, generator, x1.device)
        p = self.model.patch_size
        rec1, q1 = self._student_views(x1, keep1, pixel_targets(x1, p, self.model.norm_pix))
        rec2, q2 = self._student_views(x2, keep2, pixel_targets(x2, p, self.model.norm_pix))
        z1, z2 = self._teacher_target(x1), self._teacher_target(x2)
        l_mae = (rec1 + rec2) / 2
        l_unm = (byol_loss(q1, z2) + byol_loss(q2, z1)) / 2
        loss = lut_total_loss(l_mae, l_unm, self.mae_weight, self.unmasked_weight)
        return loss, {"mae": float(l_mae.detach()), "unmasked": float(l_unm.detach()), "momentum": self.last_momentum}

    def update_teacher(self, step: int, total_steps: int) -> float:
        """EMA update after optimizer step ``step`` (0-based) of ``total_steps``; returns the momentum used."""
        m = cosine_momentum(step, total_steps, *self.momentum_range)
        self.teacher.update({"backbone": self.model.backbone, "projector": self.projector}, m)
        self.last_momentum = m
        return m
