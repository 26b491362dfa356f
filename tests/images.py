"""Test images: real photos from ../shared/datasets and a few generated ones."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from tests.conftest import DATASETS

CARDS = DATASETS / "cards"
RANKS = ("ace", "king", "queen", "jack", "ten", "nine")


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    labels: tuple[str, ...]


def _objects(xml: Path) -> list[tuple[str, tuple[int, int, int, int]]]:
    root = ET.parse(xml).getroot()
    out = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        assert box is not None
        coords = tuple(int(float(box.findtext(k) or 0)) for k in ("xmin", "ymin", "xmax", "ymax"))
        out.append((obj.findtext("name") or "", coords))
    return out  # type: ignore[return-value]


def card_crops(split: str, per_class: int | None = None) -> list[Sample]:
    """JPEG crops of the labeled cards (one rank each), in a stable order."""
    counts: dict[str, int] = {}
    out = []
    for xml in sorted((CARDS / split).glob("*.xml")):
        photo = xml.with_suffix(".JPG")
        if not photo.exists():
            continue
        with Image.open(photo) as raw:
            img = raw.convert("RGB")  # VOC boxes here are in the stored (unrotated) frame
        for n, (name, (x1, y1, x2, y2)) in enumerate(_objects(xml)):
            if name not in RANKS or x2 - x1 < 8 or y2 - y1 < 8:
                continue
            if per_class is not None and counts.get(name, 0) >= per_class:
                continue
            counts[name] = counts.get(name, 0) + 1
            buf = io.BytesIO()
            img.crop((x1, y1, x2, y2)).save(buf, "JPEG", quality=90)
            out.append(Sample(f"{xml.stem}_{n}.jpg", buf.getvalue(), (name,)))
    return out


def card_photos(split: str, limit: int | None = None) -> list[Sample]:
    """Whole card photos tagged with the set of ranks in them (multilabel)."""
    out = []
    for xml in sorted((CARDS / split).glob("*.xml"))[:limit]:
        photo = xml.with_suffix(".JPG")
        if photo.exists():
            ranks = tuple(sorted({n for n, _ in _objects(xml) if n in RANKS}))
            out.append(Sample(photo.name, photo.read_bytes(), ranks))
    return out


def jpeg(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small generated JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "JPEG")
    return buf.getvalue()


def exif_rotated_jpeg(orientation: int) -> bytes:
    """A 80x40 JPEG whose EXIF says to rotate it (displayed 40x80 for 5-8)."""
    img = Image.new("RGB", (80, 40), (10, 120, 10))
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))) is not None
    return buf.getvalue()
