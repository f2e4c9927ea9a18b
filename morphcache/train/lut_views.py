"""LUT's two views as ViewParams rows, rendered by the shared renderer (DALI, or the PIL fallback).

naver-ai/lut (``main_lut.py`` ``TwoGlobalViewAugmentation``) makes two near-full views of each image: resize the
shorter side to S (bicubic), random S x S crop of the image padded by 4 pixels (reflect), horizontal flip with
p 0.5; only the second view then gets colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with
p 0.8, followed by one of grayscale, solarize or Gaussian blur (radius U(0.1, 2)), each with p 1/3.

:func:`lut_view_row` samples that recipe as a :data:`~morphcache.schemas.specs.VIEW_FIELDS` row (crop window in
source pixels, flip, brightness, contrast, saturation, hue in turns), so DALI and the PIL fallback render it with
the same maths as every other view. What the row cannot express, and so differs from the release:

- the crop window is the S x S square in resized coordinates mapped back to the source (side = the shorter side,
  rounded to whole pixels); where the 4-pixel padding would reach outside the image the window is shifted back
  inside instead of reflect-padded (a translation of at most 4 resized pixels is kept, the mirrored border is not);
- the resize uses the store's interpolation (``linear`` unless the store chose ``cubic``), not always bicubic;
- colour jitter is DALI's ``color_twist`` (fixed order, YIQ hue rotation), not torchvision's randomly ordered
  ops with HSV hue;
- grayscale is saturation 0 in the same twist (luma weights 0.299, 0.587, 0.114 as torchvision's; after the
  jitter, clamping happens once at the end instead of between the two);
- solarize and Gaussian blur (2/3 of the second views in the release) are not rendered: those views keep only
  their jitter. Rendering them needs two more view fields and the matching DALI / PIL ops.

numpy only: the loader's spawned workers call it without importing torch.
"""

from __future__ import annotations

import numpy as np

#: The release's second-view colour recipe.
JITTER_P = 0.8
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
CROP_PADDING = 4
#: One of three after the jitter; only grayscale is rendered (module docstring).
THREE_AUGMENT = ("grayscale", "solarize", "blur")


def lut_view_row(image_hw: tuple[int, int], size: int, rng: np.random.Generator, second: bool) -> np.ndarray:
    """One view of an image of ``image_hw`` (height, width) source pixels for an S = ``size`` student.

    Returns float32 (9,) in VIEW_FIELDS order: top, left, height, width (whole source pixels, inside the image),
    flip, brightness, contrast, saturation, hue (turns). ``second`` adds the colour recipe of view 2.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    short = min(h, w)
    scale = size / short  # resize: the shorter side becomes S (torchvision Resize(S))
    rh, rw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    # RandomCrop(S, padding=4): offsets in the padded resized image, i.e. [-4, R - S + 4] in resized pixels
    top_r = int(rng.integers(0, rh - size + 2 * CROP_PADDING + 1)) - CROP_PADDING
    left_r = int(rng.integers(0, rw - size + 2 * CROP_PADDING + 1)) - CROP_PADDING
    top = min(max(int(round(top_r / scale)), 0), h - short)
    left = min(max(int(round(left_r / scale)), 0), w - short)
    flip = float(rng.random() < 0.5)
    colour = [1.0, 1.0, 1.0, 0.0]
    if second:
        if rng.random() < JITTER_P:
            colour = [
                float(rng.uniform(1 - JITTER["brightness"], 1 + JITTER["brightness"])),
                float(rng.uniform(1 - JITTER["contrast"], 1 + JITTER["contrast"])),
                float(rng.uniform(1 - JITTER["saturation"], 1 + JITTER["saturation"])),
                float(rng.uniform(-JITTER["hue"], JITTER["hue"])),
            ]
        if THREE_AUGMENT[int(rng.integers(0, 3))] == "grayscale":
            colour[2] = 0.0
    return np.array([top, left, short, short, flip, *colour], dtype=np.float32)


def lut_view_rows(image_hw: tuple[int, int], size: int, seed: int, sample: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Both views of one training sample, a pure function of (run seed, global sample, store row)."""
    rng = np.random.default_rng((int(seed), int(sample), int(row), 17))  # 17: this stream's tag
    return lut_view_row(image_hw, size, rng, second=False), lut_view_row(image_hw, size, rng, second=True)
