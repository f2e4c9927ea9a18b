"""Linear probe on frozen features, as MAE: ``BatchNorm1d(affine=False)`` then one ``Linear`` layer.

Features are extracted once (:mod:`morphcache.evaluate.features`) and the probe trains on the cached tensors for
a few epochs (AdamW by default; SGD with momentum as an alternative), cosine learning-rate decay, no augmentation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from morphcache.errors import ConfigError
from morphcache.evaluate.knn import topk_accuracy
from morphcache.evaluate.settings import LinearProbeConfig
from morphcache.train.schedule import lr_at


def build_probe(in_features: int, n_classes: int) -> nn.Sequential:
    """``(B, F) -> (B, C)``: non-affine BatchNorm (feature standardization) + linear classifier."""
    head = nn.Linear(in_features, n_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(in_features, affine=False, eps=1e-6), head)


def build_probe_optimizer(params, optimizer: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum 0.9, for a probe's parameters; :class:`ConfigError` for another name."""
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {optimizer!r}; use adamw or sgd")


def train_linear_probe(features: torch.Tensor, labels, n_classes: int,
                       config: LinearProbeConfig = LinearProbeConfig()) -> tuple[nn.Sequential, list[float]]:
    """Train a probe on ``features (N, F)`` and ``labels int (N,)``; returns (probe in eval mode, epoch losses).

    Raises:
        ConfigError: non-positive epochs, batch size or lr, or fewer than 2 samples / mismatched labels.
    """
    if config.epochs <= 0 or config.batch_size <= 0 or config.lr <= 0:
        raise ConfigError(f"linear probe needs positive epochs, batch size and lr, got {config}")
    x = features.float()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(x) != len(y) or len(x) < 2:
        raise ConfigError(f"linear probe needs at least 2 samples with one label each, got {len(x)} and {len(y)}")
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    probe = build_probe(x.shape[1], n_classes)
    opt = build_probe_optimizer(probe.parameters(), config.optimizer, config.lr, config.weight_decay)
    batch = min(config.batch_size, len(x))
    steps_per_epoch = max(1, len(x) // batch)  # drop the last partial batch (BatchNorm needs > 1 sample)
    total = steps_per_epoch * config.epochs
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []
    step = 0
    probe.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, config.lr, 0.0, 0)
            loss = loss_fn(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            step += 1
        losses.append(running / steps_per_epoch)
    probe.eval()
    return probe, losses


@torch.no_grad()
def predict(probe: nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits ``(M, C)`` of ``features (M, F)``."""
    probe.eval()
    return torch.cat([probe(features[i:i + batch_size].float()) for i in range(0, len(features), batch_size)])


def linear_probe_evaluate(train_features: torch.Tensor, train_labels, test_features: torch.Tensor, test_labels,
                          n_classes: int, config: LinearProbeConfig = LinearProbeConfig()) -> dict[str, float]:
    """Train on the train features, report percent top-1 (and top-5 with > 5 classes) on the test features, plus
    ``train_loss`` (last epoch) and ``train_top1``."""
    probe, losses = train_linear_probe(train_features, train_labels, n_classes, config)
    metrics = topk_accuracy(predict(probe, test_features), test_labels)
    metrics["train_top1"] = topk_accuracy(predict(probe, train_features), train_labels, ks=(1,))["top1"]
    metrics["train_loss"] = losses[-1]
    return metrics
