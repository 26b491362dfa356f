"""Real-photo fixtures: playing-card crops and image tags from the Pascal VOC "cards" set."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
CARDS = DATASETS / "cards"
CLASSES: tuple[str, ...] = ("ace", "king", "nine", "jack", "queen", "ten")

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Box:
    """One VOC object: label and pixel corners in the annotation's frame."""

    label: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int


@dataclass(frozen=True)
class Annotated:
    """One image file with its VOC objects."""

    path: Path
    size: tuple[int, int]
    boxes: tuple[Box, ...]

    @property
    def labels(self) -> frozenset[str]:
        return frozenset(b.label for b in self.boxes)


def _parse(xml_path: Path) -> Annotated:
    root = ET.parse(xml_path).getroot()
    filename = root.findtext("filename") or ""
    image_path = xml_path.parent / filename
    if not image_path.exists():  # the XML may name a different extension case
        image_path = next(xml_path.parent.glob(f"{xml_path.stem}.*[gG]"))
    width = int(root.findtext("size/width") or 0)
    height = int(root.findtext("size/height") or 0)
    boxes = []
    for obj in root.findall("object"):
        bb = obj.find("bndbox")
        assert bb is not None, xml_path
        corners = [int(float(bb.findtext(k) or 0)) for k in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append(Box(obj.findtext("name") or "", *corners))
    return Annotated(image_path, (width, height), tuple(boxes))


def load_split(split: str) -> list[Annotated]:
    """All annotated images of ``cards/<split>``, sorted by file name."""
    return [_parse(p) for p in sorted((CARDS / split).glob("*.xml"))]


def _in_box_frame(item: Annotated) -> tuple[Image.Image, int]:
    """The RGB image in the frame the boxes refer to, and the EXIF orientation still to apply.

    VOC tools differ on whether boxes refer to the raw pixels or the EXIF-rotated view. When the
    annotated size matches only the raw size (a 90-degree orientation), the boxes are in the raw
    frame and each crop is rotated afterwards; otherwise they are in the displayed frame.
    """
    with Image.open(item.path) as raw:
        raw.load()
        orientation = int(raw.getexif().get(_EXIF_ORIENTATION, 1))
        displayed = ImageOps.exif_transpose(raw)
        if orientation in (5, 6, 7, 8) and item.size == raw.size != displayed.size:
            return raw.convert("RGB"), orientation
        if item.size != displayed.size:
            raise ValueError(f"{item.path}: annotated size {item.size} matches no image frame")
        return displayed.convert("RGB"), 1


def open_displayed(item: Annotated) -> Image.Image:
    """The whole image as displayed (EXIF-transposed), RGB."""
    with Image.open(item.path) as raw:
        raw.load()
        return ImageOps.exif_transpose(raw).convert("RGB")


def crops(item: Annotated) -> list[tuple[Image.Image, str]]:
    """One (RGB crop, label) per box, each crop in the displayed orientation."""
    image, pending = _in_box_frame(item)
    out = []
    for box in item.boxes:
        # VOC corners are 1-based inclusive pixels.
        region = (max(box.xmin - 1, 0), max(box.ymin - 1, 0), box.xmax, box.ymax)
        crop = image.crop(region)
        if pending != 1:
            crop = _rotate_like_exif(crop, pending)
        out.append((crop, box.label))
    return out


def _rotate_like_exif(img: Image.Image, orientation: int) -> Image.Image:
    method = {
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }[orientation]
    return img.transpose(method)
