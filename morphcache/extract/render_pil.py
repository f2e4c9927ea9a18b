"""PIL/numpy fallback renderer with the same semantics as :mod:`morphcache.extract.render_dali`.

For machines without DALI. Per view: PIL decode (RGB uint8) -> crop the window -> resize to S x S in float
(PIL mode "F", antialiased bilinear / bicubic) -> /255 -> DALI's colour-twist matrix -> clamp [0, 1] -> flip ->
normalize -> CHW. Its fidelity against DALI is measured (:func:`morphcache.extract.render_fidelity.compare_renderers`),
not assumed. Two details copy DALI on purpose:

- DALI's resize extends the crop by repeating its edge pixels, while PIL renormalizes the filter at the border;
  the crop is therefore edge-padded and resized through PIL's ``box`` argument, so border pixels match too.
- ``color_twist`` (measured on DALI 2.4): ``out = b * (c * M @ rgb + (1 - c) * 0.5)`` with
  ``M = inv(RGB2YIQ) @ R(hue)^T @ diag(1, s, s) @ RGB2YIQ`` (rounded NTSC YIQ coefficients).

Rows may carry the render-only :data:`~morphcache.schemas.specs.EFFECT_FIELDS` (LUT's views), with the
arithmetic DALI's ``effects=True`` graph uses: a window reaching outside the image is mirrored
(:func:`reflect_pads`); ``jitter_order`` != 0 replaces the colour twist by torchvision ColorJitter's ops in that
order (:func:`jitter_in_order`); then grayscale, solarize and Gaussian blur (:func:`apply_effects`).
"""

from __future__ import annotations

import io
import itertools
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from morphcache.schemas.specs import IMAGENET_MEAN, IMAGENET_STD, N_RENDER_PARAMS, N_VIEW_PARAMS

RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], dtype=np.float64)
YIQ2RGB = np.linalg.inv(RGB2YIQ)
_FILTERS = {"linear": (Image.BILINEAR, 1.0), "cubic": (Image.BICUBIC, 2.0)}
#: Solarize inverts values at or above this, on [0, 1] floats (PIL ImageOps.solarize's 128 on the uint8 scale).
SOLARIZE_THRESHOLD = np.float32(128.0 / 255.0)
#: DALI's gaussian_blur refuses sigma 0: its graph blurs every effects view at max(blur_sigma, this) and blends the
#: result out (weight 0, exactly) where blur_sigma is 0.
MIN_BLUR_SIGMA = 0.1
#: Luma weights of the grayscale, contrast and saturation ops (PIL ``convert("L")``: R*299/1000 + G*587/1000 + ...).
LUMA = (0.299, 0.587, 0.114)
#: Valid ``jitter_order`` codes besides 0: the digits 1 brightness, 2 contrast, 3 saturation, 4 hue, each once.
JITTER_ORDERS = frozenset(int("".join(map(str, p))) for p in itertools.permutations((1, 2, 3, 4)))


