"""Replayable view sampling: (seed, image, view) -> ViewParams, with no state shared between workers.

Randomness is counter-based: view ``v`` of image ``i`` reads :data:`DRAWS_PER_VIEW` uniform doubles from
``numpy.random.Philox(key=(seed, i), counter=v * BLOCKS_PER_VIEW)``. Each Philox block yields 4 doubles, so the
views of one image occupy consecutive, disjoint stretches of one stream (key (seed, i)), and any worker can
produce any view in any order. :meth:`ViewSampler.sample_rows` reads one stream per image and computes the
parameters of all its views at once; it gives bit-identical rows to the per-view call.

Draw layout per view (fixed, so the meaning of a draw never depends on earlier outcomes):
``0..9`` area scale per attempt, ``10..19`` log aspect ratio per attempt, ``20`` top, ``21`` left, ``22`` flip,
``23`` brightness, ``24`` contrast, ``25`` saturation, ``26`` hue, ``27`` reserved.

Crop semantics are torchvision's ``RandomResizedCrop.get_params``: up to 10 attempts of an area fraction uniform
in ``scale`` and an aspect ratio log-uniform in ``ratio``, ``w = round(sqrt(area * r))``, ``h = round(sqrt(area
/ r))`` (round half to even, like Python's ``round``), accepted when ``0 < w <= W`` and ``0 < h <= H`` with a
uniform integer position; otherwise the centre-crop fallback (the largest centred crop whose aspect ratio is
clipped to ``ratio``). The crop always lies inside the image. Flip with probability ``flip_p``; brightness,
contrast and saturation factors uniform in ``[max(0, 1 - j), 1 + j]``; hue shift (in turns) uniform in ``[-h, h]``.
Unlike torchvision's ``ColorJitter`` the renderer applies the jitter in one fixed order (one colour matrix).
"""

from __future__ import annotations

import numpy as np

from morphcache.schemas.specs import N_VIEW_PARAMS, AugmentSpec, ViewParams

ATTEMPTS = 10
DRAWS_PER_VIEW = 28
BLOCKS_PER_VIEW = DRAWS_PER_VIEW // 4  # Philox4x64 yields 4 doubles per counter step
_U64 = 2**64


def _check_u64(value: int, what: str) -> int:
    v = int(value)
    if v < 0 or v >= _U64:
        raise ValueError(f"{what} must be in [0, 2**64), got {value}")
    return v


def view_generator(seed: int, image_index: int, view_index: int = 0) -> np.random.Generator:
    """The generator whose first :data:`DRAWS_PER_VIEW` doubles are view ``view_index`` of ``image_index``."""
    key = np.array([_check_u64(seed, "seed"), _check_u64(image_index, "image index")], dtype=np.uint64)
    counter = _check_u64(view_index, "view index") * BLOCKS_PER_VIEW
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


