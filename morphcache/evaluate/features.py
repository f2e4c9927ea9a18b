"""Batched feature extraction: uint8 images -> resized, normalized tensors -> backbone features.

Runs under ``torch.no_grad()`` (not inference mode: bf16 autocast inside inference mode is ~10x slower on this
CPU), with an optional bf16 autocast and a progress bar reporting images/s.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from morphcache.errors import ConfigError
from morphcache.progress import progress_bar

Precision = Literal["fp32", "bf16"]


def prepare_images(images: np.ndarray | torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float32 ``(B, 3, size, size)`` in [0, 1], resized (bicubic, antialiased when
    shrinking) and normalized with ``mean``/``std``."""
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ConfigError(f"expected images of shape (B, H, W, 3), got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=shrink)
        x = x.clamp_(0.0, 1.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def autocast_context(precision: str, device: torch.device | str = "cpu"):
    """``torch.autocast`` for ``bf16``, a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ConfigError(f"unknown precision {precision!r}; use fp32 or bf16")


@torch.no_grad()
def map_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, size: int, mean, std,
                batch_size: int = 64, precision: Precision = "fp32", description: str = "features",
                device: str = "cpu") -> torch.Tensor:
    """Apply ``fn`` to normalized batches of ``images`` uint8 ``(N, H, W, 3)``; concatenated float32 CPU output."""
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    outs = []
    with progress_bar(total=len(images), description=description, unit="img") as bar:
        for start in range(0, len(images), batch_size):
            x = prepare_images(images[start:start + batch_size], size, mean, std).to(device)
            with autocast_context(precision, device):
                y = fn(x)
            outs.append(y.float().cpu())
            bar.advance(len(x))
    if not outs:
        raise ConfigError("no images to extract features from; check the dataset spec")
    return torch.cat(outs)


def extract_features(backbone, images: np.ndarray, batch_size: int = 64, precision: Precision = "fp32",
                     description: str = "features", device: str = "cpu") -> torch.Tensor:
    """Pooled features ``float32 (N, F)`` of uint8 ``images (N, H, W, 3)`` through ``backbone.encode``."""
    backbone.eval()
    return map_batches(backbone.encode, images, backbone.img_size, backbone.mean, backbone.std,
                       batch_size, precision, description, device)


def extract_tokens(backbone, images: np.ndarray, batch_size: int = 16, precision: Precision = "fp32",
                   device: str = "cpu") -> torch.Tensor:
    """Patch tokens ``float32 (N, T, D)`` of uint8 ``images (N, H, W, 3)`` (for PCA maps)."""
    backbone.eval()
    return map_batches(backbone.tokens, images, backbone.img_size, backbone.mean, backbone.std,
                       batch_size, precision, "tokens", device)


def split_features(backbone, data, batch_size: int = 64, precision: Precision = "fp32",
                   device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test features ``(N_train, F)``, ``(N_test, F)`` of a :class:`DatasetSplits`."""
    train = extract_features(backbone, data.train_images, batch_size, precision, "features train", device)
    test = extract_features(backbone, data.test_images, batch_size, precision, "features test", device)
    return train, test
