"""Image intake: format allow-list by magic bytes, size and integrity checks, RGB normalization.

Pure Pillow/stdlib. Every problem with the uploaded bytes surfaces as :class:`ImageRejected`
with a stable ``code`` and an HTTP-style ``status`` (413, 415 or 422); no raw Pillow exception
and no Pillow decompression-bomb warning escapes.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageCms, ImageFile, ImageOps

__all__ = ["ImageInfo", "ImageRejected", "decode_upload", "inspect_image", "load_rgb",
           "sniff_format"]

logger = logging.getLogger(__name__)

# our format name -> (the one Pillow plugin allowed to open it, MIME type)
_FORMATS: dict[str, tuple[str, str]] = {
    "jpeg": ("JPEG", "image/jpeg"),
    "png": ("PNG", "image/png"),
    "webp": ("WEBP", "image/webp"),
    "bmp": ("BMP", "image/bmp"),
    "tiff": ("TIFF", "image/tiff"),
    "gif": ("GIF", "image/gif"),
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})  # DIB headers Pillow reads
_ORIENTATION_TAG = 0x0112
_WHITE = (255, 255, 255)
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_OTHER_MODES = frozenset({"RGB", "RGBX", "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"})
_KNOWN_MODES = _HIGH_DEPTH_MODES | _ALPHA_MODES | _OTHER_MODES
_ALLOWED_NAMES = "JPEG, PNG, WebP, BMP, TIFF or GIF"

# warnings.catch_warnings swaps a process-wide filter list; the lock keeps concurrent
# callers of this module from restoring each other's state out of order.
_WARNINGS_LOCK = threading.Lock()


class ImageRejected(Exception):
    """An upload that is not an acceptable image."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(code, message, status)  # args survive pickling (task results)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ImageInfo:
    """Format and displayed size (after EXIF orientation) of an accepted image."""

    format: str
    mime: str
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """Return the allowed format named by the file's magic bytes, or None."""
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in _TIFF_SIGNATURES:
        return "tiff"
    if (
        head[:2] == b"BM"
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES
    ):
        return "bmp"
    return None


def inspect_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Validate an upload completely (decodes every pixel) and describe it."""
    fmt, _, (width, height) = _decode(data, max_pixels=max_pixels, draft_size=None)
    return ImageInfo(format=fmt, mime=_FORMATS[fmt][1], width=width, height=height)


def load_rgb(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode an upload into a loaded RGB image in its displayed orientation.

    ``draft_size`` lets JPEGs decode at a reduced power-of-two scale that keeps each side at
    least ``draft_size`` (when the original was); other formats ignore it.
    """
    return decode_upload(data, max_pixels=max_pixels, draft_size=draft_size)[1]


def decode_upload(data: bytes, *, max_pixels: int,
                  draft_size: int | None = None) -> tuple[ImageInfo, Image.Image]:
    """Validate and decode in one pass: the full-size description and the (drafted) RGB image.

    For a request that validates and predicts, this saves the second decode that
    :func:`inspect_image` followed by :func:`load_rgb` would cost.
    """
    fmt, img, (width, height) = _decode(data, max_pixels=max_pixels, draft_size=draft_size)
    try:
        rgb = _to_rgb(img)
        rgb.load()
    except Exception as exc:
        logger.debug("RGB conversion of a %s image (mode %s) failed", fmt, img.mode, exc_info=True)
        raise _unsupported_mode(img.mode) from exc
    info = ImageInfo(format=fmt, mime=_FORMATS[fmt][1], width=width, height=height)
    return info, rgb


# -- decoding ----------------------------------------------------------------------------------


def _decode(data: bytes, *, max_pixels: int,
            draft_size: int | None) -> tuple[str, Image.Image, tuple[int, int]]:
    """Open with the one sniffed plugin, check size and integrity, load, apply orientation.

    Returns the format, the oriented image (reduced when drafted) and the full displayed size.
    """
    if max_pixels < 1:
        raise ValueError("max_pixels must be positive")
    if draft_size is not None and draft_size < 1:
        raise ValueError("draft_size must be positive")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # would let truncated files pass as valid
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    if not data:
        raise ImageRejected("empty_file", "The file is empty.", 422)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(
            "unsupported_media_type",
            f"The file is not a supported image; allowed formats are {_ALLOWED_NAMES}.",
            415,
        )
    pil_format = _FORMATS[fmt][0]
    limit = _effective_limit(max_pixels)
    try:
        with _quiet_pillow():
            img = Image.open(io.BytesIO(data), formats=[pil_format])
    except Image.DecompressionBombError as exc:
        match = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(int(match.group(1)) if match else None, limit) from exc
    except Exception as exc:
        logger.debug("opening a %s upload failed", fmt, exc_info=True)
        raise _corrupt(fmt, "its header is invalid") from exc

    width, height = img.size
    if width < 1 or height < 1:
        raise _corrupt(fmt, "it declares an empty size")
    if width * height > limit:
        raise _too_large(width * height, limit, (width, height))
    if fmt == "png" and not _png_chunks_intact(data):
        raise _corrupt(fmt, "it is truncated or fails its checksums")
    if img.mode not in _KNOWN_MODES:
        raise _unsupported_mode(img.mode)

    try:
        if draft_size is not None and fmt == "jpeg":
            img.draft("RGB", (draft_size, draft_size))
        pillow_soft_limit = Image.MAX_IMAGE_PIXELS
        if pillow_soft_limit is not None and width * height > pillow_soft_limit:
            with _quiet_pillow():  # rare: only when max_pixels exceeds Pillow's own limit
                img.load()
        else:
            img.load()
    except Exception as exc:
        logger.debug("decoding a %s upload failed", fmt, exc_info=True)
        raise _corrupt(fmt, "its data is truncated or damaged") from exc
    oriented, swapped = _apply_orientation(img)
    return fmt, oriented, (height, width) if swapped else (width, height)


