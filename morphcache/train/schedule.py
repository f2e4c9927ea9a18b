"""Learning-rate schedule: lr scaled by sqrt(batch / 2048), linear warmup, then cosine down to ``min_lr``.

DTM's released recipe: ``peak = base_lr * sqrt(global_batch / 2048)`` with ``base_lr = 1.5e-3``; the lr rises
linearly over ``warmup_steps`` optimizer steps, then follows a half cosine to ``min_lr`` at ``total_steps``.
The weight decay optionally follows a cosine from ``weight_decay`` to ``weight_decay_end`` over all steps, without
warmup, on the parameter groups that decay at all (naver-ai/dtm ``--weight_decay_end``, ``utils.cosine_scheduler``).
The schedule is a pure function of the optimizer step, so checkpoints only need the step.
"""

from __future__ import annotations

import math

import torch


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 2048) -> float:
    """``base_lr * sqrt(global_batch / reference_batch)`` (1.5e-3 at 2048 -> about 1.9e-4 at 32)."""
    return float(base_lr) * math.sqrt(global_batch / reference_batch)


def lr_at(step: int, total_steps: int, peak_lr: float, min_lr: float, warmup_steps: int) -> float:
    """The lr of optimizer step ``step`` (0-based): ``peak*(step+1)/warmup`` during warmup, then cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / decay))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * t))


def weight_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine weight decay of optimizer step ``step`` (0-based): ``start`` at step 0 towards ``end`` at the end."""
    t = min(1.0, max(0.0, step / max(1, total_steps)))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


class WarmupCosine:
    """Sets ``lr`` (and, with ``weight_decay_end``, the weight decay of the decaying groups) of every param group
    of ``optimizer`` for each optimizer step (call :meth:`apply` before it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, min_lr: float, warmup_steps: int,
                 total_steps: int, weight_decay_end: float | None = None) -> None:
        self.optimizer = optimizer
        self.weight_decay_end = None if weight_decay_end is None else float(weight_decay_end)
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group.get("weight_decay", 0.0))
        self.peak_lr = float(peak_lr)
        self.min_lr = float(min(min_lr, peak_lr))
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.step = 0

    def apply(self) -> float:
        """Set the lr for the coming optimizer step and return it."""
        lr = lr_at(self.step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if self.weight_decay_end is not None and group["initial_weight_decay"] > 0:
                group["weight_decay"] = weight_decay_at(self.step, self.total_steps, group["initial_weight_decay"],
                                                        self.weight_decay_end)
        return lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "peak_lr": self.peak_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.peak_lr = float(state["peak_lr"])
        self.min_lr = float(state["min_lr"])
        self.warmup_steps = int(state["warmup_steps"])
        self.total_steps = int(state["total_steps"])


def build_optimizer(objective, config, peak_lr: float, total_steps: int) -> tuple[torch.optim.Optimizer, WarmupCosine]:
    """AdamW over ``objective.param_groups(weight_decay)`` with the run's betas (``config.effective_betas()``) and
    eps, and its :class:`WarmupCosine` (warmup, cosine lr to ``min_lr``, optional cosine weight decay)."""
    optimizer = torch.optim.AdamW(objective.param_groups(config.weight_decay), lr=peak_lr,
                                  betas=config.effective_betas(), eps=config.adam_eps)
    schedule = WarmupCosine(optimizer, peak_lr, config.min_lr, config.warmup_steps, total_steps,
                            config.weight_decay_end)
    return optimizer, schedule
