"""Tests for service.imaging: allow-list, rejections, EXIF orientation, modes, draft decoding."""

from __future__ import annotations

import io
import pickle
import random
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from PIL import EpsImagePlugin, Image, ImageFile, ImageOps

from service import imaging
from service.imaging import (
    ImageInfo,
    ImageRejected,
    decode_upload,
    inspect_image,
    load_rgb,
    sniff_format,
)

LIMIT = 50_000_000
PHOTO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cards" / "train"

RGB = tuple[int, int, int]
RED: RGB = (255, 0, 0)
GREEN: RGB = (0, 255, 0)
BLUE: RGB = (0, 0, 255)
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_eps_and_no_warnings(
    monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> Iterator[None]:
    """Fail if the EPS plugin / Ghostscript is ever reached or any warning escapes."""
    calls: list[str] = []

    def eps_open(self: Any) -> None:
        calls.append("EpsImageFile._open")
        raise SyntaxError("EPS plugin must not run")

    def ghostscript(*args: Any, **kwargs: Any) -> None:
        calls.append("Ghostscript")
        raise OSError("Ghostscript must not run")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", eps_open)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    max_pixels = Image.MAX_IMAGE_PIXELS
    yield
    assert calls == []
    assert [str(w.message) for w in recwarn.list] == []
    assert max_pixels == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.fixture(scope="module")
def photo_path() -> Path:
    photos = sorted(PHOTO_DIR.glob("*.JPG"))
    if not photos:
        pytest.skip(f"no *.JPG photo under {PHOTO_DIR}")
    return photos[0]


@pytest.fixture(scope="module")
def photo(photo_path: Path) -> bytes:
    return photo_path.read_bytes()


# -- image builders ----------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def noise(size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.effect_noise(size, 60).convert("RGB")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


@cache
def blank_png(width: int, height: int, rows: int | None = None) -> bytes:
    """An all-black 1-bit PNG (valid unless ``rows`` cuts the pixel data short).

    20000x20000 compresses to about 48 KB; with ``rows=1000`` to about 3 KB.
    """
    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed zero bits
    compressor = zlib.compressobj(9)
    count = height if rows is None else rows
    idat = b"".join(compressor.compress(row) for _ in range(count)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_with(mutate: Callable[[bytearray, int, int], None]) -> bytes:
    """A small PNG passed to ``mutate(data, idat_offset, idat_length)``."""
    data = bytearray(encode(noise(), "PNG"))
    at = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    mutate(data, at, length)
    return bytes(data)


def flip(data: bytearray, index: int) -> None:
    data[index] ^= 0xFF


def cut(data: bytearray, index: int) -> None:
    del data[index:]


def patched(fmt: str, offset_of: Callable[[bytes], int], fields: bytes) -> bytes:
    """A tiny valid image whose header declares a different (huge) size."""
    data = bytearray(encode(Image.new("RGB", (16, 16)), fmt))
    at = offset_of(bytes(data))
    data[at : at + len(fields)] = fields
    return bytes(data)


def truncated(fmt: str, keep: float = 0.6, **params: Any) -> bytes:
    data = encode(noise(), fmt, **params)
    return data[: int(len(data) * keep)]


def seeded_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- allow-list and accepted formats ----------------------------------------------------------

ALLOWED = [
    ("jpeg", "JPEG", "image/jpeg"),
    ("png", "PNG", "image/png"),
    ("webp", "WEBP", "image/webp"),
    ("bmp", "BMP", "image/bmp"),
    ("tiff", "TIFF", "image/tiff"),
    ("gif", "GIF", "image/gif"),
]


@pytest.mark.parametrize(("name", "pil_format", "mime"), ALLOWED)
def test_allowed_formats_are_sniffed_and_accepted(name: str, pil_format: str, mime: str) -> None:
    data = encode(noise((64, 48)), pil_format)
    assert sniff_format(data) == name
    assert inspect_image(data, max_pixels=LIMIT) == ImageInfo(name, mime, 64, 48)
    rgb = load_rgb(data, max_pixels=LIMIT)
    assert (rgb.mode, rgb.size) == ("RGB", (64, 48))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!DOCTYPE html><html><body>hi</body></html>",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
        b"\xc5\xd0\xd3\xc6" + bytes(40),
        b"%PDF-1.7\n",
        b"BMW is a car, not a bitmap header",
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
    ],
    ids=["empty", "html", "eps", "eps-binary", "pdf", "bm-text", "riff-wave"],
)
def test_sniff_refuses_non_images(data: bytes) -> None:
    assert sniff_format(data) is None