def render_rows(params, n_views: int, effects: bool, side: int | None = None) -> np.ndarray:
    """Validated float32 (n_views, P) rows for a renderer.

    ``effects=False``: P must be N_VIEW_PARAMS (stored rows). ``effects=True``: N_VIEW_PARAMS (padded with zero
    effect columns: all off) or N_RENDER_PARAMS; effect columns must be finite, ``blur_sigma`` 0 or in
    [MIN_BLUR_SIGMA, 64] (and with ``side``, the smallest rendered side, its kernel radius ``ceil(3 sigma)``
    below it), ``jitter_order`` 0 or one of :data:`JITTER_ORDERS`. Raises ValueError with a one-line message
    otherwise.
    """
    rows = np.asarray(params, dtype=np.float32)
    widths = (N_VIEW_PARAMS, N_RENDER_PARAMS) if effects else (N_VIEW_PARAMS,)
    if rows.ndim != 2 or rows.shape[1] not in widths or rows.shape[0] != n_views:
        want = " or ".join(f"({n_views}, {p})" for p in widths)
        raise ValueError(f"params must be {want}, got {rows.shape}"
                         + ("" if effects else "; rows with effect columns need a renderer built with effects=True"))
    if not effects:
        return rows
    if rows.shape[1] == N_VIEW_PARAMS:
        rows = np.concatenate([rows, np.zeros((n_views, N_RENDER_PARAMS - N_VIEW_PARAMS), np.float32)], axis=1)
    finite = np.isfinite(rows[:, N_VIEW_PARAMS:]).all(axis=1)
    if not finite.all():
        k = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"view {k}: effect columns must be finite, got {rows[k, N_VIEW_PARAMS:].tolist()}")
    sigma = rows[:, N_VIEW_PARAMS + 1]
    bad = ~np.isfinite(sigma) | ((sigma != 0) & ((sigma < MIN_BLUR_SIGMA) | (sigma > 64)))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"view {k}: blur_sigma {float(sigma[k])!r} must be 0 (no blur) or in [{MIN_BLUR_SIGMA}, 64] pixels")
    for k, code in enumerate(rows[:, N_VIEW_PARAMS + 3]):
        if code != 0 and code not in JITTER_ORDERS:
            raise ValueError(f"view {k}: jitter_order {float(code)!r} must be 0 (colour twist) or four digits naming "
                             "1 brightness, 2 contrast, 3 saturation, 4 hue once each, e.g. 4213")
    if side is not None and sigma.size and math.ceil(3.0 * float(sigma.max())) >= side:
        raise ValueError(f"blur_sigma {float(sigma.max())} needs a kernel radius {math.ceil(3.0 * float(sigma.max()))} "
                         f"below the rendered side {side}")
    return rows


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """float32 (H, W, C) blurred with DALI ``fn.gaussian_blur``'s kernel: separable, std ``sigma`` pixels, radius
    ``ceil(3 * sigma)`` (window ``2 * ceil(3 * sigma) + 1``), weights ``exp(-t^2 / (2 sigma^2))`` normalized to
    sum 1, border mirrored without repeating the edge pixel (numpy ``reflect``, OpenCV ``BORDER_REFLECT_101``).
    Needs the radius below both image sides."""
    r = int(math.ceil(3.0 * float(sigma)))
    h, w = x.shape[:2]
    if r >= min(h, w):
        raise ValueError(f"blur_sigma {sigma} needs a kernel radius {r} below the rendered side {min(h, w)}")
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-t * t / (2.0 * float(sigma) ** 2))
    k /= k.sum()
    xp = np.pad(x.astype(np.float64), ((r, r), (0, 0), (0, 0)), mode="reflect")
    y = sum(k[i] * xp[i : i + h] for i in range(2 * r + 1))
    yp = np.pad(y, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(k[i] * yp[:, i : i + w] for i in range(2 * r + 1)).astype(np.float32)


def luma(x: np.ndarray) -> np.ndarray:
    """float32 (H, W) luma of float32 (H, W, 3) RGB with :data:`LUMA`."""
    f = np.float32
    return f(LUMA[0]) * x[..., 0] + f(LUMA[1]) * x[..., 1] + f(LUMA[2]) * x[..., 2]


def hue_shift(x: np.ndarray, hue_turns: float) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1] with the HSV hue turned by ``hue_turns`` (torchvision ``adjust_hue``; value and
    saturation kept). Per pixel: v = max, d = max - min, h6 = 6 * hue in [0, 6) from the channel holding the max
    (red first, then green), then each channel n in (R 5, G 3, B 1) is ``v - d * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + h6 + 6 hue_turns) mod 6``. Written with 0/1 masks, as DALI's graph computes it."""
    f = np.float32
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    d = v - np.minimum(np.minimum(r, g), b)
    dd = np.maximum(d, f(1e-8))
    m_r = (r >= g).astype(f) * (r >= b).astype(f)
    m_g = (f(1) - m_r) * (g >= b).astype(f)
    m_b = f(1) - m_r - m_g
    h6 = m_r * ((g - b) / dd) + m_g * ((b - r) / dd + f(2)) + m_b * ((r - g) / dd + f(4)) + f(6.0 * hue_turns)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = h6 + f(n)
        k = k - f(6) * np.floor(k / f(6))
        out.append(v - d * np.clip(np.minimum(k, f(4) - k), f(0), f(1)))
    return np.stack(out, axis=-1)


