"""Labels drawn on the stored pixels of EXIF-rotated JPEGs are moved into the displayed frame;
an empty multilabel label survives COCO and Label Studio round trips (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from service.storage import sha256_hex
from tests.conftest import Api
from tests.test_api import make_project, upload
from tests.test_datasets_api import do_import, export, labels_by_sha, zip_of

RAW = (120, 60)  # stored pixels: width x height
BOX = (10, 5, 30, 20)  # the red object in the stored frame: x, y, width, height


def rotated(orientation: int, mark: int = 0) -> bytes:
    """A JPEG with a red rectangle at ``BOX`` of its stored pixels and an EXIF orientation."""
    img = Image.new("RGB", RAW, (128, 128, 128))
    x, y, w, h = BOX
    img.paste((230, 10, 10), (x, y, x + w, y + h))
    img.putpixel((RAW[0] - 1, RAW[1] - 1), (mark, 0, orientation))  # distinct bytes
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def red_extent(data: bytes) -> tuple[float, float, float, float]:
    """Where the red pixels are in the displayed image: x, y, width, height."""
    pixels = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    ys, xs = np.nonzero((pixels[..., 0] > 170) & (pixels[..., 1] < 90))
    return xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()


def test_raw_frame_labels_of_rotated_jpegs_are_corrected(api: Api) -> None:
    x, y, w, h = BOX
    polygon = [x, y, x + w, y, x + w, y + h]  # a triangle over the object, raw frame
    files = {o: rotated(o) for o in range(1, 9)}
    coco: dict[str, Any] = {"categories": [{"id": 1, "name": "red"}], "images": [],
                            "annotations": []}
    for o in files:
        coco["images"].append({"id": o, "file_name": f"o{o}.jpg", "width": RAW[0],
                               "height": RAW[1]})
        coco["annotations"] += [
            {"id": 10 * o, "image_id": o, "category_id": 1, "bbox": list(BOX)},
            {"id": 10 * o + 1, "image_id": o, "category_id": 1, "segmentation": [polygon],
             "bbox": list(BOX)}]
    # a size that matches neither frame is still refused
    files[9] = rotated(6, mark=200)
    coco["images"].append({"id": 9, "file_name": "o9.jpg", "width": 100, "height": 60})
    coco["annotations"].append({"id": 90, "image_id": 9, "category_id": 1, "bbox": list(BOX)})
    members = {f"o{o}.jpg": data for o, data in files.items()}
    members["coco.json"] = json.dumps(coco).encode()
    pid = make_project(api, task="detection", classes=("red",))["id"]
    report = do_import(api, pid, zip_of(members), "coco")["report"]
    corrected = {p["image"]: p for p in report["problems"] if p["code"] == "frame_corrected"}
    assert set(corrected) == {"o5.jpg", "o6.jpg", "o7.jpg", "o8.jpg"}
    assert all(p["level"] == "warning" and "orientation" in p["message"]
               for p in corrected.values())
    assert [p["image"] for p in report["problems"] if p["code"] == "size_mismatch"] == ["o9.jpg"]
    assert report["objects"]["rejected"] == 0
    labels = labels_by_sha(api, pid)
    for o in range(5, 9):
        label = labels[sha256_hex(files[o])]
        assert label["size"] == (RAW[1], RAW[0])  # displayed: turned by 90 degrees
        box, tri = label["boxes"]
        want = red_extent(files[o])
        got = (box["x"], box["y"], box["width"], box["height"])
        assert got == pytest.approx(want, abs=1.01), (o, got, want)
        xs, ys = [p[0] for p in tri["polygon"]], [p[1] for p in tri["polygon"]]
        assert (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)) == \
            pytest.approx(got), o
    # orientations 1-4 keep their size: the labels are taken as they are (displayed frame)
    assert labels[sha256_hex(files[1])]["boxes"][0]["x"] == x


def test_every_orientation_maps_points_like_exif_transpose() -> None:
    from service.datasets.frames import to_displayed

    width, height = 7, 4
    raw = np.arange(width * height, dtype=np.uint8).reshape(height, width)
    for o in range(1, 9):
        img = Image.fromarray(raw)
        exif = img.getexif()
        exif[0x0112] = o
        buf = io.BytesIO()
        img.save(buf, "PNG", exif=exif)
        shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
        for py in range(height):
            for px in range(width):  # the pixel's centre lands on the same value
                dx, dy = to_displayed(px + 0.5, py + 0.5, o, width, height)
                assert shown[int(dy), int(dx)] == raw[py, px], (o, px, py)


@pytest.mark.parametrize("fmt", ["coco", "labelstudio"])
def test_empty_multilabel_label_round_trip(api: Api, fmt: str) -> None:
    from tests.images import jpeg

    pid = make_project(api, task="multilabel", classes=("a", "b"))["id"]
    files = [(f"{i}.jpg", jpeg(color=(10 * i, 50, 90))) for i in range(4)]
    ids = [i["id"] for i in upload(api, pid, files).json()["images"]]
    for iid, tags in zip(ids, (["a", "b"], [], ["a"]), strict=False):  # the 4th: unlabeled
        r = api.post(f"/api/v1/images/{iid}/annotations", role="annotator", json={"tags": tags})
        assert r.status_code == 201, r.text
    original = labels_by_sha(api, pid)
    assert original[sha256_hex(files[1][1])]["tags"] == [] and len(original) == 3
    archive = export(api, pid, fmt)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        if fmt == "coco":
            images = json.loads(zf.read("annotations.json"))["images"]
            assert [i["file_name"] for i in images if i.get("prelabel_empty")] == ["1.jpg"]
        else:
            tasks = json.loads(zf.read("tasks.json"))
            assert [t["data"]["image"] for t in tasks
                    if t["annotations"][0]["result"] == []] == ["images/1.jpg"]
    other = make_project(api, task="multilabel", classes=())["id"]
    report = do_import(api, other, archive, fmt)["report"]
    assert report["problems_total"] == 0 and report["labels"]["created"] == 3
    assert {s: lab["tags"] for s, lab in labels_by_sha(api, other).items()} == \
        {s: lab["tags"] for s, lab in original.items()}
