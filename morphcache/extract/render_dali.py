"""The ONE renderer that defines a view: a DALI graph from encoded bytes + a ViewParams row to a normalized tensor.

Per sample (``params`` row = top, left, height, width, flip, brightness, contrast, saturation, hue; see
:data:`morphcache.schemas.specs.VIEW_FIELDS`):

1. ``fn.decoders.image_slice`` decodes only the crop window, given in source pixels
   (``normalized_anchor=False, normalized_shape=False``, axes "HW"); EXIF orientation is NOT applied (the
   canonical bytes of :mod:`morphcache.extract.images` are already upright), the output is RGB uint8.
2. For each requested output side S (teacher and student may differ, the crop is shared):
   ``fn.resize`` to S x S (``antialias=True``; "linear" = triangle filter, "cubic" = Catmull-Rom; float output),
   scaled to [0, 1];
3. ``fn.color_twist`` with the row's brightness, contrast, saturation and hue (hue row value in turns, DALI takes
   degrees). In [0, 1] floats it computes ``b * (c * M(hue, sat) @ rgb + (1 - c) * 0.5)``, where ``M`` rotates
   hue and scales saturation in YIQ space; then clamped to [0, 1];
4. only with ``effects=True`` (LUT's views; rows then carry the render-only
   :data:`~morphcache.schemas.specs.EFFECT_FIELDS`, and without ``effects`` the graph is exactly the one stores
   were extracted with):

   - the window may reach outside the image: ``fn.peek_image_shape`` clips it, the in-image part is decoded and
     resized to its share of S (``floor(outside * S / window + 0.5)`` pixels per border, float32), mirrored by a
     fixed ``reflect_margin(S)`` (slices, flips, ``fn.cat``; numpy ``reflect``: edge pixel not repeated) and the
     S x S view sliced out;
   - ``jitter_order`` != 0 replaces step 3 by torchvision ColorJitter's ops in that digit order (1 brightness, 2
     contrast about the view's mean luma, 3 saturation, 4 HSV hue; each clamped), computed as four slots whose
     candidates are selected with exact 0/1 weights (no DALI conditionals);
   - grayscale (every channel = 0.299 R + 0.587 G + 0.114 B), solarize ``x + on * [x >= 128/255] * (1 - 2x)``,
     then ``fn.gaussian_blur`` (std in view pixels, window ``2 ceil(3 sigma) + 1``, mirrored border) at
     ``max(blur_sigma, 0.1)`` blended in with weight ``[blur_sigma > 0]`` (DALI refuses sigma 0; every off
     effect returns its input exactly);
5. ``fn.crop_mirror_normalize``: horizontal flip when ``flip >= 0.5``, ``(x - mean) / std``, float32 CHW.

The colour ops, the mirrored window (in view coordinates) and the symmetric blur commute with the flip, so its
place does not matter; the PIL fallback in :mod:`morphcache.extract.render_pil` implements the same maths.

Training loader usage (build the graph yourself, feed it with a parallel external source)::

    @pipeline_def(batch_size=B, num_threads=2, device_id=None, py_num_workers=2, py_start_method="spawn")
    def train_pipe():
        encoded, params = fn.external_source(source=SampleSource(...), num_outputs=2, batch=False,
                                             parallel=True, dtype=[types.UINT8, types.FLOAT])
        (images,) = build_view_pipeline(encoded, params, sizes=(S,), mean=mean, std=std)
        return images, ...

where ``SampleSource.__call__(sample_info)`` is stateless and returns (uint8 1-D canonical bytes from
``load_canonical_bytes``, float32 (P,) stored view row).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from morphcache.errors import BadImageError
from morphcache.extract.render_pil import LUMA, MIN_BLUR_SIGMA, SOLARIZE_THRESHOLD, reflect_margin, render_rows
from morphcache.schemas.specs import IMAGENET_MEAN, IMAGENET_STD, N_VIEW_PARAMS
from morphcache.store.image_table import STATUS_CORRUPT

INTERPOLATIONS = ("linear", "cubic")


def _interp(interpolation: str):
    from nvidia.dali import types

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    return types.INTERP_LINEAR if interpolation == "linear" else types.INTERP_CUBIC


def build_view_pipeline(
    encoded,
    params,
    *,
    sizes: Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "linear",
    device: str = "cpu",
    effects: bool = False,
) -> list:
    """Add the view rendering to the pipeline being defined; call inside a ``@pipeline_def`` / ``with pipe:``.

    ``encoded``: CPU DataNode, per sample uint8 (n_bytes,) canonical encoded image.
    ``params``: CPU DataNode, per sample float32 (P,) view row in source pixels: P = N_VIEW_PARAMS, or with
    ``effects`` N_RENDER_PARAMS (solarize, blur_sigma appended; step 4 of the module docstring).
    ``device``: "cpu", or "gpu" (mixed decode, resize and colour ops on the GPU; pipeline needs a device_id).
    Returns one DataNode per entry of ``sizes``: per sample float32 (3, S, S), normalized with ``mean``/``std``
    (given in [0, 1] units).
    """
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    interp = _interp(interpolation)
    window = _in_image_window(encoded, params) if effects else None
    decoded = fn.decoders.image_slice(
        encoded,
        params[0:2] if window is None else window[0],  # anchor (top, left)
        params[2:4] if window is None else window[1],  # shape (height, width)
        device="mixed" if device == "gpu" else "cpu",
        axis_names="HW",
        normalized_anchor=False,
        normalized_shape=False,
        output_type=types.RGB,
        adjust_orientation=False,
    )
    mirror = fn.cast(params[4] >= 0.5, dtype=types.INT32)
    hue_degrees = params[8] * 360.0
    outputs = []
    for side in sizes:
        side = int(side)
        if window is None:
            x = fn.resize(decoded, size=[side, side], interp_type=interp, antialias=True, dtype=types.FLOAT)
        else:  # the in-image part at its share of the view, mirrored out to side x side
            pads = [dmath.floor(o * float(side) / n + 0.5) for o, n in zip(window[2], (params[2], params[2], params[3], params[3]))]
            inside = fn.stack(side - pads[0] - pads[1], side - pads[2] - pads[3])
            x = fn.resize(decoded, size=inside, interp_type=interp, antialias=True, dtype=types.FLOAT)
            x = _reflect_crop(x, pads[0], pads[2], side)
        x = x * (1.0 / 255.0)
        twisted = fn.color_twist(x, brightness=params[5], contrast=params[6], saturation=params[7], hue=hue_degrees)
        twisted = dmath.clamp(twisted, 0.0, 1.0)
        if effects:  # jitter_order 0: the twist; else torchvision's ops in that order (exact 0/1 selection)
            in_order = fn.cast(params[N_VIEW_PARAMS + 3] > 0.0, dtype=types.FLOAT)
            x = twisted * (1.0 - in_order) + _jitter_in_order(x, params) * in_order
            x = _effects(fn.reshape(x, layout="HWC"), params)
        else:
            x = twisted
        x = fn.crop_mirror_normalize(
            x, mirror=mirror, mean=list(map(float, mean)), std=list(map(float, std)), output_layout="CHW", dtype=types.FLOAT
        )
        outputs.append(x)
    return outputs


def _in_image_window(encoded, params):
    """(anchor (2,), shape (2,), outside source pixels (top, bottom, left, right)) of the row's window clipped to
    the image (float DataNodes); the image's size comes from its header (``fn.peek_image_shape``)."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    hwc = fn.cast(fn.peek_image_shape(encoded), dtype=types.FLOAT)
    top, left, height, width = params[0], params[1], params[2], params[3]
    t0, l0 = dmath.max(top, 0.0), dmath.max(left, 0.0)
    b0, r0 = dmath.min(top + height, hwc[0]), dmath.min(left + width, hwc[1])
    outside = (t0 - top, top + height - b0, l0 - left, left + width - r0)
    return fn.stack(t0, l0), fn.stack(b0 - t0, r0 - l0), outside


