"""Validation of box annotations in the displayed (EXIF-corrected) pixel frame.

Pure functions, shared by the API and by importers: a rejected object names its index, a
stable code and the reason, so callers can answer 422 or write an import report.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

CLIP_TOLERANCE = 1.0  # px: boxes this far outside the image are clipped, further is an error
MAX_POLYGON_POINTS = 1000


class BoxRejected(ValueError):
    """One object of a label is invalid (``index`` in the list, stable ``code``, ``reason``)."""

    def __init__(self, index: int, code: str, reason: str) -> None:
        super().__init__(f"box {index}: {reason}")
        self.index, self.code, self.reason = index, code, reason


def clean_boxes(boxes: Sequence[Mapping[str, Any]], *, width: int, height: int,
                classes: Collection[str], max_boxes: int) -> list[dict[str, Any]]:
    """Checked, clipped copies of ``{label, x, y, width, height, polygon?}`` objects.

    A polygon's bounding box is the object's box (what the detector trains on); a box given
    with it must agree within :data:`CLIP_TOLERANCE`. Raises :class:`BoxRejected`.
    """
    if len(boxes) > max_boxes:
        raise BoxRejected(max_boxes, "too_many_boxes",
                          f"at most {max_boxes} objects per image, got {len(boxes)}")
    return [_clean_one(i, box, width, height, classes) for i, box in enumerate(boxes)]


def _clean_one(index: int, box: Mapping[str, Any], width: int, height: int,
               classes: Collection[str]) -> dict[str, Any]:
    label = box.get("label")
    if label not in classes:
        raise BoxRejected(index, "unknown_class", f"unknown class {label!r}")
    values = [box.get(k) for k in ("x", "y", "width", "height")]
    if not all(_finite(v) for v in values):
        raise BoxRejected(index, "not_finite", "x, y, width and height must be finite numbers")
    x, y, w, h = (float(v) for v in values)  # type: ignore[arg-type]
    if w <= 0 or h <= 0:
        raise BoxRejected(index, "zero_area",
                          f"width and height must be positive, got {w:g} x {h:g}")
    x0, y0, x1, y1 = _clip(index, (x, y, x + w, y + h), width, height)
    out: dict[str, Any] = {"label": label}
    polygon = box.get("polygon")
    if polygon is not None:
        points = _clean_polygon(index, polygon, width, height)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        px0, py0, px1, py1 = min(xs), min(ys), max(xs), max(ys)
        if px1 <= px0 or py1 <= py0:
            raise BoxRejected(index, "zero_area", "the polygon encloses no area")
        if max(abs(px0 - x0), abs(py0 - y0), abs(px1 - x1), abs(py1 - y1)) > CLIP_TOLERANCE:
            raise BoxRejected(index, "box_polygon_mismatch",
                              "the box must be the polygon's bounding box (within "
                              f"{CLIP_TOLERANCE:g} px); the polygon spans x {px0:g}..{px1:g}, "
                              f"y {py0:g}..{py1:g}")
        x0, y0, x1, y1 = px0, py0, px1, py1
        out["polygon"] = [[round(px, 3), round(py, 3)] for px, py in points]
    out.update(x=round(x0, 3), y=round(y0, 3), width=round(x1 - x0, 3),
               height=round(y1 - y0, 3))
    return out


def _clip(index: int, xyxy: tuple[float, float, float, float], width: int,
          height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = xyxy
    tol = CLIP_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise BoxRejected(index, "outside_image",
                          f"the box spans x {x0:g}..{x1:g}, y {y0:g}..{y1:g}, outside the "
                          f"{width}x{height} image (more than {tol:g} px)")
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 <= x0 or y1 <= y0:
        raise BoxRejected(index, "zero_area", "the box has no area inside the image")
    return x0, y0, x1, y1


def _clean_polygon(index: int, polygon: Any, width: int,
                   height: int) -> list[tuple[float, float]]:
    if not isinstance(polygon, Sequence) or not 3 <= len(polygon) <= MAX_POLYGON_POINTS:
        raise BoxRejected(index, "bad_polygon",
                          f"a polygon is a list of 3 to {MAX_POLYGON_POINTS} [x, y] points")
    points = []
    for point in polygon:
        if (not isinstance(point, Sequence) or len(point) != 2
                or not all(_finite(v) for v in point)):
            raise BoxRejected(index, "bad_polygon", "polygon points are [x, y] finite numbers")
        px, py = float(point[0]), float(point[1])
        if not (-CLIP_TOLERANCE <= px <= width + CLIP_TOLERANCE
                and -CLIP_TOLERANCE <= py <= height + CLIP_TOLERANCE):
            raise BoxRejected(index, "outside_image",
                              f"polygon point ({px:g}, {py:g}) is outside the {width}x{height} "
                              "image")
        points.append((min(max(px, 0.0), float(width)), min(max(py, 0.0), float(height))))
    return points


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
