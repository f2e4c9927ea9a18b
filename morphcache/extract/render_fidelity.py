"""Measure how closely the PIL fallback renderer reproduces the DALI renderer (the definition of a view).

Used by the tests, the benchmark and ``store replay-check``. Differences are reported in 8-bit pixel units
(normalized difference x std x 255), so they read the same whatever the teacher's mean/std.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from morphcache.extract.render_dali import DaliRenderer
from morphcache.extract.render_pil import render_pil
from morphcache.schemas.specs import IMAGENET_MEAN, IMAGENET_STD, N_RENDER_PARAMS


def pixel_differences(a: torch.Tensor, b: torch.Tensor, std: Sequence[float]) -> np.ndarray:
    """float64 (B, 3, S, S) |a - b| in 8-bit pixel units for normalized renderings a, b (B, 3, S, S)."""
    scale = np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1) * 255.0
    return np.abs(a.detach().cpu().double().numpy() - b.detach().cpu().double().numpy()) * scale


def compare_renderers(
    encoded: Sequence[bytes],
    params: np.ndarray,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "linear",
    batch_size: int = 16,
    renderer: DaliRenderer | None = None,
) -> dict:
    """Render ``params`` (B, P) of ``encoded`` (B images) with DALI and with PIL; summarize the difference.
    P = N_VIEW_PARAMS, or N_RENDER_PARAMS (solarize / blur_sigma: a DALI renderer with ``effects=True``).

    Returns ``{"n_views", "size", "interpolation", "mean_abs_pixel", "p99_abs_pixel", "max_abs_pixel",
    "worst_view_mean_abs_pixel", "psnr_db"}`` (pixel units 0..255; PSNR over [0, 255]).
    A given ``renderer`` must have been built with ``sizes=(size,)`` and the same mean/std/interpolation.
    """
    rows = np.asarray(params, dtype=np.float32)
    if len(encoded) == 0:
        raise ValueError("compare_renderers needs at least one view")
    dali = renderer or DaliRenderer(
        sizes=(size,), mean=mean, std=std, interpolation=interpolation, batch_size=min(batch_size, len(encoded)),
        effects=rows.ndim == 2 and rows.shape[1] == N_RENDER_PARAMS,
    )
    per_view: list[np.ndarray] = []
    for start in range(0, len(encoded), dali.batch_size):
        stop = min(start + dali.batch_size, len(encoded))
        (d,) = dali.render(list(encoded[start:stop]), rows[start:stop])
        p = render_pil(list(encoded[start:stop]), rows[start:stop], size, mean, std, interpolation)
        per_view.append(pixel_differences(d, p, std))
    diff = np.concatenate(per_view)
    mse = float((diff**2).mean())
    return {
        "n_views": int(len(encoded)),
        "size": int(size),
        "interpolation": interpolation,
        "mean_abs_pixel": float(diff.mean()),
        "p99_abs_pixel": float(np.percentile(diff, 99)),
        "max_abs_pixel": float(diff.max()),
        "worst_view_mean_abs_pixel": float(diff.reshape(len(diff), -1).mean(axis=1).max()),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)),
    }
