"""Q4 of the study: teacher targets made spatially inconsistent in a controlled, documented way.

**A labelled study transform, never a product default.** The DTM paper (Kim, Heo, Han, ICLR 2025) motivates token
morphing by the spatial inconsistency of teacher tokens (its pilot quotes neighbour-token cosine near 0.5 for
CLIP); an offline DINOv2 teacher at an 8x8 grid is much smoother, so the study also trains on targets whose
consistency is lowered on purpose:

``noisy = x + sigma * eps``, ``eps ~ N(0, I)`` independent per token and channel, drawn from
``numpy.random.default_rng((seed, row))`` so that every store row (view) always gets the same noise: the noise is a
fixed property of the (simulated) teacher, identical for every run, epoch and objective (paired comparisons see
the same targets). ``sigma`` is chosen by :func:`calibrate_noise` so that the mean 4-neighbour token cosine
(:func:`morphcache.store.stats.block_stats`) of the noisy targets is ``target_cosine`` (default 0.5), measured on
a sample of store rows; the signal-to-noise ratio ``mean(x^2) / sigma^2`` is recorded with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from morphcache.errors import ConfigError


@dataclass(frozen=True)
class TokenNoise:
    """Per-row deterministic Gaussian token noise: ``(targets (B, T, D) float32, rows (B,) int64) -> targets``."""

    sigma: float
    seed: int = 0

    def noise(self, row: int, shape: tuple[int, int]) -> np.ndarray:
        """The fixed noise ``(T, D)`` float32 of store row ``row``."""
        rng = np.random.default_rng((int(self.seed), int(row)))
        return (self.sigma * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    def apply_numpy(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``tokens (B, T, D)`` + the rows' noise (float32 copy)."""
        x = np.asarray(tokens, dtype=np.float32)
        if self.sigma == 0:
            return x.copy()
        return x + np.stack([self.noise(int(r), x.shape[1:]) for r in np.asarray(rows).reshape(-1)])

    def __call__(self, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.sigma == 0:
            return targets
        noise = np.stack([self.noise(int(r), tuple(targets.shape[1:])) for r in rows.reshape(-1).tolist()])
        return targets + torch.from_numpy(noise).to(targets.device, targets.dtype)


def neighbour_cosine(tokens: np.ndarray, grid: tuple[int, int]) -> float:
    """Mean cosine of 4-neighbour token pairs of ``tokens (N, T, D)`` on the ``grid`` (store stats' definition)."""
    from morphcache.store.stats import block_stats

    x = np.asarray(tokens, dtype=np.float32)
    part = block_stats(x, np.ones(len(x), dtype=bool), grid, k=1)
    return float(part["nb_sum"] / part["nb_count"])


@dataclass(frozen=True)
class NoiseCalibration:
    """What :func:`calibrate_noise` chose and measured (written into the study's JSON)."""

    sigma: float
    seed: int
    target_cosine: float
    clean_cosine: float
    noisy_cosine: float
    snr: float | None  # mean(x^2) / sigma^2 (None when sigma is 0)
    snr_db: float | None
    signal_rms: float
    sample_rows: int

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_noise(store, target_cosine: float = 0.5, sample_rows: int = 256, seed: int = 0,
                    iterations: int = 20) -> NoiseCalibration:
    """Bisect ``sigma`` (in units of the targets) so that the noisy targets' mean 4-neighbour cosine on the
    first ``sample_rows`` servable rows of ``store`` is ``target_cosine``; sigma 0 when the clean targets are
    already at or below it. Raises ConfigError for a target outside (-1, 1) or a store without servable rows."""
    if not -1.0 < target_cosine < 1.0:
        raise ConfigError(f"noise target cosine {target_cosine} must lie in (-1, 1)")
    rows = np.sort(store.ok_rows())[: max(1, int(sample_rows))]
    if rows.size == 0:
        raise ConfigError(f"{store.path}: no servable rows to calibrate the noise on; run extract first")
    x = store.read_tokens_numpy(rows).astype(np.float32)
    grid = store.spec.teacher.grid
    clean = neighbour_cosine(x, grid)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if clean <= target_cosine:
        return NoiseCalibration(0.0, seed, target_cosine, clean, clean, None, None, rms, int(rows.size))
    lo, hi = 0.0, rms
    while neighbour_cosine(TokenNoise(hi, seed).apply_numpy(x, rows), grid) > target_cosine:
        hi *= 2.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if neighbour_cosine(TokenNoise(mid, seed).apply_numpy(x, rows), grid) > target_cosine:
            lo = mid
        else:
            hi = mid
    sigma = 0.5 * (lo + hi)
    noisy = neighbour_cosine(TokenNoise(sigma, seed).apply_numpy(x, rows), grid)
    snr = rms**2 / sigma**2
    return NoiseCalibration(sigma, seed, target_cosine, clean, noisy, snr, 10.0 * float(np.log10(snr)), rms,
                            int(rows.size))
