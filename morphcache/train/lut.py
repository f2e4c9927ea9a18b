"""LUT (Kim, Chun, Heo, Han, ECCV 2024): MAE plus a BYOL-style loss on the student's unmasked tokens.

Follows naver-ai/lut (``models/models_lut.py``, ``engines/engine_lut.py``, ``util/model_ema_sched.py``). Per step,
two views x1, x2 of each image:

- one random permutation of the T grid positions per sample gives two *disjoint* keep sets of K = T(1 - ratio)
  positions each (view 1 keeps ``perm[:K]``, view 2 keeps ``perm[K:2K]``; needs ratio >= 0.5);
- the student (an :class:`~morphcache.train.mae.MAEModel`) encodes each view's kept patches; the decoder
  reconstructs the masked patches of **view 1 only** (MAE loss on normalised pixels), as the release does;
- the mean of the student's unmasked (kept) patch tokens -> projector -> predictor gives q1, q2;
- an EMA teacher encodes the *full* other view, mean of its patch tokens -> projector gives z2, z1;
- L_unmasked = (byol(q1, z2) + byol(q2, z1)) / 2 with byol = 2 - 2 cos;
  total = mae_weight * L_MAE + unmasked_weight * L_unmasked (released recipe: 1.0 and 0.25).

Projector and predictor (release ``_build_mlp`` with ``--head_norm_layer BN``): Linear (no bias) -> BatchNorm1d
-> ReLU -> Linear (no bias), width -> 4096 -> width by default.

The EMA teacher is a deep copy of the backbone and the projector, kept in **eval mode** (its BatchNorm uses
running statistics), and every floating state entry -- parameters and BatchNorm running mean / variance -- is
averaged ``t = m t + (1 - m) s`` after each optimizer step (the release averages the whole ``state_dict``); the
integer batch counters are copied. The momentum follows a cosine from 0.996 to 1 over training
(:func:`cosine_momentum`, the release's ``cosine_scheduler(decay, 1, ...)``); call
:meth:`LUTLearner.update_teacher` after every optimizer step.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from morphcache.errors import ConfigError
from morphcache.train.losses.lut_loss import byol_loss, lut_total_loss
from morphcache.train.losses.mae_loss import mae_loss, pixel_targets
from morphcache.train.mae import MAEModel, keep_to_mask, random_scores


class MLPHead(nn.Sequential):
    """Projector / predictor: (B, in_dim) -> Linear (no bias) -> BN -> ReLU -> Linear (no bias) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )


def cosine_momentum(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """EMA momentum at ``step`` of ``total_steps``: ``end - (end - start) * (cos(pi * step / total) + 1) / 2``."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


def disjoint_keep_sets(
    batch: int, num_tokens: int, n_keep: int, rng: np.random.Generator, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sorted keep sets per sample, each (B, n_keep) long, from one random permutation per sample
    drawn from the numpy generator ``rng`` (:func:`morphcache.train.mae.random_scores`)."""
    if n_keep < 1 or 2 * n_keep > num_tokens:
        raise ConfigError(f"LUT needs 1 <= 2 * n_keep <= T; got n_keep={n_keep}, T={num_tokens} (mask ratio >= 0.5)")
    perm = random_scores(rng, batch, num_tokens).argsort(dim=1)
    keep1 = perm[:, :n_keep].sort(dim=1).values
    keep2 = perm[:, n_keep : 2 * n_keep].sort(dim=1).values
    return keep1.to(device), keep2.to(device)


class EMATeacher(nn.Module):
    """Deep copies of the student's modules in eval mode, updated as ``t = m t + (1 - m) s`` for every floating
    parameter and buffer (integer buffers are copied); never receives gradients and never leaves eval mode."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({name: copy.deepcopy(m) for name, m in modules.items()})
        for p in self.parts.parameters():
            p.requires_grad_(False)
        self.parts.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        """Stays in eval mode whatever ``mode`` (the teacher's BatchNorm always uses its running statistics)."""
        return super().train(False)

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], momentum: float) -> None:
        for name, student in modules.items():
            teacher_state = self.parts[name].state_dict(keep_vars=True)
            for key, s in student.state_dict(keep_vars=True).items():
                t = teacher_state[key]
                if t.is_floating_point():
                    t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1.0 - momentum)
                else:
                    t.copy_(s)


