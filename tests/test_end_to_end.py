"""The core loop on real photos with a real Celery worker process.

Label a few card crops per rank through the API, let the policy queue a run, let the worker
train, then check suggestions on crops the model never saw. Runs on the embedded default
(SQLite + filesystem broker) and on the scaled setup (PostgreSQL + Redis).
"""

from __future__ import annotations

import csv
import io
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from sqlalchemy import select

from models.views import PREDICTION_VIEWS, VIEWS
from service.db import session_scope
from service.tables import Embedding
from tests.conftest import (
    Api,
    WorkerProcess,
    backend_values,
    make_api,
    settings_values,
    worker_stack,
)
from tests.images import RANKS, card_crops, card_photos
from tests.test_api import upload

pytestmark = pytest.mark.slow

# Measured on this machine (see the closing notes): 5 labels per rank, 4 of them trained on
# after the hold-out split, reach ~0.80-0.90 top-1 on all 115 test crops. Floor with margin:
MULTICLASS_FLOOR = 0.55
# Whole photos tagged with the ranks they show: measured mAP ~0.6 with 40 labeled photos.
MULTILABEL_FLOOR = 0.35


@pytest.fixture(params=["embedded", "redis"])
def stack(request: pytest.FixtureRequest, tmp_path: Path, cache_dir: Path) -> Iterator[
        tuple[Api, WorkerProcess]]:
    """App + a real worker process: SQLite/filesystem broker or PostgreSQL/Redis."""
    values = backend_values(request, request.param, tmp_path, cache_dir)
    yield from worker_stack(values)


