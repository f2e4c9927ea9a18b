"""load_canonical_bytes: pass-through, lossless re-encoding and bad-image reasons, checked through DALI itself."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from morphcache.errors import BadImageError
from morphcache.extract.images import MAX_PIXELS, canonicalize_bytes, decode_rgb, load_canonical_bytes
from morphcache.extract.render_dali import DaliRenderer
from morphcache.extract.views import identity_view
from morphcache.store.image_table import (
    STATUS_CORRUPT,
    STATUS_EMPTY,
    STATUS_MISSING,
    STATUS_NOT_IMAGE,
    STATUS_REASONS,
    STATUS_TOO_LARGE,
    STATUS_TRUNCATED,
    STATUS_UNSUPPORTED,
)

SIDE = 48
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def pattern(h: int = SIDE, w: int = SIDE, seed: int = 0) -> np.ndarray:
    """uint8 (h, w, 3): smooth gradients plus noise (JPEG-friendly, every channel different)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 5) * 90 + 128, np.cos(yy / 4) * 90 + 128, (xx * 3 + yy * 2) % 256], axis=-1)
    return np.clip(base + rng.integers(-15, 16, base.shape), 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (gray (h, w) or RGB (h, w, 3) uint16), written by hand (PIL cannot write 48-bit RGB)."""
    h, w = arr.shape[:2]
    color_type = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return PNG_SIG + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return PNG_SIG + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def dali_pixels():
    """Decode canonical bytes of a square image through the real DALI renderer (identity view, same size)."""
    renderers: dict[int, DaliRenderer] = {}

    def run(encoded: bytes, side: int) -> np.ndarray:
        if side not in renderers:
            renderers[side] = DaliRenderer(sizes=(side,), mean=(0, 0, 0), std=(1, 1, 1), batch_size=1)
        (out,) = renderers[side].render([encoded], identity_view(side, side)[None])
        return np.rint(out[0].permute(1, 2, 0).numpy() * 255).astype(np.int16)

    return run


def check_reason(data: bytes, reason: int, name: str = "img.bin") -> BadImageError:
    with pytest.raises(BadImageError) as info:
        canonicalize_bytes(data, name)
    err = info.value
    assert err.reason == reason, (STATUS_REASONS[err.reason], str(err))
    msg = str(err)
    assert "\n" not in msg and name in msg and STATUS_REASONS[reason] in msg
    return err


# ---- pass-through ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,mode,kw",
    [
        ("JPEG", "RGB", {"quality": 90}),  # 4:2:0
        ("JPEG", "RGB", {"quality": 95, "subsampling": 0}),
        ("JPEG", "RGB", {"quality": 90, "progressive": True}),
        ("JPEG", "L", {}),
        ("PNG", "RGB", {}),
        ("PNG", "L", {}),
    ],
)
def test_passthrough_bytes_untouched_and_dali_decodes_like_pil(tmp_path, dali_pixels, fmt, mode, kw):
    data = encode(Image.fromarray(pattern()).convert(mode), fmt, **kw)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    out, (h, w) = load_canonical_bytes(path)
    assert out == data and (h, w) == (SIDE, SIDE)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)
    np.testing.assert_array_equal(dali_pixels(out, SIDE), expected)


# ---- re-encoded ----------------------------------------------------------------------------------------------


def _reencode_cases():
    rgb = pattern()
    im = Image.fromarray(rgb)
    alpha = Image.fromarray((np.arange(SIDE * SIDE) % 256).astype(np.uint8).reshape(SIDE, SIDE))
    rgba = im.copy()
    rgba.putalpha(alpha)
    la = im.convert("L")
    la.putalpha(alpha)
    pal = im.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    wide = (rgb.astype(np.uint16) * 257 + np.arange(SIDE)[None, :, None].astype(np.uint16)).astype(np.uint16)
    cmyk = encode(im.convert("CMYK"), "JPEG", quality=90)
    return {
        # name: (encoded source, expected RGB uint8 after canonicalization)
        "cmyk_jpeg": (cmyk, np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))),
        "rgba_png_alpha_dropped": (encode(rgba, "PNG"), rgb),
        "la_png_alpha_dropped": (encode(la, "PNG"), np.repeat(np.asarray(im.convert("L"))[..., None], 3, -1)),
        "palette_png": (encode(pal, "PNG"), np.asarray(pal.convert("RGB"))),
        "palette_transparency_png": (encode(pal_t, "PNG", transparency=3), np.asarray(pal.convert("RGB"))),
        "bilevel_png": (encode(im.convert("1"), "PNG"), np.asarray(im.convert("1").convert("RGB"))),
        "gray16_png": (png16(wide[..., 0]), np.repeat((wide[..., :1] >> 8).astype(np.uint8), 3, -1)),
        "rgb16_png": (png16(wide), (wide >> 8).astype(np.uint8)),
        "tiff": (encode(im, "TIFF"), rgb),
        "tiff_lzw": (encode(im, "TIFF", compression="tiff_lzw"), rgb),
        "webp_lossless": (encode(im, "WEBP", lossless=True), rgb),
        "bmp": (encode(im, "BMP"), rgb),
        "ppm": (encode(im, "PPM"), rgb),
        "gif": (encode(pal, "GIF"), np.asarray(pal.convert("RGB"))),
    }


REENCODE = _reencode_cases()


@pytest.mark.parametrize("name", sorted(REENCODE))
def test_reencoded_losslessly_as_png(dali_pixels, name):
    source, expected = REENCODE[name]
    out, (h, w) = canonicalize_bytes(source, name)
    assert out != source and out.startswith(PNG_SIG)
    assert (h, w) == (SIDE, SIDE)
    np.testing.assert_array_equal(decode_rgb(out), expected)
    np.testing.assert_array_equal(dali_pixels(out, SIDE), expected.astype(np.int16))


def test_exif_rotation_is_applied_and_size_swapped(dali_pixels):
    im = Image.fromarray(pattern(SIDE, 32))  # 48 high, 32 wide as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(im, "JPEG", quality=92, exif=exif.tobytes())
    out, (h, w) = canonicalize_bytes(data, "rotated.jpg")
    assert (h, w) == (32, SIDE)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(decode_rgb(out), expected)
    square = Image.fromarray(pattern(40, 40))
    data_sq = encode(square, "JPEG", quality=92, exif=exif.tobytes())
    out_sq, _ = canonicalize_bytes(data_sq, "rotated_square.jpg")
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data_sq))).convert("RGB")).astype(np.int16)
    np.testing.assert_array_equal(dali_pixels(out_sq, 40), want)


def test_smaller_than_output_and_one_pixel_images_render():
    out, size = canonicalize_bytes(encode(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG"), "dot.png")
    assert size == (1, 1)
    r = DaliRenderer(sizes=(16,), mean=(0, 0, 0), std=(1, 1, 1), batch_size=1)
    (img,) = r.render([out], identity_view(1, 1)[None])
    np.testing.assert_allclose(img[0, :, 0, 0].numpy() * 255, [200, 10, 30], atol=1e-3)
    assert float(img.std(dim=(2, 3)).max()) < 1e-6


def test_very_large_jpeg_is_processed_and_cropped(tmp_path):
    side = 10_000  # 100 M pixels: above PIL's default bomb warning, below MAX_PIXELS
    yy = np.arange(side, dtype=np.uint16)[:, None]
    xx = np.arange(side, dtype=np.uint16)[None, :]
    gray = ((yy // 40 + xx // 40) % 2 * 160 + 40).astype(np.uint8)
    path = tmp_path / "huge.jpg"
    Image.fromarray(gray, mode="L").save(path, quality=80)
    del gray
    data, (h, w) = load_canonical_bytes(path)
    assert (h, w) == (side, side) and data == path.read_bytes()  # passed through untouched
    r = DaliRenderer(sizes=(40,), mean=(0, 0, 0), std=(1, 1, 1), batch_size=1)
    row = np.array([[5000, 7000, 40, 40, 0, 1, 1, 1, 0]], np.float32)
    (img,) = r.render([data], row)
    with Image.open(path) as im:
        ref = np.asarray(im.crop((7000, 5000, 7040, 5040)).convert("RGB")).astype(np.float32)
    np.testing.assert_allclose(img[0].permute(1, 2, 0).numpy() * 255, ref, atol=1e-3)


# ---- bad images -----------------------------------------------------------------------------------------------


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(BadImageError) as info:
        load_canonical_bytes(tmp_path / "nope.jpg")
    assert info.value.reason == STATUS_MISSING and "nope.jpg" in str(info.value)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImageError) as info:
        load_canonical_bytes(tmp_path / "empty.png")
    assert info.value.reason == STATUS_EMPTY
    with pytest.raises(BadImageError) as info:
        load_canonical_bytes(tmp_path)  # a folder is not a file
    assert info.value.reason == STATUS_MISSING


def test_not_an_image():
    check_reason(b"hello, this is a text file\n" * 20, STATUS_NOT_IMAGE, "notes.jpg")
    check_reason(b"PK\x03\x04" + bytes(200), STATUS_NOT_IMAGE, "archive.png")


def test_truncated_files():
    jpeg = encode(Image.fromarray(pattern()), "JPEG", quality=90)
    png = encode(Image.fromarray(pattern()), "PNG")
    check_reason(jpeg[: len(jpeg) // 2], STATUS_TRUNCATED, "half.jpg")
    check_reason(png[: len(png) // 2], STATUS_TRUNCATED, "half.png")
    tiff = encode(Image.fromarray(pattern()), "TIFF")
    check_reason(tiff[: len(tiff) // 2], STATUS_TRUNCATED, "half.tiff")


def test_truncated_jpeg_only_caught_by_verification():
    jpeg = encode(Image.fromarray(pattern()), "JPEG", quality=90)
    cut = jpeg[: len(jpeg) // 2]
    out, _ = canonicalize_bytes(cut, "half.jpg", verify=False)  # the loader's trusted fast path
    assert out == cut


def test_corrupt_files():
    png = bytearray(encode(Image.fromarray(pattern()), "PNG"))
    png[len(png) // 2] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    check_reason(bytes(png), STATUS_CORRUPT, "flipped.png")
    check_reason(b"\xff\xd8\xff" + bytes(range(256)) * 4, STATUS_CORRUPT, "garbage.jpg")
    check_reason(PNG_SIG + b"\x00\x00\x00\x0dIHDR" + bytes(5), STATUS_TRUNCATED, "stub.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_accepted_damaged_files_never_break_the_renderer(dali_pixels, fmt):
    """Damage anywhere: the file is refused as corrupt/truncated, or DALI decodes what was accepted."""
    clean = encode(Image.fromarray(pattern()), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    rng = np.random.default_rng(7)
    outcomes = {"refused": 0, "accepted": 0}
    for trial in range(12):
        data = bytearray(clean)
        start = int(rng.integers(len(data) // 4, len(data) - 40))
        data[start : start + 32] = rng.integers(0, 256, 32, dtype=np.uint8).tobytes() if trial % 2 else b"\xff" * 32
        try:
            out, size = canonicalize_bytes(bytes(data), f"damaged{trial}")
        except BadImageError as err:
            assert err.reason in (STATUS_CORRUPT, STATUS_TRUNCATED)
            outcomes["refused"] += 1
            continue
        assert size == (SIDE, SIDE)
        assert dali_pixels(out, SIDE).shape == (SIDE, SIDE, 3)  # raises if DALI cannot decode it
        outcomes["accepted"] += 1
    print(fmt, outcomes)
    assert outcomes["refused"] > 0


def test_too_large_from_header_without_decoding():
    err = check_reason(png_header_only(20_000, 15_000), STATUS_TOO_LARGE, "huge.png")  # 300 M > MAX_PIXELS
    assert str(MAX_PIXELS) in str(err)
    check_reason(png_header_only(40_000, 40_000), STATUS_TOO_LARGE, "bomb.png")  # 1.6 G: PIL's bomb guard


def test_float_tiff_is_unsupported():
    arr = np.linspace(0, 1, SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE)
    check_reason(encode(Image.fromarray(arr, mode="F"), "TIFF"), STATUS_UNSUPPORTED, "float.tif")
