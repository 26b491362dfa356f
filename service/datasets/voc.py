"""Pascal VOC: one XML per image, corners in 1-based inclusive pixels.

Reading maps ``(xmin, ymin, xmax, ymax)`` to ``x = xmin - 1, y = ymin - 1, width = xmax - xmin +
1, height = ymax - ymin + 1`` (so ``1..W`` covers the whole image); writing does the inverse.
A box with ``xmax <= xmin`` or ``ymax <= ymin`` is reported as ``zero_area``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

from service.datasets.files import FileIndex
from service.datasets.items import ExportItem, SourceBox, SourceItem
from service.datasets.writer import Writer, num

_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def read_voc(index: FileIndex, files: list[Path] | None = None) -> Iterator[SourceItem]:
    """One item per VOC XML file (other XML files are skipped)."""
    for xml in files or index.with_suffix(".xml"):
        rel = _rel(index, xml)
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as exc:
            item = SourceItem(file=rel, image_ref=rel)
            item.problem("parse_error", f"not readable XML: {exc}")
            yield item
            continue
        if root.tag != "annotation":
            continue
        ref = (root.findtext("filename") or "").strip() or \
            Path((root.findtext("path") or "").replace("\\", "/")).name or f"{xml.stem}.jpg"
        item = SourceItem(file=rel, image_ref=ref, declared_size=_size(root))
        path, why = index.resolve(ref, near=xml.parent)
        if path is None:
            path, why2 = index.resolve(ref, near=xml.parent.parent / "JPEGImages")
            why = why or why2
        item.image_path = path
        if why:
            item.problem("ambiguous_image", why)
        item.boxes = []
        for i, obj in enumerate(root.findall("object")):
            box = _object(item, i, obj)
            if box is not None:
                item.boxes.append(box)
        yield item


def _rel(index: FileIndex, path: Path) -> str:
    try:
        return index.rel(path.resolve())
    except ValueError:
        return path.name


def _size(root: ET.Element) -> tuple[int, int] | None:
    try:
        w, h = (int(float(root.findtext(f"size/{k}") or 0)) for k in ("width", "height"))
    except ValueError:
        return None
    return (w, h) if w > 0 and h > 0 else None


def _object(item: SourceItem, i: int, obj: ET.Element) -> SourceBox | None:
    name = (obj.findtext("name") or "").strip()
    bnd = obj.find("bndbox")
    if bnd is None:
        item.problem("parse_error", "the object has no <bndbox>", obj=i)
        return None
    try:
        xmin, ymin, xmax, ymax = (float(bnd.findtext(k) or "nan") for k in _CORNERS)
    except ValueError:
        item.problem("parse_error", "a <bndbox> corner is not a number", obj=i)
        return None
    if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
        item.problem("not_finite", "the <bndbox> lacks a corner or holds a non-number", obj=i)
        return None
    if xmax <= xmin or ymax <= ymin:
        item.problem("zero_area", f"the box has no area: xmin={num(xmin)} xmax={num(xmax)} "
                     f"ymin={num(ymin)} ymax={num(ymax)}", obj=i)
        return None
    return SourceBox(i, name, xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1)


def voc_xml(item: ExportItem, folder: str) -> bytes:
    """The VOC XML of one exported image (polygons are not part of VOC: boxes only)."""
    lines = ["<annotation>", f"  <folder>{escape(folder)}</folder>",
             f"  <filename>{escape(item.name)}</filename>",
             f"  <size><width>{item.width}</width><height>{item.height}</height>"
             "<depth>3</depth></size>", "  <segmented>0</segmented>"]
    if item.predicted:
        lines.append(f"  <prelabel_source>suggestion</prelabel_source>"
                     f"<prelabel_model_version>{item.model_version}</prelabel_model_version>")
    for box in item.boxes or []:
        xmin, ymin = box["x"] + 1, box["y"] + 1
        xmax, ymax = box["x"] + box["width"], box["y"] + box["height"]
        score = (f"<score>{box['confidence']:.6g}</score>" if "confidence" in box else "")
        lines.append(
            f"  <object><name>{escape(box['label'])}</name><pose>Unspecified</pose>"
            f"<truncated>0</truncated><difficult>0</difficult>{score}<bndbox>"
            f"<xmin>{num(xmin)}</xmin><ymin>{num(ymin)}</ymin><xmax>{num(xmax)}</xmax>"
            f"<ymax>{num(ymax)}</ymax></bndbox></object>")
    lines.append("</annotation>\n")
    return "\n".join(lines).encode()


class VocWriter(Writer):
    """``JPEGImages/``, ``Annotations/`` and ``ImageSets/Main/{split}.txt`` (detection only)."""

    image_dir = "JPEGImages"

    def image_path(self, item: ExportItem) -> str:
        return f"JPEGImages/{item.name}"

    def label(self, item: ExportItem) -> None:
        stem = Path(item.name).stem
        self.out.add_bytes(f"Annotations/{stem}.xml", voc_xml(item, "JPEGImages"))
        if item.split:
            self.out.spool(f"ImageSets/Main/{item.split}.txt").write(f"{stem}\n".encode())
