"""A run with many labels per class tries fine-tuning, and serves whichever model won."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.db import session_scope
from service.tables import Embedding, ModelVersion
from tests.conftest import WorkerProcess, make_api, settings_values
from tests.images import RANKS, card_crops
from tests.test_api import upload
from tests.test_end_to_end import label, wait_run
from workers.finetuning import WORKER_FINETUNE_MIN_LABELS

pytestmark = pytest.mark.slow


def test_finetune_tried_and_served(tmp_path: Path, sqlite_url: str, cache_dir: Path) -> None:
    # no automatic runs while labeling: one manual run sees every label
    values = settings_values(tmp_path, sqlite_url, cache_dir, min_labels_per_class=10_000)
    gen = make_api(values)
    api = next(gen)
    worker = WorkerProcess(values)
    try:
        pid = api.post("/api/v1/projects", json={"name": "ft", "task": "multiclass",
                                                 "classes": list(RANKS)}).json()["id"]
        crops = card_crops("train", per_class=WORKER_FINETUNE_MIN_LABELS + 3)
        extra = card_crops("test")[:20]
        ids = []
        for start in range(0, len(crops + extra), 64):
            batch = (crops + extra)[start:start + 64]
            ids += [i["id"] for i in upload(api, pid, [(c.name, c.data) for c in batch])
                    .json()["images"]]
        for iid, c in zip(ids[:len(crops)], crops, strict=True):
            label(api, iid, list(c.labels))
        assert api.post(f"/api/v1/projects/{pid}/training-runs", role="operator").status_code \
            == 201
        run = wait_run(api, pid, worker, timeout=900)
        assert run["status"] == "SUCCEEDED", (run, worker.tail())
        model = api.get(f"/api/v1/projects/{pid}/models").json()[0]
        report = model["metrics"]["finetune"]
        assert report["status"] == "tried", report
        assert report["hold_out_images"] > 0 and report["frozen_score"] is not None
        with session_scope(api.settings.db_url) as s:
            row = s.get(ModelVersion, model["id"])
            assert row is not None
            if report["kept"]:  # fine-tuned won on the held-out fold: it serves with its backbone
                assert model["kind"] == "finetuned" and row.backbone_key is not None
                assert report["finetuned_score"] > report["frozen_score"]
                assert "frozen_cross_validation" in model["metrics"]
                embedded = s.scalar(select(func.count()).select_from(Embedding).where(
                    Embedding.backbone == row.backbone))
                assert embedded == len(ids)  # the whole project, so suggestions stay fast
            else:
                assert model["kind"] == "frozen_linear" and row.backbone_key is None
        unlabeled = ids[len(crops):]
        # once the worker embedded them (the reconciler re-sends what the run overtook), their
        # suggestions are its stored ones, not computed in the request
        deadline = time.monotonic() + 120
        while api.get(f"/api/v1/projects/{pid}/stats").json()["embedded"] < len(ids) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        items = api.post(f"/api/v1/projects/{pid}/suggestions",
                         json={"image_ids": unlabeled}).json()["items"]
        floor = model["metrics"]["suggestion_floor"]["min_confidence"]
        assert len(items) == len(unlabeled)
        # the top class is suggested where the held-out predictions vouch for its confidence
        assert all(bool(i["tags"]) == (i["scores"][0]["confidence"] >= floor) for i in items)
        # with the views a frozen head's stored suggestions average over (none if fine-tuned)
        adhoc = api.post(f"/api/v1/projects/{pid}/predict", role="annotator",
                         params={"views": True},
                         files={"file": ("x.jpg", extra[0].data, "image/jpeg")}).json()
        for a, b in zip(adhoc["scores"], items[0]["scores"], strict=True):
            assert a["label"] == b["label"] and abs(a["confidence"] - b["confidence"]) < 1e-3
    finally:
        worker.stop()
        gen.close()
