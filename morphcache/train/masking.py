"""BEiT block-wise masking of a patch grid, with an exact masked count.

BEiT's generator repeatedly drops a random rectangle (area at least ``min_block`` patches, log-uniform aspect
ratio in ``aspect``) onto the grid, accepting it only if it adds new patches without overshooting the budget,
until ``num_masked`` patches are covered or ten placements in a row fail. The BEiT loop therefore never masks
*more* than the budget, but it may stop *short* of it (when the remainder is smaller than any placeable block).
Here the count is made exact: a shortfall is topped up with uniformly random unmasked patches, and an excess
(impossible with the rules above, kept as a guard) would be trimmed at random. Every sample of a batch then
masks the same number of patches, which keeps per-batch statistics and loss normalisation uniform.

Everything is driven by a ``numpy.random.Generator``; a ``torch.Generator`` is accepted and converted by drawing
one 63-bit seed from it, so masks are reproducible from a seed either way.

Shapes: a mask is ``bool (h*w,)`` in row-major grid order (timm's patch order); ``batch`` gives ``(B, h*w)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from morphcache.errors import ConfigError

#: BEiT's reference: 75 of 196 patches at a 14x14 grid.
REFERENCE_GRID_TOKENS = 196


def scaled_num_masked(num_masked_at_14: int, grid: tuple[int, int]) -> int:
    """Scale a masked count defined at a 14x14 grid to ``grid``, keeping the ratio (75 -> 98 at 16x16)."""
    h, w = grid
    return int(round(num_masked_at_14 * h * w / REFERENCE_GRID_TOKENS))


def _as_numpy_generator(gen) -> np.random.Generator:
    if isinstance(gen, np.random.Generator):
        return gen
    if isinstance(gen, torch.Generator):
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=gen, dtype=torch.int64).item())
        return np.random.default_rng(seed)
    if isinstance(gen, (int, np.integer)):
        return np.random.default_rng(int(gen))
    raise TypeError(f"expected a seed, numpy Generator or torch.Generator, got {type(gen).__name__}")


class BlockMaskGenerator:
    """BEiT block-wise masks with exactly ``num_masked`` patches masked.

    Args:
        grid: patch grid (h, w).
        num_masked: patches to mask per sample (use :func:`scaled_num_masked` for non-14x14 grids).
        min_block: smallest block area in patches (BEiT: 16).
        aspect: (min, max) block aspect ratio, sampled log-uniformly (BEiT: 0.3 to 1/0.3).
        max_block: largest block area; ``None`` = ``num_masked`` (BEiT's default).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        num_masked: int,
        min_block: int = 16,
        aspect: tuple[float, float] = (0.3, 1 / 0.3),
        max_block: int | None = None,
    ) -> None:
        h, w = (int(grid[0]), int(grid[1]))
        if h <= 0 or w <= 0:
            raise ConfigError(f"mask grid {grid} must be positive; pass the student's patch grid")
        if not 0 <= num_masked <= h * w:
            raise ConfigError(f"num_masked={num_masked} must lie in [0, {h * w}] for a {h}x{w} grid")
        if min_block < 1:
            raise ConfigError(f"mask min_block={min_block} must be >= 1")
        lo, hi = aspect
        if not 0 < lo <= hi:
            raise ConfigError(f"mask aspect={aspect} must satisfy 0 < min <= max")
        self.grid = (h, w)
        self.num_masked = int(num_masked)
        self.min_block = int(min_block)
        self.max_block = int(max_block) if max_block is not None else self.num_masked
        self.log_aspect = (math.log(lo), math.log(hi))

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try up to ten rectangles; mask the first one that adds 1..budget new patches. Returns patches added."""
        h, w = self.grid
        for _ in range(10):
            # Python's random.uniform(min_block, budget) as BEiT: also valid when budget < min_block.
            area = self.min_block + (budget - self.min_block) * rng.random()
            ratio = math.exp(rng.uniform(*self.log_aspect))
            bh = int(round(math.sqrt(area * ratio)))
            bw = int(round(math.sqrt(area / ratio)))
            if bh < 1 or bw < 1 or bh >= h or bw >= w:
                continue
            top = int(rng.integers(0, h - bh + 1))
            left = int(rng.integers(0, w - bw + 1))
            window = mask[top : top + bh, left : left + bw]
            added = bh * bw - int(window.sum())
            if 0 < added <= budget:
                window[...] = True
                return added
        return 0

    def generate(self, rng: np.random.Generator) -> np.ndarray:
        """One mask as ``np.bool_ (h*w,)`` from a numpy generator."""
        h, w = self.grid
        mask = np.zeros((h, w), dtype=bool)
        count = 0
        while count < self.num_masked:
            budget = min(self.num_masked - count, self.max_block)
            added = self._place_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        flat = mask.reshape(-1)
        # Exact count: top up a BEiT shortfall (or trim a surplus) with uniformly random patches.
        if count < self.num_masked:
            free = np.flatnonzero(~flat)
            flat[rng.choice(free, size=self.num_masked - count, replace=False)] = True
        elif count > self.num_masked:
            taken = np.flatnonzero(flat)
            flat[rng.choice(taken, size=count - self.num_masked, replace=False)] = False
        return flat

    def __call__(self, generator) -> torch.Tensor:
        """One mask, ``torch.bool (h*w,)``; ``generator`` is a seed, numpy or torch generator."""
        return torch.from_numpy(self.generate(_as_numpy_generator(generator)))

    def batch(self, batch_size: int, seed_or_gen) -> torch.Tensor:
        """``batch_size`` independent masks, ``torch.bool (B, h*w)``, reproducible from ``seed_or_gen``."""
        rng = _as_numpy_generator(seed_or_gen)
        if batch_size <= 0:
            return torch.zeros((0, self.num_tokens), dtype=torch.bool)
        return torch.from_numpy(np.stack([self.generate(rng) for _ in range(batch_size)]))


def build_block_mask_generator(config, grid: tuple[int, int]) -> BlockMaskGenerator:
    """The :class:`BlockMaskGenerator` a :class:`~morphcache.schemas.specs.RunConfig` asks for at ``grid``.

    ``mask_patches`` is scaled to the grid; ``mask_min_block`` / ``mask_max_block`` (None = the masked count) are
    scaled the same way (at least 1 patch) when ``mask_scale_blocks`` is set, and used as given otherwise.
    """
    num_masked = scaled_num_masked(config.mask_patches, grid)
    min_block, max_block = config.mask_min_block, config.mask_max_block
    if config.mask_scale_blocks:
        min_block = max(1, scaled_num_masked(min_block, grid))
        max_block = None if max_block is None else max(1, scaled_num_masked(max_block, grid))
    return BlockMaskGenerator(grid, num_masked, min_block=min_block, aspect=tuple(config.mask_aspect),
                              max_block=max_block)