def _effective_limit(max_pixels: int) -> int:
    """The pixel limit, capped at the size Pillow itself refuses outright."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is None:
        return max_pixels
    return min(max_pixels, 2 * pillow_limit)


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Silence Pillow's bomb warning (we enforce our own limit) and its metadata warnings."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def _png_chunks_intact(data: bytes) -> bool:
    """True if every PNG chunk is complete, passes its CRC, and IEND is reached."""
    view = memoryview(data)
    pos, end = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= end:
        (length,) = struct.unpack_from(">I", data, pos)
        stop = pos + 8 + length
        if stop + 4 > end:
            return False
        (crc,) = struct.unpack_from(">I", data, stop)
        if zlib.crc32(view[pos + 4 : stop]) != crc:
            return False
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos = stop + 4
    return False


def _apply_orientation(img: Image.Image) -> tuple[Image.Image, bool]:
    """Rotate/flip into the displayed frame; unreadable EXIF counts as orientation 1.

    Also says whether width and height swapped (orientations 5-8).
    """
    try:
        with _quiet_pillow():  # exif_transpose re-parses EXIF on the copy it makes
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
            if not isinstance(orientation, int) or orientation not in range(2, 9):
                return img, False
            return ImageOps.exif_transpose(img), orientation >= 5
    except Exception:
        logger.debug("ignoring unreadable EXIF orientation", exc_info=True)
        return img, False


# -- mode normalization ------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_DEPTH_MODES:
        return _to_8bit_gray(img).convert("RGB")
    if mode in _ALPHA_MODES or img.has_transparency_data:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode == "LAB":
        try:
            return img.convert("RGB")
        except ValueError:  # older Pillow: no direct LAB conversion
            transform = ImageCms.buildTransform(
                ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
            )
            converted = ImageCms.applyTransform(img, transform)
            assert converted is not None
            return converted
    return img.convert("RGB")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or float image linearly onto 0..255 ("L").

    16-bit modes use their full 0..65535 range. For "I" and "F" the range is chosen from the
    values present: 0..255 as is, 0..65535 as 16-bit, float 0..1 as unit, else min..max.
    """
    if img.mode.startswith("I;16"):
        scale, offset = 255 / 65535, 0.0
    else:
        extrema = img.getextrema()
        assert isinstance(extrema[0], int | float) and isinstance(extrema[1], int | float)
        low, high = float(extrema[0]), float(extrema[1])
        if img.mode == "F" and low >= 0 and high <= 1:
            scale, offset = 255.0, 0.0
        elif low >= 0 and high <= 255:
            scale, offset = 1.0, 0.0
        elif low >= 0 and high <= 65535:
            scale, offset = 255 / 65535, 0.0
        else:
            scale = 255 / (high - low) if high > low else 0.0
            offset = -low * scale
    shift = offset + 0.5  # F -> L truncates; this rounds to nearest
    return img.convert("F").point(lambda v: v * scale + shift).convert("L")


# -- rejections --------------------------------------------------------------------------------


def _too_large(
    pixels: int | None, limit: int, size: tuple[int, int] | None = None
) -> ImageRejected:
    what = "The image size" if pixels is None else f"The image size of {pixels} pixels"
    if size is not None:
        what += f" ({size[0]}x{size[1]})"
    return ImageRejected("image_too_large", f"{what} exceeds the limit of {limit} pixels.", 413)


def _corrupt(fmt: str, reason: str) -> ImageRejected:
    name = _FORMATS[fmt][0].replace("WEBP", "WebP")
    return ImageRejected("corrupt_image", f"The file starts like a {name} image but {reason}.", 422)


def _unsupported_mode(mode: str) -> ImageRejected:
    return ImageRejected(
        "unsupported_pixel_format", f"The image's pixel format ({mode}) is not supported.", 415
    )