def wait_run(api: Api, pid: int, worker: WorkerProcess, timeout: float = 180) -> dict[str, Any]:
    """Wait for the project's newest run to end."""
    deadline = time.monotonic() + timeout
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        runs = api.get(f"/api/v1/projects/{pid}/training-runs").json()
        if runs and runs[0]["status"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return runs[0]
        time.sleep(0.3)
    raise AssertionError(f"run did not finish: {runs}\n{worker.tail()}")


def exported_suggestions(api: Api, pid: int) -> set[str]:
    """Images that a CSV export with suggestions lists as suggested."""
    r = api.get(f"/api/v1/projects/{pid}/export", params={
        "format": "csv", "labels": "with_suggestions", "images": "reference"})
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        rows = csv.DictReader(io.StringIO(archive.read("labels.csv").decode()))
        return {row["image"] for row in rows if row["source"] == "suggestion"}


def label(api: Api, image_id: int, tags: list[str], **extra: Any) -> dict[str, Any]:
    r = api.post(f"/api/v1/images/{image_id}/annotations", role="annotator",
                 json={"tags": tags, **extra})
    assert r.status_code == 201, r.text
    return r.json()


def view_counts(api: Api, image_ids: list[int]) -> dict[str, int]:
    """Stored view embeddings (``models.views``) of the images, per view."""
    with session_scope(api.settings.db_url) as s:
        keys = Counter(s.scalars(select(Embedding.backbone).where(
            Embedding.image_id.in_(image_ids))))
    return {k.rpartition("|")[2]: n for k, n in keys.items() if "|" in k}


def test_multiclass_core_loop(stack: tuple[Api, WorkerProcess]) -> None:
    api, worker = stack
    project = api.post("/api/v1/projects", json={"name": "cards", "task": "multiclass",
                                                 "classes": list(RANKS)}).json()
    pid = project["id"]
    train = card_crops("train", per_class=5)
    test = card_crops("test")
    ids: dict[str, int] = {}
    for start in range(0, len(train + test), 64):
        batch = (train + test)[start:start + 64]
        body = upload(api, pid, [(s.name, s.data) for s in batch]).json()
        assert body["errors"] == []
        ids.update({s.name: i["id"] for s, i in zip(batch, body["images"], strict=True)})

    for sample in train:  # the 30th label crosses the threshold: the policy queues a run
        label(api, ids[sample.name], list(sample.labels))
    run = wait_run(api, pid, worker)
    assert run["status"] == "SUCCEEDED", (run, worker.tail())
    assert run["trigger"] == "auto" and run["device"] == "cpu" and run["attempt"] == 1
    assert run["labels_seen"] == 30 and run["progress"] == 1.0

    models = api.get(f"/api/v1/projects/{pid}/models").json()
    assert len(models) == 1 and models[0]["promoted"] and models[0]["version"] == 1
    metrics = models[0]["metrics"]
    assert metrics["labeled_images"] == 30
    # the frozen head trained also on views of each labeled crop, embedded once and kept, and
    # its predictions average over four of them (embedded with every upload)
    assert models[0]["kind"] == "frozen_linear" and metrics["head_views"] == list(VIEWS)
    assert metrics["prediction_views"] == list(PREDICTION_VIEWS)
    assert view_counts(api, [ids[c.name] for c in train]) == {v: 30 for v in VIEWS}
    assert metrics["folds"] == 5 and metrics["n_images"] == 30
    assert set(metrics["per_class"]) == set(RANKS)
    # no precision target by default: every top class is suggested (tests/test_simulate.py
    # runs the worker with one)
    floor = metrics["suggestion_floor"]
    assert (floor["min_confidence"], floor["target_precision"], floor["coverage"],
            floor["support"]) == (0.0, 0.0, 1.0, 30), floor
    assert floor["precision"] == pytest.approx(metrics["accuracy"], abs=1e-4)

    # the worker stores a suggestion for every unlabeled image after the promotion: an export
    # with suggestions carries all of them although none has been served yet
    deadline = time.monotonic() + 90
    while len(suggested := exported_suggestions(api, pid)) < len(test) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(suggested) == len(test), worker.tail()
    assert api.get(f"/api/v1/projects/{pid}/stats").json()["acceptance"][0][
        "suggestions_served"] == 0

    # batch suggestions for crops the model never saw
    test_ids = [ids[s.name] for s in test]
    r = api.post(f"/api/v1/projects/{pid}/suggestions", role="annotator",
                 json={"image_ids": test_ids})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["image_id"] for i in items] == test_ids
    predicted = [i["scores"][0]["label"] for i in items]
    accuracy = np.mean([p == s.labels[0] for p, s in zip(predicted, test, strict=True)])
    print(f"multiclass accuracy on {len(test)} unseen crops: {accuracy:.3f}")
    assert accuracy >= MULTICLASS_FLOOR, accuracy
    for item in items:
        assert item["model_version"] == 1 and len(item["scores"]) == 6
        conf = [s["confidence"] for s in item["scores"]]
        assert conf == sorted(conf, reverse=True) and abs(sum(conf) - 1) < 1e-3
        assert item["tags"] == [{"label": item["scores"][0]["label"], "confidence": conf[0],
                                 "below_threshold": False}]

    # the single route answers the same suggestion (same id: served once per model)
    one = api.get(f"/api/v1/images/{test_ids[0]}/suggestions", role="annotator").json()
    assert one == items[0]
    # ad-hoc prediction of the same bytes with views=true runs the full ONNX pipeline on the
    # image and its prediction views and agrees with the stored suggestion (from cached view
    # embeddings); by default it reads the image alone, which gives other confidences
    adhoc = api.post(f"/api/v1/projects/{pid}/predict", role="annotator", params={"views": True},
                     files={"file": ("x.jpg", test[0].data, "image/jpeg")}).json()
    assert adhoc["suggestion_id"] is None
    assert (adhoc["width"], adhoc["height"]) == (one["width"], one["height"])
    for a, b in zip(adhoc["scores"], one["scores"], strict=True):
        assert a["label"] == b["label"] and abs(a["confidence"] - b["confidence"]) < 1e-3
    alone = api.post(f"/api/v1/projects/{pid}/predict", role="annotator",
                     files={"file": ("x.jpg", test[0].data, "image/jpeg")}).json()
    assert alone["model_version"] == 1 and len(alone["scores"]) == 6
    assert max(abs(a["confidence"] - {b["label"]: b["confidence"] for b in one["scores"]}[
        a["label"]]) for a in alone["scores"]) > 1e-3

    # accept one suggestion, correct another: acceptance statistics per model version
    label(api, test_ids[0], [items[0]["tags"][0]["label"]], source="suggestion_accepted",
          suggestion_id=items[0]["suggestion_id"])
    wrong = next(r for r in RANKS if r != items[1]["tags"][0]["label"])
    label(api, test_ids[1], [wrong], source="suggestion_corrected",
          suggestion_id=items[1]["suggestion_id"])
    stats = api.get(f"/api/v1/projects/{pid}/stats").json()
    acc = stats["acceptance"][0]
    assert (acc["model_version"], acc["accepted"], acc["corrected"]) == (1, 1, 1)
    # no run queued by these two labels: the worker embeds their views ahead of the next run
    deadline = time.monotonic() + 60
    while (views := view_counts(api, test_ids[:2])) != {v: 2 for v in VIEWS} and \
            time.monotonic() < deadline:
        time.sleep(0.3)
    assert views == {v: 2 for v in VIEWS}, worker.tail()
    assert acc["suggestions_served"] == len(test_ids) and acc["acceptance_rate"] == 0.5
    deadline = time.monotonic() + 120  # the worker embeds every upload in the background
    while stats["embedded"] < len(train) + len(test) and time.monotonic() < deadline:
        time.sleep(0.5)
        stats = api.get(f"/api/v1/projects/{pid}/stats").json()
    assert stats["embedded"] == len(train) + len(test), worker.tail()
    # each upload's prediction views came with its embedding (the two labeled since: all views)
    assert view_counts(api, test_ids[2:]) == {v: len(test) - 2 for v in PREDICTION_VIEWS}

    # uncertainty order: unlabeled images, least certain first, all scored by the model
    page = api.get(f"/api/v1/projects/{pid}/images", role="annotator",
                   params={"status": "unlabeled", "order": "uncertainty", "limit": 500}).json()
    u = [i["uncertainty"] for i in page["items"]]
    assert len(u) == len(test) - 2 and None not in u and u == sorted(u, reverse=True)

    # an operator retrains by hand; the new version is compared before promotion
    r = api.post(f"/api/v1/projects/{pid}/training-runs", role="operator")
    assert r.status_code == 201, r.text
    run2 = wait_run(api, pid, worker)
    assert run2["status"] == "SUCCEEDED", (run2, worker.tail())
    # promoted or not, every unlabeled image ends up scored by the promoted model (a new one
    # scores them right after its run ends)
    deadline = time.monotonic() + 60
    while (stats := api.get(f"/api/v1/projects/{pid}/stats").json())["scored"] < \
            stats["unlabeled"] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert stats["scored"] == stats["unlabeled"] == len(test) - 2, stats
    models = api.get(f"/api/v1/projects/{pid}/models").json()
    assert [m["version"] for m in models] == [2, 1]
    assert models[0]["promotion_note"]
    # rollback by promoting v1 again
    back = api.post(f"/api/v1/models/{models[1]['id']}/promote", role="operator").json()
    assert back["promoted"] is True
    promoted = [m["version"] for m in api.get(f"/api/v1/projects/{pid}/models").json()
                if m["promoted"]]
    assert promoted == [1]
    assert api.get(f"/api/v1/images/{test_ids[5]}/suggestions").json()["model_version"] == 1

    # degenerate labels (everything relabeled "ace"): the run fails, v1 keeps serving
    labeled = api.get(f"/api/v1/projects/{pid}/images", params={"status": "labeled",
                                                                 "limit": 500}).json()["items"]
    for image in labeled:
        label(api, image["id"], ["ace"])
    api.post(f"/api/v1/projects/{pid}/training-runs", role="operator")
    failed = wait_run(api, pid, worker)
    assert failed["status"] == "FAILED" and failed["error_code"] == "one_class", failed
    assert api.get(f"/api/v1/projects/{pid}").json()["promoted_model"]["version"] == 1
    assert api.get(f"/api/v1/images/{test_ids[6]}/suggestions").status_code == 200


