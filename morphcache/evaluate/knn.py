"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

Features are L2-normalized; each test sample takes its ``k`` most cosine-similar training samples, each voting
for its label with weight ``exp(sim / T)``; class scores are the summed votes. Defaults ``k = 20``, ``T = 0.07``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from morphcache.errors import ConfigError
from morphcache.evaluate.settings import KnnConfig


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               n_classes: int, k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:
    """Class scores ``float32 (M, C)`` of test features ``(M, F)`` against train features ``(N, F)`` and labels
    ``int (N,)``; ``k`` is clipped to ``N``."""
    if k <= 0 or temperature <= 0:
        raise ConfigError(f"k-NN needs k > 0 and temperature > 0, got k={k}, temperature={temperature}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ConfigError(f"train features have width {train_features.shape[1]}, test {test_features.shape[1]}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = torch.as_tensor(train_labels, dtype=torch.long)
    k = min(k, train.shape[0])
    out = torch.zeros(test.shape[0], n_classes)
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start:start + chunk_size] @ train.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weights = (top_sim / temperature).exp()
        out[start:start + chunk_size].scatter_add_(1, labels[top_idx], weights)
    return out


def topk_accuracy(scores: torch.Tensor, labels, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent top-k accuracy for each ``k`` in ``ks`` that is below the number of classes (top-1 always)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n_classes = scores.shape[1]
    out = {}
    for k in ks:
        if k == 1 or k < n_classes:
            top = scores.topk(k, dim=1).indices
            out[f"top{k}"] = float((top == labels[:, None]).any(dim=1).float().mean() * 100.0)
    return out


def knn_evaluate(train_features: torch.Tensor, train_labels, test_features: torch.Tensor, test_labels,
                 n_classes: int, config: KnnConfig = KnnConfig()) -> dict[str, float]:
    """k-NN accuracy in percent: ``{'top1': ..., 'top5': ...}`` (top-5 only with more than 5 classes)."""
    scores = knn_scores(train_features, torch.as_tensor(np.asarray(train_labels)), test_features, n_classes,
                        config.k, config.temperature, config.chunk_size)
    return topk_accuracy(scores, test_labels)
