"""The card-crop helper reads boxes in whichever frame (raw or EXIF-rotated) the XML uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.models.cards import CLASSES, _parse, crops, load_split, open_displayed

_VOC = """<annotation><filename>{name}</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
<object><name>king</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>
<ymax>{y1}</ymax></bndbox></object></annotation>"""


def test_real_annotations_match_image_frames() -> None:
    items = load_split("train") + load_split("test")
    assert len(items) == 363
    labels = {box.label for item in items for box in item.boxes}
    assert labels == set(CLASSES)
    for item in items[::25]:
        assert crops(item)  # raises if the XML size matches neither frame


@pytest.mark.parametrize("frame", ["displayed", "raw"])
def test_exif_rotated_photo(tmp_path: Path, frame: str) -> None:
    item = load_split("train")[0]
    shown = open_displayed(item)  # a real photo, orientation 1
    width, height = shown.size
    box = item.boxes[0]
    expected = shown.crop((box.xmin - 1, box.ymin - 1, box.xmax, box.ymax))

    raw = shown.transpose(Image.Transpose.ROTATE_90)  # EXIF orientation 6 undoes this
    exif = Image.Exif()
    exif[0x0112] = 6
    raw.save(tmp_path / "photo.png", exif=exif)
    if frame == "displayed":
        size, corners = (width, height), (box.xmin, box.ymin, box.xmax, box.ymax)
    else:  # the same box in raw pixel coordinates (1-based inclusive corners)
        size = (height, width)
        corners = (box.ymin, width - box.xmax + 1, box.ymax, width - box.xmin + 1)
    xml = _VOC.format(name="photo.png", w=size[0], h=size[1], x0=corners[0], y0=corners[1],
                      x1=corners[2], y1=corners[3])  # fmt: skip
    (tmp_path / "photo.xml").write_text(xml)

    parsed = _parse(tmp_path / "photo.xml")
    assert open_displayed(parsed).size == (width, height)
    [(crop, label)] = crops(parsed)
    assert label == "king"
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected))
