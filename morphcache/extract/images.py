"""The ONE place that turns a source image file into renderer input.

:func:`load_canonical_bytes` returns encoded bytes that DALI's CPU decoder turns into exactly the RGB uint8 pixels
PIL sees, plus the (height, width) of those pixels. Extraction and training both call it, so a view replays
exactly. Policy (decided here, documented once):

- **Pass-through (fast path, bytes untouched):** JPEG in RGB or grayscale (baseline or progressive; DALI's CPU
  decoder matched PIL bit for bit on this machine) and 8-bit RGB / grayscale PNG without a transparency chunk,
  both only without an EXIF rotation. Verification is cheap: a JPEG's whole entropy-coded stream is decoded at
  1/8 scale (PIL ``draft``), which catches truncation; a PNG's chunk CRCs are checked up to IEND (``verify``).
- **Re-encoded losslessly as PNG** (PIL decode, compress level 1): everything else - CMYK / YCCK JPEG, 16-bit
  PNG, palette, RGBA, LA, 1-bit, TIFF, WebP, BMP, GIF (first frame), PPM, and any image with an EXIF orientation,
  which is applied (the stored size is the displayed size).
- **Alpha is dropped**, not composited: RGBA -> RGB keeps the colour channels, as ``PIL.Image.convert("RGB")``
  and torchvision's ``ImageFolder`` loader do, so features match a standard torchvision pipeline.
- **16-bit** samples keep their high byte (``v >> 8``), matching how PIL reads 16-bit RGB PNGs.
- **Size cap:** images above :data:`MAX_PIXELS` (250 M pixels, checked from the header before decoding) are
  refused with :data:`STATUS_TOO_LARGE`. A 10000 x 10000 image (100 M pixels) is processed; a JPEG that large is
  passed through after a 1/8-scale check (DALI decodes only the crop window). PIL's decompression-bomb guard is
  raised to this cap when the module is imported (``PIL.Image.MAX_IMAGE_PIXELS``), so it never fires first.
- Images smaller than the output size are fine (the renderer upsamples); DALI handles 1 x 1 images.

Bad inputs raise :class:`~morphcache.errors.BadImageError` with ``.reason`` set to a code of
:data:`~morphcache.store.image_table.STATUS_REASONS` and a one-line message naming the file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from morphcache.errors import BadImageError, MorphcacheError
from morphcache.store.image_table import (
    STATUS_CORRUPT,
    STATUS_EMPTY,
    STATUS_MISSING,
    STATUS_NOT_IMAGE,
    STATUS_REASONS,
    STATUS_TOO_LARGE,
    STATUS_TRUNCATED,
    STATUS_UNSUPPORTED,
    path_to_text,
)

#: Largest accepted image, in pixels (height * width).
MAX_PIXELS = 250_000_000

if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE_MAGIC = (b"\xff\xd8\xff", _PNG_SIGNATURE, b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ORIENTATION_TAG = 0x0112
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError)


def content_hash(data: bytes) -> str:
    """Hex blake2b-128 of ``data`` (the manifest's content hash)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def bad_image(name: str | Path, reason: int, detail: str = "") -> BadImageError:
    """A :class:`BadImageError` whose ``.reason`` is ``reason`` and whose message names ``name``."""
    what = STATUS_REASONS.get(reason, f"status {reason}")
    name = path_to_text(str(name))  # a name that is not UTF-8 is shown with \xHH escapes
    extra = f" ({detail})" if detail else ""
    return BadImageError(f"{name}: {what}{extra}; {EXTRACT_HINT}", reason=reason)


#: What a bad image's message tells an ``extract`` user to do (:func:`bad_image`).
EXTRACT_HINT = "fix or remove the file, or use --on-bad-image skip"


def with_training_hint(exc: BadImageError, root: str | Path) -> BadImageError:
    """``exc`` with the extraction hint replaced by what helps a command that re-reads a store's images (``train``
    has no ``--on-bad-image``; a missing file usually means the image folder moved: ``--image-root``)."""
    hint = (f"if the image folder moved, pass --image-root DIR pointing at its new place (images were read from "
            f"{path_to_text(str(root))}); otherwise restore the file as it was at extraction")
    message = str(exc)
    message = message.replace(EXTRACT_HINT, hint) if EXTRACT_HINT in message else f"{message}; {hint}"
    return BadImageError(message, reason=exc.reason, index=exc.index)


def read_file_bytes(path: str | Path) -> bytes:
    """The file's bytes; a missing or unreadable file raises ``BadImageError`` (reason missing)."""
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise bad_image(path, STATUS_MISSING, type(e).__name__) from None


def open_header(data: bytes, name: str | Path) -> Image.Image:
    """Lazily open ``data`` (header only, no pixels decoded); failures raise ``BadImageError`` with a reason."""
    if not data:
        raise bad_image(name, STATUS_EMPTY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise bad_image(name, STATUS_TOO_LARGE, str(e).split(".")[0]) from None
    except UnidentifiedImageError:
        known = data.startswith(_IMAGE_MAGIC) or data[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
        raise bad_image(name, STATUS_CORRUPT if known else STATUS_NOT_IMAGE, "unreadable header") from None
    except _DECODE_ERRORS as e:
        raise _decode_failure(name, e) from None


def _decode_failure(name: str | Path, e: Exception) -> BadImageError:
    msg = " ".join(str(e).split())[:120]
    reason = STATUS_TRUNCATED if "truncat" in msg.lower() else STATUS_CORRUPT
    return bad_image(name, reason, f"{type(e).__name__}: {msg}")


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8, 1 = upright) without decoding pixels."""
    try:
        if im.format == "PNG":  # PngImageFile.getexif() decodes the image when no eXIf chunk precedes IDAT
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        value = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block must not make a readable image unusable
        return 1
    return value if 1 <= value <= 8 else 1


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(height, width) after applying the EXIF orientation (5..8 swap the sides)."""
    w, h = im.size
    return (w, h) if orientation(im) in (5, 6, 7, 8) else (h, w)


def _check_pixels(im: Image.Image, name: str | Path) -> None:
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise bad_image(name, STATUS_TOO_LARGE, f"{w}x{h} > {MAX_PIXELS} pixels")
    if w < 1 or h < 1:
        raise bad_image(name, STATUS_CORRUPT, f"size {w}x{h}")


def _passthrough_kind(im: Image.Image, data: bytes) -> str | None:
    """'jpeg' / 'png' when the bytes can go to DALI untouched, else None."""
    if orientation(im) != 1:
        return None
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        return "jpeg"
    if (
        im.format == "PNG"
        and im.mode in ("RGB", "L")
        and data[:8] == _PNG_SIGNATURE
        and len(data) > 25
        and data[24] == 8  # IHDR bit depth: 8 bits per sample only
        and "transparency" not in im.info
        and not getattr(im, "is_animated", False)
    ):
        return "png"
    return None


def _verify_passthrough(kind: str, data: bytes, im: Image.Image, name: str | Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "jpeg":
                w, h = im.size
                im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
                im.load()
            else:
                Image.open(io.BytesIO(data)).verify()
    except _DECODE_ERRORS as e:
        raise _decode_failure(name, e) from None


def to_rgb_or_gray(im: Image.Image, name: str | Path = "<image>") -> Image.Image:
    """Decoded PIL image -> an 8-bit 'RGB' or 'L' image under the policy in the module docstring."""
    if im.mode in ("RGB", "L"):
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im).astype(np.int64)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")
    if im.mode == "F":
        raise bad_image(name, STATUS_UNSUPPORTED, "floating-point pixels")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise bad_image(name, STATUS_UNSUPPORTED, f"mode {im.mode}: {e}") from None


def encode_png(pixels: np.ndarray | Image.Image, compress_level: int = 1) -> bytes:
    """Lossless PNG of uint8 pixels (H, W) or (H, W, 3) (or an 'RGB'/'L' PIL image)."""
    im = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.ascontiguousarray(pixels, np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def canonicalize_bytes(data: bytes, name: str | Path = "<bytes>", *, verify: bool = True) -> tuple[bytes, tuple[int, int]]:
    """Like :func:`load_canonical_bytes` for bytes already in memory; ``name`` is used in error messages."""
    im = open_header(data, name)
    _check_pixels(im, name)
    kind = _passthrough_kind(im, data)
    if kind is not None:
        w, h = im.size  # before the verification's draft decode shrinks im.size
        if verify:
            _verify_passthrough(kind, data, im, name)
        return data, (h, w)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            im = ImageOps.exif_transpose(im) if orientation(im) != 1 else im
    except Image.DecompressionBombError as e:
        raise bad_image(name, STATUS_TOO_LARGE, str(e).split(".")[0]) from None
    except _DECODE_ERRORS as e:
        raise _decode_failure(name, e) from None
    out = to_rgb_or_gray(im, name)
    w, h = out.size
    return encode_png(out), (h, w)


def load_canonical_bytes(path: str | Path, *, verify: bool = True) -> tuple[bytes, tuple[int, int]]:
    """Encoded bytes DALI's CPU decoder turns into this image's RGB uint8 pixels, and their (height, width).

    ``verify=False`` skips the cheap integrity check of pass-through files (for loaders re-reading images that
    extraction already checked). Raises :class:`BadImageError` (``.reason`` = status code) for bad files.
    """
    return canonicalize_bytes(read_file_bytes(path), path, verify=verify)


def load_stored_image_bytes(path: str | Path, expected_hash: str, *, verify: bool = True) -> tuple[bytes, tuple[int, int]]:
    """:func:`load_canonical_bytes` for an image a store was extracted from: a file whose content hash differs
    from ``expected_hash`` (the manifest's; empty skips the check) is refused, since its stored views and
    cached targets no longer describe its pixels. Used by extraction, replay and the training loaders."""
    return canonicalize_stored_bytes(read_file_bytes(path), path, expected_hash, verify=verify)


def canonicalize_stored_bytes(data: bytes, name: str | Path, expected_hash: str, *, verify: bool = True,
                              what: str = "file") -> tuple[bytes, tuple[int, int]]:
    """The hash check and canonicalization of :func:`load_stored_image_bytes` for bytes already read (a loose
    file's, or a tar shard member's read by (shard, offset, size); ``what`` names the source in the message)."""
    if expected_hash and content_hash(data) != expected_hash:
        raise MorphcacheError(f"{path_to_text(str(name))}: {what} changed since the store was extracted (content hash differs), so its "
                              f"cached targets no longer match; restore the {what} or extract into a new --out store")
    return canonicalize_bytes(data, name, verify=verify)


def describe_bytes(data: bytes, name: str | Path) -> tuple[str, int, int]:
    """(content hash, height, width) of an image's bytes for the manifest; (hash, 0, 0) for an unreadable header
    (extraction decides the reason later)."""
    digest = content_hash(data)
    try:
        h, w = oriented_size(open_header(data, name))
    except Exception:  # any header failure: extraction decides the reason later
        return digest, 0, 0
    return digest, h, w


def decode_rgb(encoded: bytes) -> np.ndarray:
    """uint8 (H, W, 3): PIL's RGB decode of canonical bytes (reference for renderers and tests)."""
    with Image.open(io.BytesIO(encoded)) as im:
        return np.asarray(im.convert("RGB"))


def to_uint8_rgb(pixels: np.ndarray) -> np.ndarray:
    """Any in-memory image array -> contiguous uint8 RGB ``(H, W, 3)``, under this module's policy.

    For arrays that do not come from a file (``skimage.data``, scikit-learn, idx or pickle datasets), so they
    reach PNG/DALI/PIL as the same pixels a file would.

    Shapes: ``(H, W)`` and ``(H, W, 1)`` gray (copied to 3 channels), ``(H, W, 2)`` gray + alpha, ``(H, W, 3)``
    RGB, ``(H, W, 4)`` RGBA; alpha is dropped, not composited (as for files). Any ``H, W >= 1``.

    Values:

    - ``bool``: False -> 0, True -> 255;
    - ``uint8``: unchanged;
    - wider unsigned integers: the high byte (``v >> (bits - 8)``; 16-bit ``v >> 8`` as for 16-bit files);
    - signed integers: the dtype's whole range mapped linearly onto 0..255 (offset binary, then the high byte;
      int8 -128 -> 0, 127 -> 255);
    - floats: if every finite value lies in [0, 1], ``round(255 v)``; otherwise the finite values' min..max is
      stretched onto 0..255 (a constant image gives 0). NaN -> 0, +inf -> 255, -inf -> 0.

    Raises :class:`~morphcache.errors.MorphcacheError` naming the shape or dtype for anything else (empty,
    1-D, more than 4 channels, complex, object).
    """
    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[2] in (1, 2, 3, 4):
        a = a[..., :1] if a.shape[2] in (1, 2) else a[..., :3]  # gray(+alpha) -> gray; RGB(A) -> RGB
    elif a.ndim != 2:
        raise MorphcacheError(f"image array of shape {a.shape}: use (H, W), or (H, W, C) with C 1 to 4")
    if a.size == 0:
        raise MorphcacheError(f"image array of shape {a.shape} has no pixels")
    kind = a.dtype.kind
    if kind == "b":
        out = a.astype(np.uint8) * np.uint8(255)
    elif kind == "u":
        out = (a >> (8 * a.dtype.itemsize - 8)).astype(np.uint8) if a.dtype.itemsize > 1 else a.astype(np.uint8)
    elif kind == "i":
        bits = 8 * a.dtype.itemsize
        udtype = np.dtype(f"u{a.dtype.itemsize}")
        offset = a.astype(udtype) ^ np.array(1 << (bits - 1), dtype=udtype)  # two's complement -> offset binary
        out = (offset >> (bits - 8)).astype(np.uint8)
    elif kind == "f":
        v = a.astype(np.float64)
        finite = np.isfinite(v)
        lo, hi = (float(v[finite].min()), float(v[finite].max())) if finite.any() else (0.0, 1.0)
        if lo < 0.0 or hi > 1.0:
            v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
        v = np.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0)
        out = np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise MorphcacheError(f"image array of dtype {a.dtype}: use bool, integer or floating-point pixels")
    if out.ndim == 2:
        out = out[..., None]
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out)