# -- rejections --------------------------------------------------------------------------------

SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)

REJECTIONS: list[tuple[str, Callable[[], bytes], str, int]] = [
    ("zero-bytes", lambda: b"", "empty_file", 422),
    ("random-bytes", lambda: seeded_bytes(4096), "unsupported_media_type", 415),
    (
        "html-named-png",
        lambda: b"<!DOCTYPE html><title>x.png</title>",
        "unsupported_media_type",
        415,
    ),
    ("eps", lambda: EPS, "unsupported_media_type", 415),
    (
        "pdf",
        lambda: b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
        "unsupported_media_type",
        415,
    ),
    ("svg", lambda: SVG, "unsupported_media_type", 415),
    ("ico", lambda: encode(noise((32, 32)), "ICO"), "unsupported_media_type", 415),
    ("ppm", lambda: encode(noise(), "PPM"), "unsupported_media_type", 415),
    ("png-magic-then-eps", lambda: b"\x89PNG\r\n\x1a\n" + EPS, "corrupt_image", 422),
    (
        "png-magic-then-random",
        lambda: b"\x89PNG\r\n\x1a\n" + seeded_bytes(512),
        "corrupt_image",
        422,
    ),
    ("jpeg-magic-then-random", lambda: b"\xff\xd8\xff" + seeded_bytes(512), "corrupt_image", 422),
    ("png-bad-ihdr-crc", lambda: png_with(lambda d, _a, _n: flip(d, 29)), "corrupt_image", 422),
    (
        "png-bad-idat-crc",
        lambda: png_with(lambda d, a, n: flip(d, a + 4 + n)),
        "corrupt_image",
        422,
    ),
    (
        "png-damaged-idat",
        lambda: png_with(lambda d, a, n: flip(d, a + 4 + n // 2)),
        "corrupt_image",
        422,
    ),
    (
        "png-cut-idat",
        lambda: png_with(lambda d, a, n: cut(d, a + 4 + n // 2)),
        "corrupt_image",
        422,
    ),
    ("png-no-iend", lambda: encode(noise(), "PNG")[:-12], "corrupt_image", 422),
    ("jpeg-truncated", lambda: truncated("JPEG"), "corrupt_image", 422),
    ("png-truncated", lambda: truncated("PNG"), "corrupt_image", 422),
    ("webp-truncated", lambda: truncated("WEBP"), "corrupt_image", 422),
    ("bmp-truncated", lambda: truncated("BMP"), "corrupt_image", 422),
    ("tiff-truncated", lambda: truncated("TIFF"), "corrupt_image", 422),
    ("gif-truncated", lambda: truncated("GIF"), "corrupt_image", 422),
    ("png-bomb-20000x20000", lambda: blank_png(20_000, 20_000), "image_too_large", 413),
    ("png-bomb-3kb-20000x20000", lambda: blank_png(20_000, 20_000, 1000), "image_too_large", 413),
    ("png-over-limit-10000x6000", lambda: blank_png(10_000, 6_000), "image_too_large", 413),
    (
        "gif-declares-65535x65535",
        lambda: patched("GIF", lambda _d: 6, struct.pack("<HH", 65535, 65535)),
        "image_too_large",
        413,
    ),
    (
        "bmp-declares-30000x30000",
        lambda: patched("BMP", lambda _d: 18, struct.pack("<ii", 30000, 30000)),
        "image_too_large",
        413,
    ),
    (
        "jpeg-declares-60000x60000",
        lambda: patched(
            "JPEG", lambda d: d.find(b"\xff\xc0") + 5, struct.pack(">HH", 60000, 60000)
        ),
        "image_too_large",
        413,
    ),
    (
        "webp-declares-16383x16383",
        lambda: patched(
            "WEBP", lambda d: d.find(b"\x9d\x01\x2a") + 3, struct.pack("<HH", 16383, 16383)
        ),
        "image_too_large",
        413,
    ),
]


@pytest.mark.parametrize(
    ("make", "code", "status"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_rejections(make: Callable[[], bytes], code: str, status: int) -> None:
    data = make()
    for call in (
        lambda: inspect_image(data, max_pixels=LIMIT),
        lambda: load_rgb(data, max_pixels=LIMIT),
        lambda: load_rgb(data, max_pixels=LIMIT, draft_size=224),
    ):
        with pytest.raises(ImageRejected) as caught:
            call()
        assert (caught.value.code, caught.value.status) == (code, status)
        assert caught.value.message and str(caught.value) == caught.value.message
        assert "Traceback" not in caught.value.message


def test_png_bomb_is_small_and_names_the_sizes() -> None:
    for bomb, max_size in (
        (blank_png(20_000, 20_000), 64 * 1024),
        (blank_png(20_000, 20_000, 1000), 4096),
    ):
        assert len(bomb) < max_size
        with pytest.raises(ImageRejected) as caught:
            inspect_image(bomb, max_pixels=LIMIT)
        assert "400000000 pixels exceeds the limit of 50000000" in caught.value.message


def test_over_limit_message_gives_dimensions() -> None:
    with pytest.raises(ImageRejected) as caught:
        inspect_image(blank_png(10_000, 6_000), max_pixels=LIMIT)
    assert caught.value.message == (
        "The image size of 60000000 pixels (10000x6000) exceeds the limit of 50000000 pixels."
    )


def test_limit_is_checked_before_decoding() -> None:
    data = png_with(lambda d, a, n: flip(d, a + 4 + n // 2))  # damaged pixels, 64x48 header
    with pytest.raises(ImageRejected) as caught:
        inspect_image(data, max_pixels=64 * 48 - 1)
    assert caught.value.code == "image_too_large"
    assert inspect_image(blank_png(64, 48), max_pixels=64 * 48).width == 64


def test_limit_above_pillows_own_limit_is_honoured_quietly() -> None:
    # 100 M pixels: above Pillow's warning threshold, below our configured limit
    info = inspect_image(blank_png(10_000, 10_000), max_pixels=120_000_000)
    assert (info.width, info.height) == (10_000, 10_000)


def test_truncated_real_photo(photo: bytes) -> None:
    with pytest.raises(ImageRejected) as caught:
        inspect_image(photo[: len(photo) // 2], max_pixels=LIMIT)
    assert (caught.value.code, caught.value.status) == ("corrupt_image", 422)


def test_invalid_arguments_are_programming_errors() -> None:
    data = encode(noise(), "PNG")
    with pytest.raises(ValueError):
        inspect_image(data, max_pixels=0)
    with pytest.raises(ValueError):
        load_rgb(data, max_pixels=LIMIT, draft_size=0)


def test_image_rejected_survives_pickling() -> None:
    exc = ImageRejected("corrupt_image", "broken", 422)
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.code, copy.message, copy.status, str(copy)) == (
        "corrupt_image",
        "broken",
        422,
        "broken",
    )


@pytest.mark.parametrize(("name", "pil_format", "mime"), ALLOWED)
def test_mutated_files_never_raise_raw_exceptions(name: str, pil_format: str, mime: str) -> None:
    original = encode(noise((32, 24)), pil_format)
    rng = random.Random(name)
    for _ in range(40):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(1, len(data)) :]
        for call in (inspect_image, load_rgb):
            try:
                call(bytes(data), max_pixels=LIMIT)
            except ImageRejected as exc:
                assert exc.status in (413, 415, 422)


def test_concurrent_calls_leave_warning_filters_intact() -> None:
    before = list(warnings.filters)
    soft_bomb = blank_png(10_000, 10_000)  # Pillow itself would warn about this one
    good = encode(noise(), "JPEG")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                with pytest.raises(ImageRejected):
                    inspect_image(soft_bomb, max_pixels=LIMIT)
                assert load_rgb(good, max_pixels=LIMIT).size == (64, 48)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert warnings.filters == before


# -- EXIF orientation --------------------------------------------------------------------------

# Where the stored top-left (red) and top-right (green) corners are displayed, per EXIF 2.3:
# 1 normal, 2 mirrored, 3 rotated 180, 4 flipped, 5 transposed, 6 rotated 90 CW,
# 7 transversed, 8 rotated 90 CCW.
ORIENTATIONS = {
    1: ("TL", "TR"),
    2: ("TR", "TL"),
    3: ("BR", "BL"),
    4: ("BL", "BR"),
    5: ("TL", "BL"),
    6: ("TR", "BR"),
    7: ("BR", "TR"),
    8: ("BL", "TL"),
}


def marked(width: int = 60, height: int = 40) -> Image.Image:
    """Blue, with a red block in the stored top-left and a green one in the top-right."""
    block = min(width, height) // 3
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, block, block))
    img.paste(GREEN, (width - block, 0, width, block))
    return img


def oriented(img: Image.Image, fmt: str, orientation: int, **params: Any) -> bytes:
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif, **params)


def corner_colours(img: Image.Image) -> dict[str, str]:
    """Dominant channel (red/green/blue) near each displayed corner."""
    w, h = img.size
    points = {"TL": (4, 4), "TR": (w - 5, 4), "BL": (4, h - 5), "BR": (w - 5, h - 5)}
    names = ("red", "green", "blue")
    out = {}
    for corner, xy in points.items():
        pixel = img.getpixel(xy)
        assert isinstance(pixel, tuple)
        out[corner] = names[max(range(3), key=lambda i: pixel[i])]
    return out


def expected_corners(orientation: int) -> dict[str, str]:
    red, green = ORIENTATIONS[orientation]
    corners = ("TL", "TR", "BL", "BR")
    return {c: "red" if c == red else "green" if c == green else "blue" for c in corners}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg(orientation: int) -> None:
    data = oriented(marked(), "JPEG", orientation, quality=95)
    size = (40, 60) if orientation >= 5 else (60, 40)
    info = inspect_image(data, max_pixels=LIMIT)
    assert (info.width, info.height) == size
    rgb = load_rgb(data, max_pixels=LIMIT)
    assert rgb.size == size
    assert corner_colours(rgb) == expected_corners(orientation)


@pytest.mark.parametrize(
    ("fmt", "params"), [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})]
)
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_other_formats(fmt: str, params: dict[str, Any], orientation: int) -> None:
    data = oriented(marked(), fmt, orientation, **params)
    size = (40, 60) if orientation >= 5 else (60, 40)
    assert (
        inspect_image(data, max_pixels=LIMIT).width,
        inspect_image(data, max_pixels=LIMIT).height,
    ) == size
    rgb = load_rgb(data, max_pixels=LIMIT)
    assert rgb.size == size
    assert corner_colours(rgb) == expected_corners(orientation)


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00garbage that is not a TIFF header",
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06",
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00\x00\x00",
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x00\x00\x00\x00",
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x02\x00\x02\x00\x00\x006\x00\x00\x00",
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",
    ],
    ids=[
        "not-tiff",
        "cut-ifd",
        "orientation-9",
        "orientation-0",
        "orientation-text",
        "ifd-out-of-range",
    ],
)
def test_corrupt_exif_counts_as_orientation_1(exif: bytes) -> None:
    data = encode(marked(), "JPEG", exif=exif, quality=95)
    info = inspect_image(data, max_pixels=LIMIT)
    assert (info.width, info.height) == (60, 40)
    assert corner_colours(load_rgb(data, max_pixels=LIMIT)) == expected_corners(1)


# -- mode normalization ------------------------------------------------------------------------


def with_pixels(mode: str, pixels: list[Any], size: tuple[int, int] = (4, 2)) -> Image.Image:
    img = Image.new(mode, size, pixels[-1])
    for x, value in enumerate(pixels):
        img.putpixel((x, 0), value)
    return img


def palette_with_transparency() -> Image.Image:
    img = with_pixels("P", [0, 1, 1])
    img.putpalette([0, 0, 0, 255, 0, 0])  # index 0 black (transparent), index 1 red
    return img


MODES: list[tuple[str, Callable[[], bytes], str, list[RGB], int]] = [
    (
        "cmyk-tiff",
        lambda: encode(
            with_pixels("CMYK", [(0, 255, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)]), "TIFF"
        ),
        "CMYK",
        [RED, BLACK, WHITE],
        0,
    ),
    (
        "cmyk-jpeg",
        lambda: encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
        "CMYK",
        [RED],
        8,
    ),
    (
        "p-transparency-png",
        lambda: encode(palette_with_transparency(), "PNG", transparency=0),
        "P",
        [WHITE, RED],
        0,
    ),
    (
        "p-transparency-gif",
        lambda: encode(palette_with_transparency(), "GIF", transparency=0),
        "P",
        [WHITE, RED],
        0,
    ),
    (
        "la-png",
        lambda: encode(with_pixels("LA", [(0, 0), (0, 255), (0, 128)]), "PNG"),
        "LA",
        [WHITE, BLACK, (127, 127, 127)],
        1,
    ),
    (
        "rgba-png",
        lambda: encode(
            with_pixels("RGBA", [(0, 0, 255, 0), (0, 0, 255, 255), (255, 0, 0, 128)]), "PNG"
        ),
        "RGBA",
        [WHITE, BLUE, (255, 127, 127)],
        1,
    ),
    (
        "rgba-webp",
        lambda: encode(
            with_pixels("RGBA", [(0, 0, 255, 0), (0, 0, 255, 255), (255, 0, 0, 128)]),
            "WEBP",
            lossless=True,
        ),
        "RGBA",
        [WHITE, BLUE, (255, 127, 127)],
        1,
    ),
    (
        "i16-png",
        lambda: encode(with_pixels("I;16", [32768, 0, 65535, 257]), "PNG"),
        "I;16",
        [(128,) * 3, BLACK, WHITE, (1, 1, 1)],
        0,
    ),
    (
        "i16-tiff",
        lambda: encode(with_pixels("I;16", [32768, 0, 65535]), "TIFF"),
        "I;16",
        [(128,) * 3, BLACK, WHITE],
        0,
    ),
    (
        "i16b-tiff",
        lambda: encode(with_pixels("I;16B", [32768, 0, 65535]), "TIFF"),
        "I;16B",
        [(128,) * 3, BLACK, WHITE],
        0,
    ),
    (
        "i32-16bit-values",
        lambda: encode(with_pixels("I", [32768, 0, 65535]), "TIFF"),
        "I",
        [(128,) * 3, BLACK, WHITE],
        0,
    ),
    (
        "i32-8bit-values",
        lambda: encode(with_pixels("I", [100, 0, 255]), "TIFF"),
        "I",
        [(100,) * 3, BLACK, WHITE],
        0,
    ),
    (
        "i32-wide-range",
        lambda: encode(with_pixels("I", [0, -100_000, 100_000]), "TIFF"),
        "I",
        [(128,) * 3, BLACK, WHITE],
        0,
    ),
    (
        "float-unit",
        lambda: encode(with_pixels("F", [0.5, 0.0, 1.0]), "TIFF"),
        "F",
        [(128,) * 3, BLACK, WHITE],
        0,
    ),
    ("1-bit-png", lambda: encode(with_pixels("1", [0, 1]), "PNG"), "1", [BLACK, WHITE], 0),
    ("1-bit-bmp", lambda: encode(with_pixels("1", [0, 1]), "BMP"), "1", [BLACK, WHITE], 0),
    (
        "l-png",
        lambda: encode(with_pixels("L", [100, 0, 255]), "PNG"),
        "L",
        [(100,) * 3, BLACK, WHITE],
        0,
    ),
    (
        "lab-tiff",
        lambda: encode(Image.new("LAB", (4, 4), (128, 128, 128)), "TIFF"),
        "LAB",
        [(119,) * 3],
        2,
    ),
    (
        "ycbcr-tiff",
        lambda: encode(Image.new("RGB", (4, 4), RED).convert("YCbCr"), "TIFF"),
        "YCbCr",
        [RED],
        3,
    ),
]


@pytest.mark.parametrize(
    ("make", "source_mode", "expected", "tolerance"),
    [case[1:] for case in MODES],
    ids=[case[0] for case in MODES],
)
def test_modes_normalize_to_rgb(
    make: Callable[[], bytes], source_mode: str, expected: list[RGB], tolerance: int
) -> None:
    data = make()
    assert Image.open(io.BytesIO(data)).mode == source_mode  # the case exercises that mode
    rgb = load_rgb(data, max_pixels=LIMIT)
    assert rgb.mode == "RGB"
    for x, want in enumerate(expected):
        got = rgb.getpixel((x, 0))
        assert isinstance(got, tuple)
        assert all(abs(g - w) <= tolerance for g, w in zip(got, want, strict=True)), (x, got, want)


@pytest.mark.parametrize(
    ("mode", "value", "want"),
    [
        ("HSV", (0, 255, 255), RED),
        ("YCbCr", BLUE, BLUE),
        ("PA", (1, 0), WHITE),
        ("PA", (1, 255), BLACK),
    ],
)
def test_other_modes_convert(mode: str, value: Any, want: RGB) -> None:
    """Modes no allowed file format produces directly, through the converter itself."""
    if mode == "YCbCr":
        img = Image.new("RGB", (2, 2), value).convert("YCbCr")
    else:
        img = Image.new(mode, (2, 2), value)
    if mode == "PA":
        img.putpalette([255, 0, 0, 0, 0, 0])
    got = imaging._to_rgb(img).getpixel((0, 0))
    assert isinstance(got, tuple)
    assert all(abs(g - w) <= 3 for g, w in zip(got, want, strict=True)), got


# -- the real photo and draft decoding ---------------------------------------------------------


def test_real_photo_round_trip(photo_path: Path, photo: bytes) -> None:
    with Image.open(photo_path) as reference:
        displayed = ImageOps.exif_transpose(reference).size
    info = inspect_image(photo, max_pixels=LIMIT)
    assert (info.format, info.mime) == ("jpeg", "image/jpeg")
    assert (info.width, info.height) == displayed
    rgb = load_rgb(photo, max_pixels=LIMIT)
    assert (rgb.mode, rgb.size) == ("RGB", displayed)


def test_draft_size_on_real_photo(photo: bytes) -> None:
    full = load_rgb(photo, max_pixels=LIMIT).size
    for draft in (224, 112):
        size = load_rgb(photo, max_pixels=LIMIT, draft_size=draft).size
        assert min(size) >= draft
        assert size[0] <= full[0] and size[1] <= full[1]
    # a power-of-two reduction needs a shorter side of at least 2 x draft_size
    halved = load_rgb(photo, max_pixels=LIMIT, draft_size=min(full) // 2).size
    assert halved == ((full[0] + 1) // 2, (full[1] + 1) // 2)


@pytest.mark.parametrize(
    ("size", "draft", "expected"),
    [
        ((1600, 1200), 224, (400, 300)),  # 1200 // 224 = 5 -> scale 1/4
        ((1000, 460), 224, (500, 230)),  # 460 // 224 = 2 -> scale 1/2
        ((4000, 3000), 224, (500, 375)),  # capped at 1/8
        ((300, 200), 224, (300, 200)),  # already smaller than the target: untouched
    ],
)
def test_draft_size_reduces_jpeg(
    size: tuple[int, int], draft: int, expected: tuple[int, int]
) -> None:
    gradient = Image.linear_gradient("L").resize(size).convert("RGB")
    data = encode(gradient, "JPEG")
    rgb = load_rgb(data, max_pixels=LIMIT, draft_size=draft)
    assert (rgb.mode, rgb.size) == ("RGB", expected)


def test_draft_size_applies_before_orientation() -> None:
    data = oriented(marked(1600, 1000), "JPEG", 6, quality=95)
    rgb = load_rgb(data, max_pixels=LIMIT, draft_size=224)
    assert rgb.size == (250, 400)  # 1000 // 224 = 4 -> 400x250 stored, rotated for display
    assert corner_colours(rgb) == expected_corners(6)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_decode_upload_reports_full_displayed_size_of_drafted_image(orientation: int) -> None:
    data = oriented(marked(1600, 1000), "JPEG", orientation, quality=95)
    info, rgb = decode_upload(data, max_pixels=LIMIT, draft_size=224)
    assert info == inspect_image(data, max_pixels=LIMIT)
    assert (info.width, info.height) == ((1000, 1600) if orientation >= 5 else (1600, 1000))
    assert rgb.size == ((250, 400) if orientation >= 5 else (400, 250))
    assert corner_colours(rgb) == expected_corners(orientation)


def test_draft_size_ignored_for_other_formats() -> None:
    data = encode(noise((600, 500)), "PNG")
    assert load_rgb(data, max_pixels=LIMIT, draft_size=224).size == (600, 500)
