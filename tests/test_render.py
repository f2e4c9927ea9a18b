"""The DALI view renderer (the definition of a view) and the PIL fallback's measured fidelity to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from skimage import data as skdata

from morphcache.errors import BadImageError
from morphcache.extract.images import canonicalize_bytes, decode_rgb, encode_png
from morphcache.extract.render_dali import DaliRenderer
from morphcache.extract.render_fidelity import compare_renderers
from morphcache.extract.render_pil import color_twist_affine, gaussian_blur, render_pil
from morphcache.extract.views import ViewSampler, identity_view
from morphcache.schemas.specs import CLIP_MEAN, CLIP_STD, AugmentSpec

RAW = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # mean/std that leave pixels in [0, 1]


@pytest.fixture(scope="module")
def photos():
    """Canonical bytes and decoded RGB of a few real photos (scikit-image), cut to small, varied sizes."""
    arrays = [skdata.astronaut()[::2, ::2], skdata.coffee()[::2, ::3], skdata.chelsea()[:, :250], skdata.camera()[::4, ::4]]
    out = []
    for a in arrays:
        enc, size = canonicalize_bytes(encode_png(a), "photo.png")
        out.append((enc, size, decode_rgb(enc)))
    return out


@pytest.fixture(scope="module")
def raw_renderer():
    return DaliRenderer(sizes=(64,), mean=RAW[0], std=RAW[1], batch_size=4)


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def test_identity_view_equals_plain_resize_of_pil_decode(photos, raw_renderer):
    enc, (h, w), rgb = photos[0]
    (out,) = raw_renderer.render([enc], identity_view(h, w)[None])
    ref = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.BILINEAR)).astype(np.float32) / 255
    diff = np.abs(hwc(out[0]) - ref) * 255
    inner = diff[2:-2, 2:-2]
    print(f"identity view vs PIL uint8 bilinear resize: mean {diff.mean():.3f}, interior max {inner.max():.3f} px")
    assert diff.mean() < 0.5 and inner.max() < 1.5  # interior: only uint8 rounding; edges: DALI repeats the border


def test_crop_at_native_size_is_exactly_the_window(photos):
    enc, (h, w), rgb = photos[1]
    r = DaliRenderer(sizes=(32,), mean=RAW[0], std=RAW[1], batch_size=2)
    rows = np.array([[10, 20, 32, 32, 0, 1, 1, 1, 0], [h - 32, w - 32, 32, 32, 0, 1, 1, 1, 0]], np.float32)
    (out,) = r.render([enc, enc], rows)
    np.testing.assert_allclose(hwc(out[0]) * 255, rgb[10:42, 20:52], atol=1e-3)
    np.testing.assert_allclose(hwc(out[1]) * 255, rgb[h - 32 :, w - 32 :], atol=1e-3)


def test_flip_is_exactly_a_flip(photos, raw_renderer):
    enc, (h, w), _ = photos[2]
    row = np.array([5, 7, h - 20, w - 30, 0, 1.1, 0.9, 1.2, 0.05], np.float32)
    flipped = row.copy()
    flipped[4] = 1
    (out,) = raw_renderer.render([enc, enc], np.stack([row, flipped]))
    assert torch.equal(out[1], out[0].flip(-1))


def test_same_crop_at_two_sizes_matches_single_size_renderers(photos):
    enc, (h, w), _ = photos[0]
    rows = ViewSampler(AugmentSpec(hue=0.1), 1).sample_rows([0, 1], [h, h], [w, w], 2)
    both = DaliRenderer(sizes=(28, 40), mean=CLIP_MEAN, std=CLIP_STD, interpolation="cubic", batch_size=4)
    a, b = both.render([enc] * 4, rows)
    assert a.shape == (4, 3, 28, 28) and b.shape == (4, 3, 40, 40)
    for side, got in ((28, a), (40, b)):
        (alone,) = DaliRenderer(sizes=(side,), mean=CLIP_MEAN, std=CLIP_STD, interpolation="cubic", batch_size=4).render(
            [enc] * 4, rows
        )
        assert torch.equal(got, alone)


def test_short_batches_are_padded_and_samples_do_not_interact(photos, raw_renderer):
    encs = [p[0] for p in photos]
    rows = ViewSampler(AugmentSpec(), 4).sample_rows(range(4), [p[1][0] for p in photos], [p[1][1] for p in photos], 1)
    (full,) = raw_renderer.render(encs, rows)
    (part,) = raw_renderer.render(encs[2:], rows[2:])
    assert part.shape == (2, 3, 64, 64)
    assert torch.equal(part, full[2:])
    with pytest.raises(ValueError):
        raw_renderer.render(encs, rows[:3])


def test_colour_ops_follow_the_documented_formula(photos, raw_renderer):
    enc, (h, w), _ = photos[3]
    base = identity_view(h, w)
    rows = np.stack([base] * 4)
    rows[1, 5] = 0.5  # brightness
    rows[2, 6] = 0.0  # contrast 0: uniform grey 0.5
    rows[3, 7] = 0.0  # saturation 0: luma only
    (out,) = raw_renderer.render([enc] * 4, rows)
    x = hwc(out[0]).astype(np.float64)
    np.testing.assert_allclose(hwc(out[1]), 0.5 * x, atol=1e-5)
    np.testing.assert_allclose(hwc(out[2]), 0.5, atol=1e-6)
    a, off = color_twist_affine(1.0, 1.0, 0.0, 0.0)
    np.testing.assert_allclose(hwc(out[3]), np.clip(x @ a.T + off, 0, 1), atol=1e-5)
    assert np.abs(hwc(out[3]) - hwc(out[3]).mean(-1, keepdims=True)).max() < 0.01  # (near) grey


def test_normalization_uses_mean_and_std(photos):
    enc, (h, w), _ = photos[0]
    row = identity_view(h, w)[None]
    (raw,) = DaliRenderer(sizes=(16,), mean=RAW[0], std=RAW[1], batch_size=1).render([enc], row)
    (norm,) = DaliRenderer(sizes=(16,), mean=CLIP_MEAN, std=CLIP_STD, batch_size=1).render([enc], row)
    m = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    s = torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(norm[0], (raw[0] - m) / s, atol=1e-5, rtol=1e-5)


def test_undecodable_sample_is_named_by_index(photos, raw_renderer):
    enc, (h, w), _ = photos[0]
    rows = np.stack([identity_view(h, w)] * 3)
    with pytest.raises(BadImageError) as info:
        raw_renderer.render([enc, b"\x89PNG\r\n\x1a\nbroken", enc], rows)
    assert info.value.index == 1
    (out,) = raw_renderer.render([enc], rows[:1])  # the renderer recovers
    assert out.shape == (1, 3, 64, 64)


def test_pil_fallback_refuses_windows_outside_the_image(photos):
    enc, (h, w), _ = photos[0]
    with pytest.raises(ValueError):
        render_pil([enc], np.array([[1, 0, h, w, 0, 1, 1, 1, 0]], np.float32), 16)


@pytest.mark.parametrize("interpolation,mean_bound,max_bound", [("linear", 0.01, 0.1), ("cubic", 0.03, 1.5)])
def test_pil_fallback_fidelity_to_dali(photos, interpolation, mean_bound, max_bound):
    """Measured on this machine (DALI 2.4, Pillow 12): linear mean 6e-5 / max 0.006 px, cubic mean 0.003 / max
    0.13 px (DALI's cubic upsampling differs slightly). Bounds keep a wide margin."""
    encs = [p[0] for p in photos for _ in range(3)]
    hs = [p[1][0] for p in photos for _ in range(3)]
    ws = [p[1][1] for p in photos for _ in range(3)]
    rows = ViewSampler(AugmentSpec(hue=0.1), 8).sample_rows(range(len(encs)), hs, ws, 1)
    stats = compare_renderers(encs, rows, size=56, mean=CLIP_MEAN, std=CLIP_STD, interpolation=interpolation, batch_size=6)
    print(f"PIL fallback vs DALI ({interpolation}): {stats}")
    assert stats["n_views"] == len(encs)
    assert stats["mean_abs_pixel"] < mean_bound and stats["max_abs_pixel"] < max_bound


# --- render-only effects (LUT's views): solarize, Gaussian blur, windows mirrored outside the image -------------


@pytest.fixture(scope="module")
def effects_renderer():
    return DaliRenderer(sizes=(32,), mean=RAW[0], std=RAW[1], batch_size=4, effects=True)


def _effect_row(top, left, height, width, flip=0.0, solarize=0.0, blur_sigma=0.0, colour=(1.0, 1.0, 1.0, 0.0),
                grayscale=0.0, jitter_order=0):
    return np.array([top, left, height, width, flip, *colour, solarize, blur_sigma, grayscale, jitter_order], np.float32)


def test_effects_off_render_exactly_like_stored_rows(photos, effects_renderer):
    """Stored (9-column) rows and render rows with both effects off give bit-identical pixels on the plain graph
    and on the effects graph: stores written before the effect fields render unchanged."""
    plain = DaliRenderer(sizes=(32,), mean=RAW[0], std=RAW[1], batch_size=4)
    encs = [p[0] for p in photos]
    stored = np.stack([np.array([3, 5, 60, 70, k % 2, 1.1, 0.9, 0.7, 0.05], np.float32) for k in range(4)])
    ref = plain.render(encs, stored)[0]
    padded = np.concatenate([stored, np.zeros((4, 4), np.float32)], axis=1)
    assert torch.equal(effects_renderer.render(encs, stored)[0], ref)
    assert torch.equal(effects_renderer.render(encs, padded)[0], ref)
    assert torch.equal(render_pil(encs, padded, 32, *RAW), render_pil(encs, stored, 32, *RAW))


def test_solarize_inverts_at_and_above_128_like_pil(photos, effects_renderer):
    enc, _, rgb = photos[0]
    row = _effect_row(0, 0, 32, 32)  # native scale: the rendered view is the uint8 window / 255
    base = hwc(effects_renderer.render([enc], row[None])[0][0])
    np.testing.assert_allclose(base * 255, rgb[:32, :32], atol=1e-3)
    sol = hwc(effects_renderer.render([enc], _effect_row(0, 0, 32, 32, solarize=1.0)[None])[0][0])
    ref = np.asarray(ImageOps.solarize(Image.fromarray(np.ascontiguousarray(rgb[:32, :32])))) / 255.0
    assert (rgb[:32, :32] >= 128).any() and (rgb[:32, :32] < 128).any()
    np.testing.assert_allclose(sol, ref, atol=1e-5)


def test_blur_is_dalis_gaussian_and_close_to_the_releases_pil_blur(photos, effects_renderer):
    """Same kernel in both renderers (std in view pixels, radius ceil(3 sigma), mirrored border); against PIL's
    GaussianBlur(radius=sigma) (the release's op, an extended-box approximation with clamped borders) the interior
    differs by < 1 level on average (measured 0.6-0.8 levels at sigma 0.5-2)."""
    enc, _, rgb = photos[1]
    window = np.ascontiguousarray(rgb[10:42, 20:52])
    for sigma in (0.5, 1.0, 2.0):
        out = hwc(effects_renderer.render([enc], _effect_row(10, 20, 32, 32, blur_sigma=sigma)[None])[0][0]) * 255
        np.testing.assert_allclose(out, gaussian_blur(window.astype(np.float32), sigma), atol=1e-3)
        pil = np.asarray(Image.fromarray(window).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(np.float64)
        assert np.abs(out - pil)[6:-6, 6:-6].mean() < 1.0
        assert np.abs(out - window).mean() > 1.0  # it does blur
    # the kernel itself: a unit impulse spreads as normalized exp(-t^2 / 2 sigma^2) over ceil(3 sigma) pixels
    impulse = np.zeros((21, 21, 1), np.float32)
    impulse[10, 10] = 1.0
    t = np.arange(-3, 4)
    k = np.exp(-t**2 / 2.0)
    np.testing.assert_allclose(gaussian_blur(impulse, 1.0)[10, 7:14, 0], k / k.sum() * (k[3] / k.sum()), atol=1e-7)
    assert gaussian_blur(impulse, 1.0)[10, 6, 0] == 0.0


def test_window_outside_the_image_is_mirrored_without_repeating_the_edge(photos, effects_renderer):
    """At native scale a window reaching 3 rows above and 2 columns left of the image renders as numpy's reflect
    padding of the part inside (torchvision's padding_mode='reflect'), in both renderers."""
    enc, (h, w), rgb = photos[0]
    row = _effect_row(-3, -2, 32, 32)
    ref = np.pad(rgb[:29, :30].astype(np.float32), ((3, 0), (2, 0), (0, 0)), mode="reflect") / 255.0
    np.testing.assert_allclose(hwc(effects_renderer.render([enc], row[None])[0][0]), ref, atol=1e-5)
    np.testing.assert_allclose(hwc(render_pil([enc], row[None], 32, *RAW)[0]), ref, atol=1e-5)
    row = _effect_row(h - 30, w - 29, 32, 32)  # 2 rows below, 3 columns right
    ref = np.pad(rgb[h - 30 :, w - 29 :].astype(np.float32), ((0, 2), (0, 3), (0, 0)), mode="reflect") / 255.0
    np.testing.assert_allclose(hwc(effects_renderer.render([enc], row[None])[0][0]), ref, atol=1e-5)
    np.testing.assert_allclose(hwc(render_pil([enc], row[None], 32, *RAW)[0]), ref, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_effects_fidelity_pil_to_dali(photos, interpolation):
    """Solarize, blur, grayscale, ordered jitter and mirrored windows at a resampling scale: PIL fallback vs DALI
    within the bounds of test_pil_fallback_fidelity_to_dali (cubic: mean 0.03, max 1.5 levels; a pixel next to
    the solarize threshold may flip, by about 1 level)."""
    encs, rows = [], []
    rng = np.random.default_rng(3)
    for k in range(12):
        enc, (h, w), _ = photos[k % len(photos)]
        side = min(h, w)
        top, left = int(rng.integers(-6, h - side + 7)), int(rng.integers(-6, w - side + 7))
        encs.append(enc)
        rows.append(_effect_row(top, left, side, side, flip=k % 2, solarize=float(k % 3 == 1),
                                blur_sigma=float(rng.uniform(0.1, 2.0)) if k % 3 == 2 else 0.0,
                                colour=(1.2, 0.8, 1.1, 0.05) if k % 4 else (1.0, 1.0, 1.0, 0.0),
                                grayscale=float(k % 5 == 0), jitter_order=(0, 4213, 1234, 3142)[k % 4]))
    rows = np.stack(rows)
    outside = (rows[:, 0] < 0) | (rows[:, 1] < 0)
    assert outside.any() and (rows[:, 9] == 1).any() and (rows[:, 10] > 0).any() and (rows[:, 11] == 1).any()
    stats = compare_renderers(encs, rows, size=40, interpolation=interpolation, batch_size=6)
    print(f"effects, PIL fallback vs DALI ({interpolation}): {stats}")
    assert stats["mean_abs_pixel"] < 0.03 and stats["max_abs_pixel"] < 1.5, stats


def test_ordered_jitter_is_torchvisions_colorjitter_on_float_pixels(photos, effects_renderer):
    """jitter_order != 0: torchvision.transforms.functional's brightness, contrast, saturation and hue (HSV) in the
    row's order (the release's ColorJitter draws that order per call), in both renderers; the order matters."""
    import torchvision.transforms.functional as TF

    enc, _, rgb = photos[2]
    window = torch.from_numpy(np.ascontiguousarray(rgb[20:52, 30:62])).permute(2, 0, 1).float() / 255
    b, c, s, hue = 1.3, 0.7, 1.2, -0.08
    ops = {"1": lambda im: TF.adjust_brightness(im, b), "2": lambda im: TF.adjust_contrast(im, c),
           "3": lambda im: TF.adjust_saturation(im, s), "4": lambda im: TF.adjust_hue(im, hue)}
    outs = {}
    for order in (1234, 4321, 2413, 3142):
        ref = window
        for digit in str(order):
            ref = ops[digit](ref)
        row = _effect_row(20, 30, 32, 32, colour=(b, c, s, hue), jitter_order=order)[None]
        outs[order] = effects_renderer.render([enc], row)[0][0]
        # torchvision's grayscale weighs red 0.2989, PIL's (and ours) 0.299: about 1e-4 apart
        torch.testing.assert_close(outs[order], ref, atol=2e-4, rtol=0)
        torch.testing.assert_close(render_pil([enc], row, 32, *RAW)[0], ref, atol=2e-4, rtol=0)
    assert (outs[1234] - outs[4321]).abs().max() > 0.02  # a different order renders differently
    hue_only = _effect_row(20, 30, 32, 32, colour=(1.0, 1.0, 1.0, 0.1), jitter_order=1234)[None]
    torch.testing.assert_close(effects_renderer.render([enc], hue_only)[0][0], TF.adjust_hue(window, 0.1), atol=1e-5, rtol=0)
    gray = _effect_row(20, 30, 32, 32, grayscale=1.0)[None]  # after the jitter: PIL convert("L") weights
    ref = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[20:52, 30:62])).convert("L")) / 255.0
    for out in (effects_renderer.render([enc], gray)[0][0], render_pil([enc], gray, 32, *RAW)[0]):
        assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
        np.testing.assert_allclose(out[0].numpy(), ref, atol=0.5 / 255 + 1e-6)  # PIL rounds L to a whole level