def jitter_in_order(x: np.ndarray, brightness: float, contrast: float, saturation: float, hue_turns: float,
                    order: int) -> np.ndarray:
    """torchvision ColorJitter's four ops on float32 (H, W, 3) in [0, 1], applied in the order of the decimal
    digits of ``order`` (1 brightness ``clamp(b x)``, 2 contrast ``clamp(c x + (1 - c) mean(luma))`` with the
    view's mean luma, 3 saturation ``clamp(s x + (1 - s) luma)``, 4 hue :func:`hue_shift`), e.g. 4213."""
    f = np.float32
    b, c, s = f(brightness), f(contrast), f(saturation)
    for digit in str(int(order)):
        if digit == "1":
            x = np.clip(x * b, f(0), f(1))
        elif digit == "2":
            x = np.clip(x * c + (f(1) - c) * luma(x).mean(dtype=np.float32), f(0), f(1))
        elif digit == "3":
            x = np.clip(x * s + (f(1) - s) * luma(x)[..., None], f(0), f(1))
        else:
            x = hue_shift(x, hue_turns)
    return x


def apply_effects(x: np.ndarray, solarize: float, blur_sigma: float, grayscale: float = 0.0) -> np.ndarray:
    """The render-only effects on float32 (H, W, 3) values in [0, 1] after the colour jitter, in this order:
    grayscale (``grayscale >= 0.5``: every channel = :func:`luma`), solarize (``solarize >= 0.5``:
    ``x + [x >= 128/255] * (1 - 2x)``, i.e. ``1 - x`` at and above the threshold, in float32 like DALI's graph),
    then Gaussian blur of std ``blur_sigma`` pixels (:func:`gaussian_blur`; 0 = none)."""
    x = np.asarray(x, dtype=np.float32)
    if grayscale >= 0.5:
        x = np.repeat(luma(x)[..., None], 3, axis=-1)
    if solarize >= 0.5:
        above = (x >= SOLARIZE_THRESHOLD).astype(np.float32)
        x = x + above * (np.float32(1.0) - np.float32(2.0) * x)
    if blur_sigma > 0:
        x = gaussian_blur(x, blur_sigma)
    return x


def color_twist_affine(brightness: float, contrast: float, saturation: float, hue_turns: float) -> tuple[np.ndarray, np.ndarray]:
    """(A (3, 3), offset (3,)) with ``out = A @ rgb + offset`` for rgb in [0, 1], matching ``fn.color_twist``."""
    angle = math.radians(hue_turns * 360.0)
    c, s = math.cos(angle), math.sin(angle)
    hue_rot = np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])
    m = YIQ2RGB @ hue_rot @ np.diag([1.0, saturation, saturation]) @ RGB2YIQ
    a = brightness * contrast * m
    offset = np.full(3, brightness * (1.0 - contrast) * 0.5)
    return a, offset