def test_multilabel_and_degenerate_runs(tmp_path: Path, sqlite_url: str, cache_dir: Path) -> None:
    values = settings_values(tmp_path, sqlite_url, cache_dir)
    gen = make_api(values)
    api = next(gen)
    worker = WorkerProcess(values)
    try:
        # a multiclass project with one labeled class: the run fails with a reason
        p = api.post("/api/v1/projects", json={"name": "one", "task": "multiclass",
                                               "classes": ["ace", "king"]}).json()
        crops = card_crops("train", per_class=3)
        body = upload(api, p["id"], [(s.name, s.data) for s in crops
                                     if s.labels[0] == "ace"]).json()
        for i in body["images"]:
            label(api, i["id"], ["ace"])
        api.post(f"/api/v1/projects/{p['id']}/training-runs", role="operator")
        failed = wait_run(api, p["id"], worker)
        assert failed["status"] == "FAILED" and failed["error_code"] == "one_class", failed
        assert "king" not in failed["error"] and "ace" in failed["error"]
        assert api.get(f"/api/v1/projects/{p['id']}/models").json() == []

        # multilabel: whole photos tagged with the ranks they show
        ml = api.post("/api/v1/projects", json={"name": "ml", "task": "multilabel",
                                                "classes": list(RANKS)}).json()
        train, test = card_photos("train", limit=60), card_photos("test")
        ids: dict[str, int] = {}
        for start in range(0, len(train + test), 32):
            batch = (train + test)[start:start + 32]
            got = upload(api, ml["id"], [(s.name, s.data) for s in batch]).json()["images"]
            ids.update({s.name: i["id"] for s, i in zip(batch, got, strict=True)})
        for s in train:
            label(api, ids[s.name], list(s.labels))
        runs = api.get(f"/api/v1/projects/{ml['id']}/training-runs").json()
        if not runs or runs[0]["status"] in ("SUCCEEDED", "FAILED"):
            api.post(f"/api/v1/projects/{ml['id']}/training-runs", role="operator")
        run = wait_run(api, ml["id"], worker)
        assert run["status"] == "SUCCEEDED", (run, worker.tail())
        model = api.get(f"/api/v1/projects/{ml['id']}/models").json()[0]
        assert "map" in model["metrics"]
        items = api.post(f"/api/v1/projects/{ml['id']}/suggestions",
                         json={"image_ids": [ids[s.name] for s in test]}).json()["items"]
        y = np.array([[r in s.labels for r in RANKS] for s in test], dtype=int)
        scores = np.array([[{t["label"]: t["confidence"] for t in i["scores"]}[r] for r in RANKS]
                           for i in items])
        aps = [average_precision_score(y[:, c], scores[:, c]) for c in range(6) if y[:, c].any()]
        assert float(np.mean(aps)) >= MULTILABEL_FLOOR, aps
        # tags are exactly the classes at or above their thresholds
        for item in items:
            tagged = {t["label"] for t in item["tags"]}
            assert tagged <= {s["label"] for s in item["scores"]}
    finally:
        worker.stop()
        gen.close()