def test_effect_rows_are_validated(photos, raw_renderer, effects_renderer):
    enc, (h, w), _ = photos[0]
    with pytest.raises(ValueError, match="effects=True"):
        raw_renderer.render([enc], _effect_row(0, 0, 32, 32, solarize=1.0)[None])
    with pytest.raises(ValueError, match="finite"):
        render_pil([enc], _effect_row(0, 0, 32, 32, grayscale=float("nan"))[None], 32)
    for sigma in (-1.0, 0.05, float("nan"), 100.0):
        with pytest.raises(ValueError, match="blur_sigma|finite"):
            effects_renderer.render([enc], _effect_row(0, 0, 32, 32, blur_sigma=sigma)[None])
        with pytest.raises(ValueError, match="blur_sigma|finite"):
            render_pil([enc], _effect_row(0, 0, 32, 32, blur_sigma=sigma)[None], 32)
    for order in (1233, 5, 12345, 0.5, -1234):
        with pytest.raises(ValueError, match="jitter_order"):
            render_pil([enc], _effect_row(0, 0, 32, 32, jitter_order=order)[None], 32)
        with pytest.raises(ValueError, match="jitter_order"):
            effects_renderer.render([enc], _effect_row(0, 0, 32, 32, jitter_order=order)[None])
    with pytest.raises(ValueError, match="kernel radius"):
        render_pil([enc], _effect_row(0, 0, 32, 32, blur_sigma=3.0)[None], 8)
    with pytest.raises(ValueError, match="too far outside"):
        render_pil([enc], _effect_row(-20, 0, 32, 32)[None], 32)
    with pytest.raises(ValueError):  # stored rows keep refusing windows outside the image
        render_pil([enc], np.array([[-1, 0, 32, 32, 0, 1, 1, 1, 0]], np.float32), 32)