def reflect_margin(side: int) -> int:
    """The most output pixels a window may reach outside the image on one border at rendered ``side``:
    ``max(8, side // 4)``, at most ``side // 2 - 1`` (at least 1). The DALI graph mirrors a fixed margin this wide,
    then slices the view, so the part inside the image must be at least this + 1 pixels."""
    return max(1, min(max(8, int(side) // 4), int(side) // 2 - 1))


def reflect_pads(top: int, left: int, height: int, width: int, image_h: int, image_w: int, side: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) output pixels of a ``side`` x ``side`` view whose window reaches outside the
    ``image_h`` x ``image_w`` image: ``floor(outside_source_pixels * side / window_side + 0.5)`` in float32 (the DALI
    graph's arithmetic). Raises ValueError when a pad exceeds :func:`reflect_margin` or too little stays inside."""
    f32 = np.float32
    outside = (max(0, -top), max(0, top + height - image_h), max(0, -left), max(0, left + width - image_w))
    spans = (height, height, width, width)
    pads = tuple(int(np.floor(f32(o) * f32(side) / f32(n) + f32(0.5))) for o, n in zip(outside, spans))
    m = reflect_margin(side)
    if max(pads) > m or side - pads[0] - pads[1] < m + 1 or side - pads[2] - pads[3] < m + 1:
        raise ValueError(f"crop window ({top}, {left}, {height}, {width}) reaches too far outside the {image_w}x{image_h} "
                         f"image: pads {pads} output pixels at side {side}, at most {m} each with {m + 1} inside")
    return pads


def resize_clamped(crop: np.ndarray, size, interpolation: str = "linear") -> np.ndarray:
    """uint8/float (h, w, 3) -> float32 (size, size, 3) (or (oh, ow, 3) for ``size=(oh, ow)``), antialiased, edge
    pixels repeated beyond the border."""
    if interpolation not in _FILTERS:
        raise ValueError(f"interpolation must be one of {tuple(_FILTERS)}, got {interpolation!r}")
    out_h, out_w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    resample, support = _FILTERS[interpolation]
    h, w = crop.shape[:2]
    pad_y = int(math.ceil(support * max(1.0, h / out_h))) + 2
    pad_x = int(math.ceil(support * max(1.0, w / out_w))) + 2
    padded = np.pad(crop.astype(np.float32), ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="edge")
    box = (pad_x, pad_y, pad_x + w, pad_y + h)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(padded[..., k]), mode="F").resize((out_w, out_h), resample, box=box))
        for k in range(3)
    ]
    return np.stack(channels, axis=-1)


def render_one(encoded: bytes, row: np.ndarray, size: int, interpolation: str = "linear") -> np.ndarray:
    """float32 (size, size, 3) in [0, 1] before normalization: one view of one encoded image. ``row``: a stored
    row (N_VIEW_PARAMS values) or a render row (N_RENDER_PARAMS: with solarize and blur_sigma)."""
    top, left, height, width = (int(round(float(v))) for v in row[:4])
    effects = len(row) > N_VIEW_PARAMS
    pads = (0, 0, 0, 0)
    with Image.open(io.BytesIO(encoded)) as im:
        crop_box = (left, top, left + width, top + height)
        if effects and width >= 1 and height >= 1:  # render rows: the part outside the image is mirrored
            pads = reflect_pads(top, left, height, width, im.height, im.width, size)
            crop_box = (max(left, 0), max(top, 0), min(left + width, im.width), min(top + height, im.height))
        if (crop_box[0] < 0 or crop_box[1] < 0 or crop_box[2] > im.width or crop_box[3] > im.height
                or crop_box[2] <= crop_box[0] or crop_box[3] <= crop_box[1]):
            raise ValueError(f"crop window {crop_box} is outside the {im.width}x{im.height} image")
        rgb = np.asarray(im.convert("RGB").crop(crop_box))
    if effects:  # the in-image part at its share of the view, then mirrored out to side x side (numpy reflect)
        x = resize_clamped(rgb, (size - pads[0] - pads[1], size - pads[2] - pads[3]), interpolation)
        x = np.pad(x, ((pads[0], pads[1]), (pads[2], pads[3]), (0, 0)), mode="reflect") / np.float32(255.0)
    else:
        x = resize_clamped(rgb, size, interpolation) / np.float32(255.0)
    order = int(row[N_VIEW_PARAMS + 3]) if effects else 0
    if order:
        x = jitter_in_order(x.astype(np.float32), float(row[5]), float(row[6]), float(row[7]), float(row[8]), order)
    else:
        a, offset = color_twist_affine(float(row[5]), float(row[6]), float(row[7]), float(row[8]))
        x = np.clip(x.astype(np.float64) @ a.T + offset, 0.0, 1.0).astype(np.float32)
    if effects:
        x = apply_effects(x, float(row[N_VIEW_PARAMS]), float(row[N_VIEW_PARAMS + 1]), float(row[N_VIEW_PARAMS + 2]))
    if float(row[4]) >= 0.5:
        x = x[:, ::-1]
    return x


def render_pil(
    encoded: Sequence[bytes],
    params: np.ndarray,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "linear",
) -> torch.Tensor:
    """float32 (B, 3, size, size): views ``params`` (B, P) of ``encoded`` (B images), normalized like DALI's.
    P = N_VIEW_PARAMS (stored rows) or N_RENDER_PARAMS (with the effect columns, see :func:`render_rows`)."""
    rows = np.asarray(params, dtype=np.float32)
    if rows.ndim == 2 and rows.shape[1] == N_RENDER_PARAMS:
        rows = render_rows(rows, len(encoded), effects=True, side=int(size))
    else:
        rows = render_rows(rows, len(encoded), effects=False)
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    out = np.empty((len(encoded), 3, size, size), dtype=np.float32)
    for k, (data, row) in enumerate(zip(encoded, rows)):
        x = render_one(data, row, size, interpolation)
        out[k] = ((x - m) / s).transpose(2, 0, 1)
    return torch.from_numpy(out)


class PilRenderer:
    """:func:`render_pil` behind the :class:`~morphcache.extract.render_dali.DaliRenderer` interface
    (``render(encoded, params) -> [float32 (B, 3, S, S)]``, one output size), views rendered on ``num_threads``
    threads (PIL decode / resize and numpy release the GIL). For machines without DALI; pixels match DALI's CPU
    renderer within the measured tolerance (:mod:`morphcache.extract.render_fidelity`). A view that cannot be
    rendered raises :class:`~morphcache.errors.BadImageError` with ``.index`` (the view's position in the batch).
    """

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 interpolation: str = "linear", num_threads: int = 1) -> None:
        if interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {tuple(_FILTERS)}, got {interpolation!r}")
        self.size, self.interpolation = int(size), interpolation
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.num_threads = max(1, int(num_threads))
        self._pool = None

    def _one(self, k: int, data: bytes, row: np.ndarray, out: np.ndarray) -> None:
        from morphcache.errors import BadImageError
        from morphcache.store.image_table import STATUS_CORRUPT

        try:
            x = render_one(data, row, self.size, self.interpolation)
        except (OSError, ValueError, SyntaxError) as exc:
            raise BadImageError(f"view {k} of the batch could not be rendered by PIL ({type(exc).__name__}: {exc})",
                                reason=STATUS_CORRUPT, index=k) from None
        out[k] = ((x - self.mean) / self.std).transpose(2, 0, 1)

    def render(self, encoded: Sequence[bytes], params: np.ndarray) -> list[torch.Tensor]:
        """[float32 (B, 3, S, S)] for rows (B, N_VIEW_PARAMS) or, with the effect columns, (B, N_RENDER_PARAMS)."""
        rows = np.asarray(params, dtype=np.float32)
        rows = render_rows(rows, len(encoded), effects=rows.ndim == 2 and rows.shape[1] == N_RENDER_PARAMS,
                           side=self.size)
        out = np.empty((len(encoded), 3, self.size, self.size), dtype=np.float32)
        if self.num_threads == 1 or len(encoded) == 1:
            for k, (data, row) in enumerate(zip(encoded, rows)):
                self._one(k, data, row, out)
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="pil-render")
            for f in [self._pool.submit(self._one, k, d, r, out) for k, (d, r) in enumerate(zip(encoded, rows))]:
                f.result()
        return [torch.from_numpy(out)]
