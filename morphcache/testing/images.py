"""Small generated image folders for extraction tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from morphcache.store.image_table import (
    STATUS_CORRUPT,
    STATUS_EMPTY,
    STATUS_NOT_IMAGE,
    STATUS_OK,
    STATUS_TRUNCATED,
)


def write_noise_pngs(folder: Path, n: int, seed: int, prefix: str) -> Path:
    """``n`` random-noise RGB PNGs of 24..63 px per side, named ``<prefix>000.png``..., in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(24, 64, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{prefix}{i:03d}.png")
    return folder


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid_png(width: int, height: int, value: int = 90) -> bytes:
    """A grayscale 8-bit PNG of one value, built directly (10000 x 10000 compresses to about 100 KB)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" + bytes([value]) * width
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def picture(seed: int, h: int = 40, w: int = 52) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 5) % 256, (yy * 7) % 256, ((xx + yy) * 3) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8))


#: The image zoo: every kind of file extraction is tested on, file name -> expected status.
EXPECTED = {
    "a_good.png": STATUS_OK,
    "b_corrupt.png": STATUS_CORRUPT,
    "c_cmyk.jpg": STATUS_OK,
    "d_gray.png": STATUS_OK,
    "e_empty.png": STATUS_EMPTY,
    "f_rgba.png": STATUS_OK,
    "g_palette.png": STATUS_OK,
    "h_truncated.jpg": STATUS_TRUNCATED,
    "i_sixteen_bit.png": STATUS_OK,
    "j_notes.jpg": STATUS_NOT_IMAGE,
    "k_tiny.png": STATUS_OK,
    "l_huge.png": STATUS_OK,
    "m_truncated.png": STATUS_TRUNCATED,
    "n_good.jpg": STATUS_OK,
}


def image_zoo_files() -> dict[str, bytes]:
    """The bytes of every file of :data:`EXPECTED`."""
    pic = picture(0)
    png, jpg = encode(pic, "PNG"), encode(picture(1), "JPEG", quality=90)
    sixteen = (np.arange(40 * 52).reshape(40, 52) * 31 % 65536).astype(np.uint16)
    return {
        "a_good.png": png,
        "b_corrupt.png": png[:33] + bytes(np.random.default_rng(3).integers(0, 256, 400, dtype=np.uint8)),
        "c_cmyk.jpg": encode(picture(2).convert("CMYK"), "JPEG"),
        "d_gray.png": encode(picture(3).convert("L"), "PNG"),
        "e_empty.png": b"",
        "f_rgba.png": encode(picture(4).convert("RGBA"), "PNG"),
        "g_palette.png": encode(picture(5).convert("P"), "PNG"),
        "h_truncated.jpg": jpg[: len(jpg) // 2],
        "i_sixteen_bit.png": encode(Image.fromarray(sixteen), "PNG"),
        "j_notes.jpg": b"these are notes, not a picture\n",
        "k_tiny.png": encode(picture(6, 3, 2), "PNG"),  # smaller than the 32 px output
        "l_huge.png": solid_png(10000, 10000),
        "m_truncated.png": png[: len(png) // 2],
        "n_good.jpg": jpg,
    }


def write_image_zoo(folder: Path) -> Path:
    """Write the image zoo (:func:`image_zoo_files`) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in image_zoo_files().items():
        (folder / name).write_bytes(data)
    return folder