def _reflect_crop(x, pad_top, pad_left, side: int):
    """float HWC ``x`` mirrored (numpy ``reflect``: the edge pixel not repeated) by the fixed ``reflect_margin(side)``
    on every border, then the side x side window starting ``pad_top``, ``pad_left`` pixels above / left of x."""
    from nvidia.dali import fn, types

    m = reflect_margin(side)
    for axis in (0, 1):
        n = fn.cast(x.shape(dtype=types.INT32)[axis], dtype=types.FLOAT)
        ax = "H" if axis == 0 else "W"
        flip = dict(vertical=1, horizontal=0) if axis == 0 else dict(vertical=0, horizontal=1)
        low = fn.slice(x, 1.0, float(m), axis_names=ax, normalized_anchor=False, normalized_shape=False)
        high = fn.slice(x, n - float(m + 1), float(m), axis_names=ax, normalized_anchor=False, normalized_shape=False)
        x = fn.cat(fn.flip(low, **flip), x, fn.flip(high, **flip), axis=axis)
    anchor = fn.stack(float(m) - pad_top, float(m) - pad_left)
    return fn.slice(x, anchor, [float(side), float(side)], axis_names="HW", normalized_anchor=False,
                    normalized_shape=False)


def _luma(x):
    """(H, W) luma of float HWC ``x`` (render_pil.LUMA)."""
    return LUMA[0] * x[:, :, 0] + LUMA[1] * x[:, :, 1] + LUMA[2] * x[:, :, 2]


