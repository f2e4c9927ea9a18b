"""Small generated image folders for extraction tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_noise_pngs(folder: Path, n: int, seed: int, prefix: str) -> Path:
    """``n`` random-noise RGB PNGs of 24..63 px per side, named ``<prefix>000.png``..., in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(24, 64, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{prefix}{i:03d}.png")
    return folder