class LUTLearner(nn.Module):
    """MAE student + projector + predictor + EMA teacher. ``forward(x1, x2, rng) -> (loss, metrics)`` with ``rng``
    the step's numpy generator (it draws the two disjoint keep sets)."""

    def __init__(
        self,
        model: MAEModel,
        proj_hidden: int = 4096,
        proj_dim: int | None = None,
        mae_weight: float = 1.0,
        unmasked_weight: float = 0.25,
        momentum: tuple[float, float] = (0.996, 1.0),
    ) -> None:
        super().__init__()
        self.model = model
        width = model.backbone.embed_dim
        proj_dim = width if proj_dim is None else int(proj_dim)
        self.projector = MLPHead(width, proj_hidden, proj_dim)
        self.predictor = MLPHead(proj_dim, proj_hidden, proj_dim)
        self.teacher = EMATeacher({"backbone": model.backbone, "projector": self.projector})
        self.mae_weight, self.unmasked_weight = float(mae_weight), float(unmasked_weight)
        self.momentum_range = (float(momentum[0]), float(momentum[1]))
        self.last_momentum = self.momentum_range[0]

    def _student_view(self, x: torch.Tensor, keep: torch.Tensor, reconstruct: bool):
        """(MAE loss of the view or None, q (B, proj_dim)); the decoder runs only when ``reconstruct``."""
        if reconstruct:
            out = self.model(x, keep)
            mask = keep_to_mask(keep, self.model.num_tokens)
            rec = mae_loss(out.pixels, pixel_targets(x, self.model.patch_size, self.model.norm_pix), mask)
            latent = out.latent
        else:
            rec, latent = None, self.model.encode(x, keep)
        pooled = self.model.visible_patch_tokens(latent).mean(dim=1)
        return rec, self.predictor(self.projector(pooled))

    @torch.no_grad()
    def _teacher_target(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.teacher.parts["backbone"]
        tokens = backbone.forward_features(x)[:, backbone.num_prefix_tokens :]
        return self.teacher.parts["projector"](tokens.mean(dim=1))

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """x1, x2 (B, 3, S, S) two views of the same images, ``rng`` the step's numpy generator (keep sets) ->
        (total loss, metrics)."""
        if x1.shape != x2.shape:
            raise ConfigError(f"LUT views differ in shape: {tuple(x1.shape)} vs {tuple(x2.shape)}")
        b, t = x1.shape[0], self.model.num_tokens
        n_keep = max(1, int(round(t * (1.0 - self.model.mask_ratio))))
        keep1, keep2 = disjoint_keep_sets(b, t, n_keep, rng, x1.device)
        l_mae, q1 = self._student_view(x1, keep1, reconstruct=True)  # the release reconstructs view 1 only
        _, q2 = self._student_view(x2, keep2, reconstruct=False)
        z1, z2 = self._teacher_target(x1), self._teacher_target(x2)
        l_unm = (byol_loss(q1, z2) + byol_loss(q2, z1)) / 2
        loss = lut_total_loss(l_mae, l_unm, self.mae_weight, self.unmasked_weight)
        return loss, {"mae": float(l_mae.detach()), "unmasked": float(l_unm.detach()), "momentum": self.last_momentum}

    def update_teacher(self, step: int, total_steps: int) -> float:
        """EMA update after optimizer step ``step`` (0-based) of ``total_steps``; returns the momentum used."""
        m = cosine_momentum(step, total_steps, *self.momentum_range)
        self.teacher.update({"backbone": self.model.backbone, "projector": self.projector}, m)
        self.last_momentum = m
        return m
