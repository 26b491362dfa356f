"""EXIF orientation: labels drawn on the stored pixels, moved into the displayed frame.

Some tools label a JPEG in its stored (raw) pixel frame and ignore the EXIF orientation tag,
while prelabel's frame is the displayed one. ``to_displayed`` maps a point of the raw frame
(``width`` x ``height``) for each of the 8 orientations, as ``ImageOps.exif_transpose`` moves
the pixels.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)
_ORIENTATION_TAG = 0x0112
SWAPPED = frozenset({5, 6, 7, 8})  # the displayed frame is the raw one turned by 90 degrees


def orientation(path: Path) -> int:
    """The EXIF orientation of an image file (1 when absent or unreadable); reads the header."""
    try:
        with warnings.catch_warnings(), Image.open(path) as img:
            warnings.simplefilter("ignore")
            value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # not an image Pillow reads, or broken EXIF: no orientation
        log.debug("no EXIF orientation for %s", path, exc_info=True)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_displayed(x: float, y: float, orient: int, width: float,
                 height: float) -> tuple[float, float]:
    """A point of the raw frame (``width`` x ``height`` stored pixels) in the displayed one."""
    match orient:
        case 2:  # mirrored horizontally
            return width - x, y
        case 3:  # rotated 180
            return width - x, height - y
        case 4:  # mirrored vertically
            return x, height - y
        case 5:  # transposed (mirrored along the main diagonal)
            return y, x
        case 6:  # to be turned 90 degrees clockwise
            return height - y, x
        case 7:  # transversed (mirrored along the other diagonal)
            return height - y, width - x
        case 8:  # to be turned 90 degrees counter-clockwise
            return y, width - x
    return x, y


def box_to_displayed(box: dict[str, Any], orient: int, width: float,
                     height: float) -> dict[str, Any]:
    """A pixel box ``{x, y, width, height[, polygon]}`` of the raw frame in the displayed one."""
    x0, y0 = to_displayed(box["x"], box["y"], orient, width, height)
    x1, y1 = to_displayed(box["x"] + box["width"], box["y"] + box["height"], orient, width,
                          height)
    out = dict(box)
    out.update(x=min(x0, x1), y=min(y0, y1), width=abs(x1 - x0), height=abs(y1 - y0))
    if box.get("polygon") is not None:
        out["polygon"] = [list(to_displayed(px, py, orient, width, height))
                          for px, py in box["polygon"]]
    return out
