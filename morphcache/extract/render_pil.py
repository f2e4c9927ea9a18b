"""PIL/numpy fallback renderer with the same semantics as :mod:`morphcache.extract.render_dali`.

For machines without DALI. Per view: PIL decode (RGB uint8) -> crop the window -> resize to S x S in float
(PIL mode "F", antialiased bilinear / bicubic) -> /255 -> DALI's colour-twist matrix -> clamp [0, 1] -> flip ->
normalize -> CHW. Its fidelity against DALI is measured (:func:`morphcache.extract.render_fidelity.compare_renderers`),
not assumed. Two details copy DALI on purpose:

- DALI's resize extends the crop by repeating its edge pixels, while PIL renormalizes the filter at the border;
  the crop is therefore edge-padded and resized through PIL's ``box`` argument, so border pixels match too.
- ``color_twist`` (measured on DALI 2.4): ``out = b * (c * M @ rgb + (1 - c) * 0.5)`` with
  ``M = inv(RGB2YIQ) @ R(hue)^T @ diag(1, s, s) @ RGB2YIQ`` (rounded NTSC YIQ coefficients).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from morphcache.schemas.specs import IMAGENET_MEAN, IMAGENET_STD, N_VIEW_PARAMS

RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], dtype=np.float64)
YIQ2RGB = np.linalg.inv(RGB2YIQ)
_FILTERS = {"linear": (Image.BILINEAR, 1.0), "cubic": (Image.BICUBIC, 2.0)}


def color_twist_affine(brightness: float, contrast: float, saturation: float, hue_turns: float) -> tuple[np.ndarray, np.ndarray]:
    """(A (3, 3), offset (3,)) with ``out = A @ rgb + offset`` for rgb in [0, 1], matching ``fn.color_twist``."""
    angle = math.radians(hue_turns * 360.0)
    c, s = math.cos(angle), math.sin(angle)
    hue_rot = np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])
    m = YIQ2RGB @ hue_rot @ np.diag([1.0, saturation, saturation]) @ RGB2YIQ
    a = brightness * contrast * m
    offset = np.full(3, brightness * (1.0 - contrast) * 0.5)
    return a, offset


def resize_clamped(crop: np.ndarray, size: int, interpolation: str = "linear") -> np.ndarray:
    """uint8/float (h, w, 3) -> float32 (size, size, 3), antialiased, edge pixels repeated beyond the border."""
    if interpolation not in _FILTERS:
        raise ValueError(f"interpolation must be one of {tuple(_FILTERS)}, got {interpolation!r}")
    resample, support = _FILTERS[interpolation]
    h, w = crop.shape[:2]
    pad_y = int(math.ceil(support * max(1.0, h / size))) + 2
    pad_x = int(math.ceil(support * max(1.0, w / size))) + 2
    padded = np.pad(crop.astype(np.float32), ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="edge")
    box = (pad_x, pad_y, pad_x + w, pad_y + h)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(padded[..., k]), mode="F").resize((size, size), resample, box=box))
        for k in range(3)
    ]
    return np.stack(channels, axis=-1)


def render_one(encoded: bytes, row: np.ndarray, size: int, interpolation: str = "linear") -> np.ndarray:
    """float32 (size, size, 3) in [0, 1] before normalization: one view of one encoded image."""
    top, left, height, width = (int(round(float(v))) for v in row[:4])
    with Image.open(io.BytesIO(encoded)) as im:
        crop_box = (left, top, left + width, top + height)
        if left < 0 or top < 0 or left + width > im.width or top + height > im.height or width < 1 or height < 1:
            raise ValueError(f"crop window {crop_box} is outside the {im.width}x{im.height} image")
        rgb = np.asarray(im.convert("RGB").crop(crop_box))
    x = resize_clamped(rgb, size, interpolation) / np.float32(255.0)
    a, offset = color_twist_affine(float(row[5]), float(row[6]), float(row[7]), float(row[8]))
    x = np.clip(x.astype(np.float64) @ a.T + offset, 0.0, 1.0).astype(np.float32)
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
    """float32 (B, 3, size, size): views ``params`` (B, P) of ``encoded`` (B images), normalized like DALI's."""
    rows = np.asarray(params, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != N_VIEW_PARAMS or rows.shape[0] != len(encoded):
        raise ValueError(f"params must be ({len(encoded)}, {N_VIEW_PARAMS}), got {rows.shape}")
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
        rows = np.asarray(params, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != N_VIEW_PARAMS or rows.shape[0] != len(encoded):
            raise ValueError(f"params must be ({len(encoded)}, {N_VIEW_PARAMS}), got {rows.shape}")
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