class _Streams:
    """Reads Philox streams by resetting one bit generator's state (constructing a Philox costs ~30 us, a state
    reset ~5 us). Gives exactly ``view_generator(seed, i, v).random(n)``: doubles are ``(raw >> 11) * 2**-53``,
    numpy's own conversion. Not thread-safe: make one per call."""

    def __init__(self) -> None:
        self._bg = np.random.Philox(key=0)
        self._state = self._bg.state

    def uniforms(self, seed: int, image_index: int, view_index: int, n: int) -> np.ndarray:
        st = self._state
        st["state"]["key"] = np.array([seed, _check_u64(image_index, "image index")], dtype=np.uint64)
        st["state"]["counter"] = np.array([_check_u64(view_index, "view index") * BLOCKS_PER_VIEW, 0, 0, 0], dtype=np.uint64)
        st["buffer_pos"] = 4  # buffer empty: the next draw computes a fresh block
        st["has_uint32"] = 0
        self._bg.state = st
        return (self._bg.random_raw(n) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


def identity_view(height: int, width: int) -> np.ndarray:
    """float32 (P,): the whole image, no flip, no colour change."""
    return np.array([0, 0, height, width, 0, 1, 1, 1, 0], dtype=np.float32)


def _jitter(u: np.ndarray, amount: float) -> np.ndarray:
    lo, hi = max(0.0, 1.0 - amount), 1.0 + amount
    return np.ones_like(u) if amount == 0 else lo + u * (hi - lo)


def params_from_uniforms(u: np.ndarray, heights: np.ndarray, widths: np.ndarray, augment: AugmentSpec) -> np.ndarray:
    """float64 uniforms (n, DRAWS_PER_VIEW) and source sizes (n,) -> float32 view rows (n, P).

    Rows of images with a zero side (unreadable) are all zeros.
    """
    H = np.asarray(heights, dtype=np.float64).reshape(-1)
    W = np.asarray(widths, dtype=np.float64).reshape(-1)
    n = len(H)
    out = np.zeros((n, N_VIEW_PARAMS), dtype=np.float32)
    valid = (H >= 1) & (W >= 1)
    if not valid.any():
        return out
    u, H, W = u[valid], H[valid], W[valid]

    s0, s1 = augment.scale
    lr0, lr1 = np.log(augment.ratio[0]), np.log(augment.ratio[1])
    target = (H * W)[:, None] * (s0 + u[:, :ATTEMPTS] * (s1 - s0))
    ratio = np.exp(lr0 + u[:, ATTEMPTS : 2 * ATTEMPTS] * (lr1 - lr0))
    w_try = np.rint(np.sqrt(target * ratio))
    h_try = np.rint(np.sqrt(target / ratio))
    ok = (w_try > 0) & (w_try <= W[:, None]) & (h_try > 0) & (h_try <= H[:, None])
    first = np.argmax(ok, axis=1)
    found = ok.any(axis=1)
    rows = np.arange(len(H))
    h = h_try[rows, first]
    w = w_try[rows, first]
    top = np.floor(u[:, 20] * (H - h + 1))
    left = np.floor(u[:, 21] * (W - w + 1))

    # Centre-crop fallback (torchvision): clip the whole image's aspect ratio to the allowed range.
    rmin, rmax = augment.ratio
    in_ratio = W / H
    fb_w = np.where(in_ratio < rmin, W, np.where(in_ratio > rmax, np.rint(H * rmax), W))
    fb_h = np.where(in_ratio < rmin, np.rint(W / rmin), H)
    fb_h = np.clip(fb_h, 1, H)
    fb_w = np.clip(fb_w, 1, W)
    h = np.where(found, h, fb_h)
    w = np.where(found, w, fb_w)
    top = np.where(found, top, np.floor((H - fb_h) / 2))
    left = np.where(found, left, np.floor((W - fb_w) / 2))
    top = np.clip(top, 0, H - h)  # u < 1 already keeps these inside; the clamp guards float edge cases
    left = np.clip(left, 0, W - w)

    vals = np.stack(
        [
            top,
            left,
            h,
            w,
            (u[:, 22] < augment.flip_p).astype(np.float64),
            _jitter(u[:, 23], augment.brightness),
            _jitter(u[:, 24], augment.contrast),
            _jitter(u[:, 25], augment.saturation),
            (2.0 * u[:, 26] - 1.0) * augment.hue,
        ],
        axis=1,
    )
    out[valid] = vals.astype(np.float32)
    return out


class ViewSampler:
    """``ViewSampler(augment, seed)(image_index, view_index, height, width) -> ViewParams``."""

    def __init__(self, augment: AugmentSpec | None = None, seed: int = 0) -> None:
        self.augment = augment if augment is not None else AugmentSpec()
        self.seed = _check_u64(seed, "seed")

    def uniforms(self, image_index: int, view_index: int) -> np.ndarray:
        """float64 (DRAWS_PER_VIEW,): the raw draws of one view."""
        return _Streams().uniforms(self.seed, image_index, view_index, DRAWS_PER_VIEW)

    def row(self, image_index: int, view_index: int, height: int, width: int) -> np.ndarray:
        """float32 (P,): one view row (all zeros for an image with a zero side)."""
        u = self.uniforms(image_index, view_index)[None]
        return params_from_uniforms(u, np.array([height]), np.array([width]), self.augment)[0]

    def __call__(self, image_index: int, view_index: int, height: int, width: int) -> ViewParams:
        if height < 1 or width < 1:
            raise ValueError(f"image {image_index} has size {height}x{width}; views need a decodable image")
        return ViewParams.from_row(self.row(image_index, view_index, height, width))

    def sample_rows(self, image_indices, heights, widths, views_per_image: int) -> np.ndarray:
        """float32 (n * V, P): rows for views 0..V-1 of each image, image-major (row = k * V + v).

        ``image_indices``, ``heights``, ``widths`` are (n,) sequences; images with a zero side get zero rows.
        """
        idx = np.asarray(image_indices, dtype=np.int64).reshape(-1)
        V = int(views_per_image)
        if V < 1:
            raise ValueError(f"views_per_image must be >= 1, got {views_per_image}")
        u = np.empty((len(idx), V * DRAWS_PER_VIEW), dtype=np.float64)
        streams = _Streams()
        for k, i in enumerate(idx.tolist()):
            u[k] = streams.uniforms(self.seed, i, 0, V * DRAWS_PER_VIEW)
        hh = np.repeat(np.asarray(heights, dtype=np.int64).reshape(-1), V)
        ww = np.repeat(np.asarray(widths, dtype=np.int64).reshape(-1), V)
        return params_from_uniforms(u.reshape(-1, DRAWS_PER_VIEW), hh, ww, self.augment)
