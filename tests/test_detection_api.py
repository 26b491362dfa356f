"""Detection projects through the API: box labels, their validation and the policy counts."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageOps

from tests.conftest import DATASETS, Api, make_api, settings_values
from tests.images import exif_rotated_jpeg
from tests.test_api import assert_error, make_project, upload

BCCD = DATASETS / "bccd"


def bccd_image(name: str) -> bytes:
    return (BCCD / "JPEGImages" / f"{name}.jpg").read_bytes()


def voc_boxes(name: str) -> list[dict[str, Any]]:
    """The VOC objects of a BCCD image as API boxes (zero-area ones included, on purpose)."""
    root = ET.parse(BCCD / "Annotations" / f"{name}.xml").getroot()
    out = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        assert b is not None
        x0, y0, x1, y1 = (float(b.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        out.append({"label": obj.findtext("name"), "x": x0, "y": y0, "width": x1 - x0,
                    "height": y1 - y0})
    return out


@pytest.fixture
def bccd_project(api: Api) -> tuple[int, int]:
    p = make_project(api, task="detection", classes=("RBC", "WBC", "Platelets"))
    r = upload(api, p["id"], [("338.jpg", bccd_image("BloodImage_00338"))]).json()
    image = r["images"][0]
    assert (image["width"], image["height"]) == (640, 480)
    return p["id"], image["id"]


def post_boxes(api: Api, iid: int, boxes: Any, **extra: Any) -> Any:
    return api.post(f"/api/v1/images/{iid}/annotations", role="annotator",
                    json={"boxes": boxes, **extra})


def test_real_voc_label_with_a_zero_area_box_is_rejected_by_index(
        api: Api, bccd_project: tuple[int, int]) -> None:
    _, iid = bccd_project
    boxes = voc_boxes("BloodImage_00338")
    bad = [i for i, b in enumerate(boxes) if b["width"] <= 0 or b["height"] <= 0]
    assert len(bad) == 1  # the dataset's known defect
    r = post_boxes(api, iid, boxes)
    assert_error(r, 422, "invalid_box")
    err = r.json()["error"]
    assert err["details"] == {"index": bad[0], "reason": "zero_area"}
    assert f"box {bad[0]}" in err["message"] and "positive" in err["message"]
    # nothing was stored; without the bad box the label is accepted as it is
    assert api.get(f"/api/v1/images/{iid}/annotations").json()["latest"] is None
    good = [b for i, b in enumerate(boxes) if i != bad[0]]
    r = post_boxes(api, iid, good)
    assert r.status_code == 201, r.text
    stored = r.json()
    assert [{k: b[k] for k in ("label", "x", "y", "width", "height")}
            for b in stored["boxes"]] == good
    assert stored["tags"] == sorted({b["label"] for b in good})


BOX = {"label": "RBC", "x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0}


@pytest.mark.parametrize("change, reason", [
    ({"label": "Neutrophil"}, "unknown_class"),
    ({"width": 0.0}, "zero_area"),
    ({"height": -5.0}, "zero_area"),
    ({"x": -1.5}, "outside_image"),
    ({"x": 620.0, "width": 22.0}, "outside_image"),
    ({"y": 470.0, "height": 11.5}, "outside_image"),
    ({"x": 640.5, "width": 0.4}, "zero_area"),  # within tolerance but nothing inside
    ({"polygon": [[10, 20], [40, 20]]}, "bad_polygon"),
    ({"polygon": [[10, 20], [40, 20], [40, 999]]}, "outside_image"),
    ({"polygon": [[10, 20], [25, 30], [20, 60]]}, "box_polygon_mismatch"),
    ({"polygon": [[10, 20], [40, 20], [40, 20]]}, "zero_area"),
])
def test_invalid_box_cases(api: Api, bccd_project: tuple[int, int], change: dict[str, Any],
                           reason: str) -> None:
    _, iid = bccd_project
    boxes = [BOX, {**BOX, **change}]
    r = post_boxes(api, iid, boxes)
    assert_error(r, 422, "invalid_box")
    assert r.json()["error"]["details"]["index"] == 1
    assert r.json()["error"]["details"]["reason"] == reason


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected(api: Api, bccd_project: tuple[int, int],
                                         literal: str) -> None:
    _, iid = bccd_project
    body = json.dumps({"boxes": [BOX]}).replace("30.0", literal)
    r = api.client.post(f"/api/v1/images/{iid}/annotations", content=body,
                        headers={**api.h("annotator"), "Content-Type": "application/json"})
    assert_error(r, 422, "invalid_box")
    assert r.json()["error"]["details"] == {"index": 0, "reason": "not_finite"}


def test_clipping_polygons_and_negatives(api: Api, bccd_project: tuple[int, int]) -> None:
    _, iid = bccd_project
    # within 1 px outside: clipped to the image
    r = post_boxes(api, iid, [{**BOX, "x": -0.75, "width": 10.75},
                              {**BOX, "x": 600.0, "width": 40.8, "y": 440.0, "height": 40.9}])
    assert r.status_code == 201, r.text
    a, b = r.json()["boxes"]
    assert (a["x"], a["width"]) == (0.0, 10.0)
    assert (b["x"] + b["width"], b["y"] + b["height"]) == (640.0, 480.0)
    # a polygon's bounding box is the object's box; it is stored and returned
    poly = [[10, 20], [40, 25], [38, 60], [12, 55]]
    r = post_boxes(api, iid, [{**BOX, "polygon": poly, "width": 30.4}])
    assert r.status_code == 201, r.text
    (box,) = r.json()["boxes"]
    assert box == {"label": "RBC", "x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0,
                   "polygon": poly}
    # an image with no objects is a valid label (a negative example)
    r = post_boxes(api, iid, [])
    assert r.status_code == 201 and r.json()["boxes"] == [] and r.json()["tags"] == []
    history = api.get(f"/api/v1/images/{iid}/annotations").json()["history"]
    assert [len(h["boxes"]) for h in history] == [0, 1, 2]


def test_label_kind_must_match_the_task(api: Api, bccd_project: tuple[int, int]) -> None:
    _, iid = bccd_project
    assert_error(api.post(f"/api/v1/images/{iid}/annotations", json={"tags": ["RBC"]}), 422,
                 "boxes_required")
    assert_error(api.post(f"/api/v1/images/{iid}/annotations", json={}), 422,
                 "boxes_required")


def test_too_many_boxes(tmp_path: Path, sqlite_url: str, cache_dir: Path) -> None:
    values = {**settings_values(tmp_path, sqlite_url, cache_dir), "max_boxes_per_image": 3}
    for api in make_api(values):
        check_box_limit(api)


def check_box_limit(api: Api) -> None:
    p = make_project(api, task="detection", classes=("RBC",))
    iid = upload(api, p["id"], [("x.jpg", bccd_image("BloodImage_00001"))]).json()[
        "images"][0]["id"]
    assert post_boxes(api, iid, [BOX] * 3).status_code == 201
    r = post_boxes(api, iid, [BOX] * 4)
    assert_error(r, 422, "invalid_box")
    assert r.json()["error"]["details"]["reason"] == "too_many_boxes"


def test_boxes_live_in_the_displayed_frame(api: Api) -> None:
    p = make_project(api, task="detection", classes=("thing",))
    data = exif_rotated_jpeg(6)  # stored 80x40, displayed 40x80
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (40, 80)
    image = upload(api, p["id"], [("r.jpg", data)]).json()["images"][0]
    assert (image["width"], image["height"]) == (40, 80)
    low = {"label": "thing", "x": 0, "y": 70, "width": 40, "height": 10}  # displayed frame only
    assert post_boxes(api, image["id"], [low]).status_code == 201
    wide = {"label": "thing", "x": 0, "y": 0, "width": 80, "height": 10}  # stored frame only
    r = post_boxes(api, image["id"], [wide])
    assert_error(r, 422, "invalid_box")
    assert r.json()["error"]["details"]["reason"] == "outside_image"


def test_detection_stats_count_images_per_class(api: Api) -> None:
    p = make_project(api, task="detection", classes=("RBC", "WBC", "Platelets"))
    names = ["BloodImage_00001", "BloodImage_00002", "BloodImage_00003"]
    ids = [i["id"] for i in upload(api, p["id"], [(n, bccd_image(n)) for n in names])
           .json()["images"]]
    for iid, name in zip(ids, names, strict=True):
        assert post_boxes(api, iid, voc_boxes(name)).status_code == 201
    stats = api.get(f"/api/v1/projects/{p['id']}/stats").json()
    expected = {c: sum(any(b["label"] == c for b in voc_boxes(n)) for n in names)
                for c in ("RBC", "WBC", "Platelets")}
    assert {c["name"]: c["labeled_images"] for c in stats["classes"]} == expected
    assert stats["labeled"] == 3


def test_detection_budget_settings(tmp_path: Path) -> None:
    """Seconds 0 leaves the epoch cap in charge; a negative budget or a zero cap is refused."""
    from pydantic import ValidationError

    from service.settings import Settings
    from workers.detection import train_budget

    assert train_budget(Settings(data_dir=tmp_path)) == 900
    assert train_budget(Settings(data_dir=tmp_path, detection_train_seconds=0)) is None
    for bad in ({"detection_train_seconds": -1}, {"detection_max_epochs": 0}):
        with pytest.raises(ValidationError):
            Settings(data_dir=tmp_path, **bad)
