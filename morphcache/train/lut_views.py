"""LUT's two views as render rows, rendered by the shared renderer (DALI, or the PIL fallback).

naver-ai/lut (``main_lut.py`` ``TwoGlobalViewAugmentation``, ``util/augs.py``) makes two near-full views of each
image: resize the shorter side to S (bicubic), random S x S crop of the image padded by 4 pixels (reflect),
horizontal flip with p 0.5; only the second view then gets colour jitter (brightness 0.4, contrast 0.4,
saturation 0.2, hue 0.1) with p 0.8, followed by exactly one of grayscale, solarize (PIL threshold 128) or
Gaussian blur (PIL radius U(0.1, 2)), each with p 1/3.

:func:`lut_view_row` samples that recipe as a :data:`~morphcache.schemas.specs.RENDER_FIELDS` row (crop window
in source pixels, flip, brightness, contrast, saturation, hue in turns, solarize, blur_sigma in pixels of the
S x S view, grayscale, jitter_order). The loaders render these rows with ``effects=True`` and bicubic resizing
(``RenderSpec.lut_views``), so DALI and the PIL fallback apply the same maths (module docstrings of
:mod:`morphcache.extract.render_dali` and :mod:`morphcache.extract.render_pil`; fidelity in
``tests/test_render.py``, ``tests/test_mae_lut.py``):

- crop and padding: the S x S square in resized coordinates is mapped back to whole source pixels (side = the
  shorter side); the part of it outside the image (up to 4 resized pixels) is mirrored as torchvision's
  ``padding_mode="reflect"`` (edge pixel not repeated), in pixels of the rendered view;
- resize: bicubic (DALI's Catmull-Rom, PIL's bicubic in the fallback) of the crop window, whatever the store's
  interpolation;
- colour jitter: torchvision ColorJitter's four ops, each clamped to [0, 1], in the order drawn per view
  (``jitter_order``, like its ``torch.randperm(4)``): brightness ``b x``, contrast ``c x + (1 - c) mean(luma)``,
  saturation ``s x + (1 - s) luma``, hue turned in HSV; on float pixels they match
  ``torchvision.transforms.functional`` to 2e-5 (tested);
- grayscale: every channel = luma 0.299 R + 0.587 G + 0.114 B, after the jitter (PIL ``convert("L")``);
- solarize: values at or above 128/255 become ``1 - x`` (ImageOps.solarize's threshold);
- blur: a Gaussian of std = the release's radius in view pixels (PIL's GaussianBlur radius is the std).

Cost: the effects graph evaluates all four jitter ops in each of four slots; on this 2-core machine (loaded, one
DALI thread, S = 224, bicubic) a view took about 33 ms against 10 ms for the plain graph (measured once).

What still differs from the release:

- pixels stay float from the resize to the end; the release's PIL ops round to uint8 after each op (and PIL's
  hue works on uint8 HSV, contrast on the mean luma rounded to a whole level): differences of the order of one
  level per op;
- the blur is an exact Gaussian, radius ``ceil(3 sigma)``, mirrored borders (DALI's ``gaussian_blur``); PIL's is
  three extended box blurs with clamped borders: measured < 1 level mean difference in the interior
  (0.6-0.8 levels at sigma 0.5-2 on a photo), more at the image border;
- the crop window is rounded to whole source pixels and resized as one window (the release resizes the whole
  image, then crops whole resized pixels): sub-pixel offsets of the view, and the mirrored band is the
  in-image part's reflection after its own resize.

numpy only: the loader's spawned workers call it without importing torch.
"""

from __future__ import annotations

import numpy as np

#: The release's second-view colour recipe (``main_lut.py`` TwoGlobalViewAugmentation, ``util/augs.py``).
JITTER_P = 0.8
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
CROP_PADDING = 4
#: One of three on every second view, each with p 1/3 (RandomChoice of p=1.0 transforms), after the jitter.
THREE_AUGMENT = ("grayscale", "solarize", "blur")
#: GaussianBlur radius range, pixels of the S x S view (PIL ImageFilter.GaussianBlur's radius is the std).
BLUR_RADIUS = (0.1, 2.0)


def lut_view_row(image_hw: tuple[int, int], size: int, rng: np.random.Generator, second: bool) -> np.ndarray:
    """One view of an image of ``image_hw`` (height, width) source pixels for an S = ``size`` student.

    Returns float32 (13,) in :data:`~morphcache.schemas.specs.RENDER_FIELDS` order: top, left, height, width
    (whole source pixels; the window may reach up to about 4 resized pixels outside the image, which the
    renderer mirrors), flip, brightness, contrast, saturation, hue (turns), solarize (0 / 1), blur_sigma
    (pixels of the S x S view, 0 = none), grayscale (0 / 1), jitter_order (0 = no jitter, else the four ops'
    order as digits, e.g. 4213). ``second`` adds the colour recipe of view 2.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    if h < 1 or w < 1 or int(size) < 1:
        raise ValueError(f"lut_view_row needs a positive image size and side, got image {image_hw} and size {size}")
    short = min(h, w)
    scale = size / short  # resize: the shorter side becomes S (torchvision Resize(S))
    rh, rw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    # RandomCrop(S, padding=4, padding_mode="reflect"): offsets in the padded resized image, i.e. [-4, R - S + 4]
    # in resized pixels, mapped back to whole source pixels; the renderer mirrors what lies outside the image
    top = int(round((int(rng.integers(0, rh - size + 2 * CROP_PADDING + 1)) - CROP_PADDING) / scale))
    left = int(round((int(rng.integers(0, rw - size + 2 * CROP_PADDING + 1)) - CROP_PADDING) / scale))
    flip = float(rng.random() < 0.5)
    colour = [1.0, 1.0, 1.0, 0.0]
    solarize = blur_sigma = grayscale = order = 0.0
    if second:
        if rng.random() < JITTER_P:
            colour = [
                float(rng.uniform(1 - JITTER["brightness"], 1 + JITTER["brightness"])),
                float(rng.uniform(1 - JITTER["contrast"], 1 + JITTER["contrast"])),
                float(rng.uniform(1 - JITTER["saturation"], 1 + JITTER["saturation"])),
                float(rng.uniform(-JITTER["hue"], JITTER["hue"])),
            ]
            # ColorJitter applies its four ops in a fresh random order (torch.randperm(4)) on every call
            order = float("".join(str(int(k) + 1) for k in rng.permutation(4)))
        choice = THREE_AUGMENT[int(rng.integers(0, 3))]
        if choice == "grayscale":
            grayscale = 1.0
        elif choice == "solarize":
            solarize = 1.0
        else:
            blur_sigma = float(rng.uniform(*BLUR_RADIUS))
    return np.array([top, left, short, short, flip, *colour, solarize, blur_sigma, grayscale, order], dtype=np.float32)


def lut_view_rows(image_hw: tuple[int, int], size: int, seed: int, sample: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Both views of one training sample, float32 (13,) each, a pure function of (run seed, global sample, store row)."""
    rng = np.random.default_rng((int(seed), int(sample), int(row), 17))  # 17: this stream's tag
    return lut_view_row(image_hw, size, rng, second=False), lut_view_row(image_hw, size, rng, second=True)