def _hue_shift(x, hue_turns):
    """render_pil.hue_shift in DALI arithmetic: HSV hue turned by the per-sample ``hue_turns``."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    v = dmath.max(dmath.max(r, g), b)
    d = v - dmath.min(dmath.min(r, g), b)
    dd = dmath.max(d, 1e-8)
    m_r = fn.cast(r >= g, dtype=types.FLOAT) * fn.cast(r >= b, dtype=types.FLOAT)
    m_g = (1.0 - m_r) * fn.cast(g >= b, dtype=types.FLOAT)
    m_b = 1.0 - m_r - m_g
    h6 = m_r * ((g - b) / dd) + m_g * ((b - r) / dd + 2.0) + m_b * ((r - g) / dd + 4.0) + hue_turns * 6.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = h6 + n
        k = k - 6.0 * dmath.floor(k / 6.0)
        channels.append(v - d * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))
    return fn.reshape(fn.stack(*channels, axis=2), layout="HWC")


def _jitter_in_order(x, params):
    """render_pil.jitter_in_order in DALI: four slots; slot k applies the op named by digit k of jitter_order,
    selected with exact 0/1 weights among the four candidates (no conditionals in the graph)."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    b, c, s, hue = params[5], params[6], params[7], params[8]
    code = params[N_VIEW_PARAMS + 3]
    for slot in range(4):
        q = dmath.floor(code / float(10 ** (3 - slot)))
        digit = q - 10.0 * dmath.floor(q / 10.0)
        lum = _luma(x)
        candidates = (
            dmath.clamp(x * b, 0.0, 1.0),
            dmath.clamp(x * c + (1.0 - c) * fn.reductions.mean(lum), 0.0, 1.0),
            dmath.clamp(x * s + (1.0 - s) * fn.expand_dims(lum, axes=[2]), 0.0, 1.0),
            _hue_shift(x, hue),
        )
        out = None
        for op, y in enumerate(candidates, start=1):
            term = y * fn.cast(digit == float(op), dtype=types.FLOAT)
            out = term if out is None else out + term
        x = fn.reshape(out, layout="HWC")
    return x


