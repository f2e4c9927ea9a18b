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
4. ``fn.crop_mirror_normalize``: horizontal flip when ``flip >= 0.5``, ``(x - mean) / std``, float32 CHW.

Flip and the colour matrix are per-pixel/pixel-permuting, so their order does not matter; the PIL fallback in
:mod:`morphcache.extract.render_pil` implements the same maths.

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
) -> list:
    """Add the view rendering to the pipeline being defined; call inside a ``@pipeline_def`` / ``with pipe:``.

    ``encoded``: CPU DataNode, per sample uint8 (n_bytes,) canonical encoded image.
    ``params``: CPU DataNode, per sample float32 (P,) view row in source pixels.
    ``device``: "cpu", or "gpu" (mixed decode, resize and colour ops on the GPU; pipeline needs a device_id).
    Returns one DataNode per entry of ``sizes``: per sample float32 (3, S, S), normalized with ``mean``/``std``
    (given in [0, 1] units).
    """
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    interp = _interp(interpolation)
    decoded = fn.decoders.image_slice(
        encoded,
        params[0:2],  # anchor (top, left)
        params[2:4],  # shape (height, width)
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
        x = fn.resize(decoded, size=[side, side], interp_type=interp, antialias=True, dtype=types.FLOAT)
        x = x * (1.0 / 255.0)
        x = fn.color_twist(x, brightness=params[5], contrast=params[6], saturation=params[7], hue=hue_degrees)
        x = dmath.clamp(x, 0.0, 1.0)
        x = fn.crop_mirror_normalize(
            x, mirror=mirror, mean=list(map(float, mean)), std=list(map(float, std)), output_layout="CHW", dtype=types.FLOAT
        )
        outputs.append(x)
    return outputs


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
                interpolation=self.interpolation, device=self.device,
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
        """float32 (B, 3, S, S) per size for B = len(encoded) views; raises BadImageError (with ``.index``)."""
        rows = np.ascontiguousarray(np.asarray(params, dtype=np.float32))
        if rows.ndim != 2 or rows.shape[1] != N_VIEW_PARAMS or rows.shape[0] != len(encoded):
            raise ValueError(f"params must be ({len(encoded)}, {N_VIEW_PARAMS}), got {rows.shape}")
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
