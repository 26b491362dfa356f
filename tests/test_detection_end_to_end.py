"""Detection pre-labeling end to end: box labels through the API, the policy, a real Celery
worker training FCOS on the CPU, precomputed box suggestions and their quality on unseen
BCCD photos (measured with the COCO evaluator)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage

from models.detection_data import load_voc_image, read_voc
from models.detection_eval import detection_metrics
from models.detection_types import Detections
from service.simulate.compare import iou as box_iou
from tests.conftest import Api, WorkerProcess, backend_values, worker_stack
from tests.models.cards import CARDS
from tests.test_api import upload
from tests.test_detection_api import BCCD, bccd_image, post_boxes, voc_boxes
from tests.test_end_to_end import wait_run
from workers.detection import Target

pytestmark = pytest.mark.slow

CLASSES = ("RBC", "WBC", "Platelets")
N_TRAIN, N_TEST = 36, 16
# Measured on 2 busy CPU cores (36 labeled BCCD images, 29 trained on, a 10-epoch cap and no
# time budget, one training thread, 266 s): mAP@.5 of the suggestions on the 16 unseen test
# photos 0.56 (held-out 0.45). Under a 150 s budget it had been 0.49 on one machine and 0.2986
# on a busier one: the epoch cap makes the run the same everywhere. A floor with margin; the
# detector's quality at real budgets is in benchmarks/detection.py.
MAP50_FLOOR = 0.3


def split(name: str, n: int) -> list[str]:
    return (BCCD / "ImageSets" / "Main" / f"{name}.txt").read_text().split()[:n]


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, cache_dir: Path) -> Iterator[
        tuple[Api, WorkerProcess]]:
    # one automatic run: with the default retrain floor a second run was queued whenever the
    # first had started before the last 10 labels arrived (a busy machine), and it published
    # a second model
    values = backend_values(request, "embedded", tmp_path, cache_dir,
                            min_labels_per_class_detection=12, detection_train_seconds=0,
                            detection_max_epochs=10, worker_concurrency=1,
                            retrain_after_new_labels=1000)
    yield from worker_stack(values)


def as_detections(item: dict[str, Any]) -> Detections:
    boxes = item["boxes"]
    return Detections(
        np.asarray([[b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]] for b in boxes],
                   np.float32).reshape(-1, 4),
        np.asarray([b["confidence"] for b in boxes], np.float32),
        np.asarray([CLASSES.index(b["label"]) for b in boxes], np.int64))


def as_target(name: str) -> Target:
    boxes = [b for b in voc_boxes(name) if b["width"] > 0 and b["height"] > 0]
    return Target(np.asarray([[b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]]
                              for b in boxes], np.float32).reshape(-1, 4),
                  np.asarray([CLASSES.index(b["label"]) for b in boxes], np.int64))


def test_detection_core_loop(stack: tuple[Api, WorkerProcess]) -> None:
    api, worker = stack
    pid = api.post("/api/v1/projects", json={"name": "cells", "task": "detection",
                                             "classes": list(CLASSES)}).json()["id"]
    train, test = split("train", N_TRAIN), split("test", N_TEST)
    body = upload(api, pid, [(n, bccd_image(n)) for n in train + test]).json()
    assert body["errors"] == []
    ids = {n: i["id"] for n, i in zip(train + test, body["images"], strict=True)}
    for name in train:  # the policy queues a run once every class is in 12 labeled images
        boxes = [b for b in voc_boxes(name) if b["width"] > 0 and b["height"] > 0]
        assert post_boxes(api, ids[name], boxes).status_code == 201
    run = wait_run(api, pid, worker, timeout=900)
    assert run["status"] == "SUCCEEDED", (run, worker.tail())
    assert run["trigger"] == "auto" and run["device"] == "cpu"

    (model,) = api.get(f"/api/v1/projects/{pid}/models").json()
    metrics = model["metrics"]
    assert model["promoted"] and metrics["task"] == "detection"
    assert metrics["n_images"] > 0 and metrics["map50"] is not None
    assert set(metrics["per_class"]) == set(CLASSES)
    assert metrics["training"]["device"] == "cpu" and metrics["training"]["history"]
    crop = metrics["training"]["box_classifier"]  # the crop stage decided on the held-out images
    assert isinstance(crop["used"], bool) and "validation mAP@.5" in crop["reason"]

    # the worker precomputed suggestions for every unlabeled image; none is "served" yet
    stats = api.get(f"/api/v1/projects/{pid}/stats").json()
    assert stats["acceptance"][0]["suggestions_served"] == 0
    items = api.post(f"/api/v1/projects/{pid}/suggestions", role="annotator",
                     params={"include_low": "true"},
                     json={"image_ids": [ids[n] for n in test]}).json()["items"]
    for item in items:
        assert (item["width"], item["height"]) == (640, 480) and item["tags"] == []
        for b in item["boxes"]:
            assert b["label"] in CLASSES and 0 <= b["confidence"] <= 1
            assert b["x"] >= 0 and b["y"] >= 0 and b["width"] > 0 and b["height"] > 0
            assert b["x"] + b["width"] <= 640.01 and b["y"] + b["height"] <= 480.01
    result = detection_metrics([as_detections(i) for i in items],
                               [as_target(n) for n in test], list(CLASSES))
    print(f"suggestions on {len(test)} unseen photos: mAP@.5 {result['map50']:.3f}, "
          f"mAP {result['map']:.3f}; validation {metrics['map50']:.3f}")
    assert result["map50"] >= MAP50_FLOOR, result
    stats = api.get(f"/api/v1/projects/{pid}/stats").json()
    assert stats["acceptance"][0]["suggestions_served"] == len(test)
    # the worker scores every unlabeled image after the run, those served first included
    deadline = time.monotonic() + 300
    while stats["scored"] < stats["unlabeled"] and time.monotonic() < deadline:
        time.sleep(0.5)
        stats = api.get(f"/api/v1/projects/{pid}/stats").json()
    assert stats["scored"] == stats["unlabeled"] == len(test), (stats, worker.tail())

    # by default only boxes over their class threshold; include_low adds the flagged rest
    one = api.get(f"/api/v1/images/{ids[test[0]]}/suggestions", role="annotator").json()
    low = items[0]
    assert one["suggestion_id"] == low["suggestion_id"]
    assert one["boxes"] == [b for b in low["boxes"] if not b["below_threshold"]]
    thresholds = dict(zip(model["classes"], model["thresholds"], strict=True))
    # no two BCCD labels of different classes overlap by more than IoU 0.19: the rule's floor
    assert metrics["cross_class_iou"] == 0.5
    suggested: list[dict] = []
    for b in low["boxes"]:  # highest confidence first
        if b["confidence"] < thresholds[b["label"]]:
            assert b["below_threshold"]
            continue
        # over its threshold, a box is held back only as a second name of a suggested one
        second_name = any(s["label"] != b["label"] and box_iou(s, b) >= 0.5 for s in suggested)
        assert b["below_threshold"] == second_name
        if not second_name:
            suggested.append(b)

    # ad-hoc predict of the same bytes agrees with the stored suggestion
    adhoc = api.post(f"/api/v1/projects/{pid}/predict", role="annotator",
                     files={"file": ("x.jpg", bccd_image(test[0]), "image/jpeg")}).json()
    assert adhoc["suggestion_id"] is None and (adhoc["width"], adhoc["height"]) == (640, 480)
    assert [b["label"] for b in adhoc["boxes"]] == [b["label"] for b in one["boxes"]]
    for a, b in zip(adhoc["boxes"], one["boxes"], strict=True):
        assert abs(a["x"] - b["x"]) < 0.5 and abs(a["confidence"] - b["confidence"]) < 1e-3

    # an annotator accepts the suggested boxes as they are
    accepted = [{k: b[k] for k in ("label", "x", "y", "width", "height")} for b in one["boxes"]]
    r = post_boxes(api, ids[test[0]], accepted, source="suggestion_accepted",
                   suggestion_id=one["suggestion_id"])
    assert r.status_code == 201, r.text
    acc = api.get(f"/api/v1/projects/{pid}/stats").json()["acceptance"][0]
    assert acc["accepted"] == 1


def test_degenerate_detection_labels_fail_with_a_reason(
        stack: tuple[Api, WorkerProcess]) -> None:
    api, worker = stack
    pid = api.post("/api/v1/projects", json={"name": "empty", "task": "detection",
                                             "classes": list(CLASSES)}).json()["id"]
    names = split("val", 3)
    body = upload(api, pid, [(n, bccd_image(n)) for n in names]).json()
    for image in body["images"]:  # "nothing here" on every image: no box to learn from
        assert post_boxes(api, image["id"], []).status_code == 201
    r = api.post(f"/api/v1/projects/{pid}/training-runs", role="operator")
    assert r.status_code == 201, r.text
    run = wait_run(api, pid, worker, timeout=120)
    assert run["status"] == "FAILED" and run["error_code"] == "degenerate_labels", run
    assert "no labeled image has a box" in run["error"]
    assert api.get(f"/api/v1/projects/{pid}/models").json() == []


CARD_CLASSES = ("ace", "king", "queen", "jack", "ten", "nine")
# Cards through the worker (60 labeled photos, 48 trained on): the crop stage is what tells the
# ranks apart. Under a 150 s budget: held-out mAP@.5 0.35 -> 0.45 with it, suggestions on the 20
# unseen test photos 0.65, and 0.400 -> 0.402 on a busier machine. Now an 8-epoch cap and no
# time budget (the same run on any machine): held-out 0.30 -> 0.38 (600 training views, 54 s),
# suggestions 0.549, the whole test 267 s beside two other tests. A floor with margin.
CARDS_SUGGESTION_MAP50_FLOOR = 0.3


def card_photos(split: str, n: int, every: int = 1) -> list[tuple[str, bytes,
                                                                  list[dict[str, Any]]]]:
    """``n`` card photos (every ``every``-th by name) as PNG, decoded in the frame their VOC
    boxes refer to, with those boxes as API boxes."""
    out = []
    for xml in sorted((CARDS / split).glob("*.xml"))[::every][:n]:
        annotation = read_voc(xml, CARD_CLASSES)
        buf = io.BytesIO()
        PILImage.fromarray(load_voc_image(annotation)).save(buf, format="PNG")
        boxes = [{"label": CARD_CLASSES[c], "x": float(b[0]), "y": float(b[1]),
                  "width": float(b[2] - b[0]), "height": float(b[3] - b[1])}
                 for b, c in zip(annotation.boxes, annotation.labels, strict=True)]
        out.append((xml.stem + ".png", buf.getvalue(), boxes))
    return out


@pytest.fixture
def card_stack(request: pytest.FixtureRequest, tmp_path: Path, cache_dir: Path) -> Iterator[
        tuple[Api, WorkerProcess]]:
    values = backend_values(request, "embedded", tmp_path, cache_dir,
                            min_labels_per_class_detection=1000,  # runs are started by hand
                            # keep the stage whatever 12 held-out images say (their verdict
                            # is noisy: +0.10 in one run, +0.002 in another), so the worker's
                            # export and the API's serving of it are always what is tested
                            detection_crop_min_gain=-1.0,
                            detection_train_seconds=0, detection_max_epochs=8,
                            worker_concurrency=1)
    yield from worker_stack(values)


def test_crop_stage_serves_card_ranks(card_stack: tuple[Api, WorkerProcess]) -> None:
    """The worker trains the crop stage, keeps it on held-out evidence, exports it inside the
    detector graph, and the API serves its classes (stored and ad hoc alike)."""
    api, worker = card_stack
    pid = api.post("/api/v1/projects", json={"name": "cards", "task": "detection",
                                             "classes": list(CARD_CLASSES)}).json()["id"]
    # every 4th train photo from the sorted list: all six ranks, few near-duplicates
    train = card_photos("train", 60, every=4)
    test = card_photos("test", 20)
    ids = []
    photos = train + test
    for start in range(0, len(photos), 16):  # PNGs: keep each request under the body limit
        body = upload(api, pid, [(n, d) for n, d, _ in photos[start:start + 16]]).json()
        assert body["errors"] == [], body
        ids += [i["id"] for i in body["images"]]
    for (_, _, boxes), iid in zip(train, ids, strict=False):
        assert post_boxes(api, iid, boxes).status_code == 201
    assert api.post(f"/api/v1/projects/{pid}/training-runs", role="operator").status_code == 201
    run = wait_run(api, pid, worker, timeout=900)
    assert run["status"] == "SUCCEEDED", (run, worker.tail())

    (model,) = api.get(f"/api/v1/projects/{pid}/models").json()
    crop = model["metrics"]["training"]["box_classifier"]
    print("crop stage through the worker:", crop)
    assert crop["used"] is True and "validation mAP@.5" in crop["reason"], crop

    test_ids = ids[len(train):]
    items = api.post(f"/api/v1/projects/{pid}/suggestions", role="annotator",
                     params={"include_low": "true"}, json={"image_ids": test_ids}).json()["items"]
    targets = [Target(np.asarray([[b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]]
                                  for b in boxes], np.float32),
                      np.asarray([CARD_CLASSES.index(b["label"]) for b in boxes], np.int64))
               for _, _, boxes in test]
    predictions = [Detections(
        np.asarray([[b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]]
                    for b in i["boxes"]], np.float32).reshape(-1, 4),
        np.asarray([b["confidence"] for b in i["boxes"]], np.float32),
        np.asarray([CARD_CLASSES.index(b["label"]) for b in i["boxes"]], np.int64))
        for i in items]
    result = detection_metrics(predictions, targets, list(CARD_CLASSES))
    print(f"card suggestions on {len(test)} unseen photos: mAP@.5 {result['map50']:.3f}")
    assert result["map50"] >= CARDS_SUGGESTION_MAP50_FLOOR, result

    # the same bytes through /predict (the graph runs in the request) give the stored answer
    name, data, _ = test[0]
    adhoc = api.post(f"/api/v1/projects/{pid}/predict", role="annotator",
                     params={"include_low": "true"},
                     files={"file": (name, data, "image/png")}).json()
    stored = items[0]["boxes"]
    assert [b["label"] for b in adhoc["boxes"]] == [b["label"] for b in stored]
    for a, b in zip(adhoc["boxes"], stored, strict=True):
        assert abs(a["x"] - b["x"]) < 0.5 and abs(a["confidence"] - b["confidence"]) < 1e-3