def _effects(x, params):
    """Grayscale, solarize, then Gaussian blur of float [0, 1] HWC views; the arithmetic of
    render_pil.apply_effects."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    gray = fn.cast(params[N_VIEW_PARAMS + 2] >= 0.5, dtype=types.FLOAT)
    x = x + gray * (fn.expand_dims(_luma(x), axes=[2]) - x)
    solarize = fn.cast(params[N_VIEW_PARAMS] >= 0.5, dtype=types.FLOAT)
    above = fn.cast(x >= float(SOLARIZE_THRESHOLD), dtype=types.FLOAT)
    x = x + solarize * above * (1.0 - 2.0 * x)
    sigma = params[N_VIEW_PARAMS + 1]
    blurred = fn.gaussian_blur(x, sigma=dmath.max(sigma, MIN_BLUR_SIGMA), dtype=types.FLOAT)
    on = fn.cast(sigma > 0.0, dtype=types.FLOAT)
    return x + on * (blurred - x)


class DaliRenderer:
    """Render batches of views with a DALI pipeline (built lazily, reused across calls).

    ``render(encoded, params)`` takes B <= batch_size canonical encoded images and float32 (B, P) view rows and
    returns one float32 tensor (B, 3, S, S) per output size (on the GPU when ``device="gpu"``). The last, short
    batch is padded by repeating its final sample; the padding is dropped from the result.
    """

    def __init__(
        self,
        sizes: Sequence[int] = (224,),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "linear",
        batch_size: int = 32,
        num_threads: int = 2,
        device: str = "cpu",
        device_id: int | None = None,
        effects: bool = False,
    ) -> None:
        if not sizes or any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes must be positive output sides, got {sizes!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _interp(interpolation)
        self.sizes = tuple(int(s) for s in sizes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self.batch_size = int(batch_size)
        self.num_threads = int(num_threads)
        self.device = device
        self.device_id = (0 if device_id is None else device_id) if device == "gpu" else None
        self.effects = bool(effects)  # rows may carry solarize / blur_sigma (a different graph; see module doc)
        self._pipe = None

    def _build(self):
        from nvidia.dali import Pipeline, fn, types

        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            params = fn.external_source(name="params", dtype=types.FLOAT, ndim=1)
            outs = build_view_pipeline(
                encoded, params, sizes=self.sizes, mean=self.mean, std=self.std,
                interpolation=self.interpolation, device=self.device, effects=self.effects,
            )
            pipe.set_outputs(*outs)
        pipe.build()
        return pipe

    def _run(self, arrays: list[np.ndarray], rows: np.ndarray) -> list[torch.Tensor]:
        if self._pipe is None:
            self._pipe = self._build()
        pad = self.batch_size - len(arrays)
        arrays = arrays + [arrays[-1]] * pad
        rows_list = [r for r in rows] + [rows[-1]] * pad
        self._pipe.feed_input("encoded", arrays)
        self._pipe.feed_input("params", rows_list)
        outs = self._pipe.run()
        n = self.batch_size - pad
        return [_to_torch(o, self.device, self.device_id)[:n] for o in outs]

    def render(self, encoded: Sequence[bytes], params: np.ndarray) -> list[torch.Tensor]:
        """float32 (B, 3, S, S) per size for B = len(encoded) views; raises BadImageError (with ``.index``).
        ``params``: (B, N_VIEW_PARAMS), or with ``effects`` also (B, N_RENDER_PARAMS) (see ``render_rows``)."""
        rows = np.ascontiguousarray(render_rows(params, len(encoded), self.effects, side=min(self.sizes)))
        if not 1 <= len(encoded) <= self.batch_size:
            raise ValueError(f"render takes 1..{self.batch_size} views, got {len(encoded)}")
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in encoded]
        try:
            return self._run(arrays, rows)
        except RuntimeError as batch_error:
            self._pipe = None  # a failed DALI pipeline is not reusable
            culprit = self._find_failing(arrays, rows)
            detail = " ".join(str(batch_error).split())[:160]
            raise BadImageError(
                f"view {culprit} of the batch could not be rendered by DALI ({detail}); mark its image bad and retry",
                reason=STATUS_CORRUPT, index=culprit,
            ) from None

    def _find_failing(self, arrays: list[np.ndarray], rows: np.ndarray) -> int:
        for k in range(len(arrays)):
            try:
                self._run([arrays[k]], rows[k : k + 1])
            except RuntimeError:
                self._pipe = None
                return k
        return -1


def _to_torch(tl, device: str, device_id: int | None = None) -> torch.Tensor:
    """A DALI TensorList of uniform float32 samples -> torch (B, ...) (on ``cuda:device_id`` for GPU output)."""
    if device == "gpu":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=torch.device("cuda", device_id or 0))
        feed_ndarray(t, out)
        return out
    return torch.from_numpy(np.array(tl.as_tensor(), dtype=np.float32, copy=True))
