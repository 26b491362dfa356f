"""Lost messages, unreachable dependencies, first start: nothing lost, no 500."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.db import session_scope
from service.settings import Settings
from service.tables import TrainingRun
from tests.conftest import (
    REDIS_URL,
    Api,
    WorkerProcess,
    env_for,
    flush_redis,
    make_api,
    settings_values,
)
from tests.images import card_crops
from tests.test_api import assert_error, upload
from tests.test_end_to_end import label, wait_run


@pytest.mark.slow
def test_broker_wiped_with_jobs_queued(tmp_path: Path, cache_dir: Path, postgres_url: str) -> None:
    """Redis loses every message: the reconciler re-sends the run and the embeddings."""
    flush_redis()
    values = settings_values(tmp_path, postgres_url, cache_dir, broker_url=REDIS_URL)
    gen = make_api(values)
    api = next(gen)
    worker = None
    try:
        pid = api.post("/api/v1/projects", json={"name": "w", "task": "multiclass",
                                                 "classes": ["ace", "king"]}).json()["id"]
        crops = [c for c in card_crops("train", per_class=6) if c.labels[0] in ("ace", "king")]
        ids = [i["id"] for i in upload(api, pid, [(c.name, c.data) for c in crops])
               .json()["images"]]
        for iid, c in zip(ids, crops, strict=True):  # 6 per class: one run queued
            label(api, iid, list(c.labels))
        runs = api.get(f"/api/v1/projects/{pid}/training-runs").json()
        assert len(runs) == 1 and runs[0]["status"] == "QUEUED"
        with session_scope(values["database_url"]) as s:
            sent_before = s.get(TrainingRun, runs[0]["id"]).enqueued_at  # type: ignore[union-attr]
        flush_redis()  # the broker forgets the run and the embedding jobs
        worker = WorkerProcess(values)
        run = wait_run(api, pid, worker, timeout=120)
        assert run["status"] == "SUCCEEDED", (run, worker.tail())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if api.get(f"/api/v1/projects/{pid}/stats").json()["embedded"] == len(ids):
                break
            time.sleep(0.5)
        assert api.get(f"/api/v1/projects/{pid}/stats").json()["embedded"] == len(ids)
        with session_scope(values["database_url"]) as s:
            resent = s.get(TrainingRun, runs[0]["id"]).enqueued_at  # type: ignore[union-attr]
        assert sent_before is not None and resent is not None and resent > sent_before
    finally:
        if worker is not None:
            worker.stop()
        gen.close()


def test_database_down_is_503(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:9/x")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        r = client.get("/api/v1/projects", headers={"Authorization": "Bearer pl_whatever"})
        assert_error(r, 503, "database_unavailable")
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"].startswith("error")
        assert client.get("/healthz").status_code == 200


def test_missing_blob_is_503(api: Api) -> None:
    pid = api.post("/api/v1/projects", json={"name": "b", "task": "multiclass",
                                             "classes": ["a", "b"]}).json()["id"]
    crop = card_crops("train", per_class=1)[0]
    iid = upload(api, pid, [(crop.name, crop.data)]).json()["images"][0]["id"]
    for path in api.settings.blob_dir.rglob("*"):
        if path.is_file():
            path.unlink()
    assert_error(api.get(f"/api/v1/images/{iid}/file"), 503, "storage_unavailable")


def test_first_start_creates_admin_key_once(tmp_path: Path, sqlite_url: str,
                                            cache_dir: Path) -> None:
    env = env_for(settings_values(tmp_path, sqlite_url, cache_dir))
    cmd = [sys.executable, "-m", "service.cli", "migrate"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    key = first.stderr.split("keep it): ", 1)[1].split()[0]
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "admin API key" not in second.stderr
    settings = Settings(**settings_values(tmp_path, sqlite_url, cache_dir))
    with TestClient(create_app(settings)) as client:
        r = client.post("/api/v1/projects", headers={"Authorization": f"Bearer {key}"},
                        json={"name": "x", "task": "multilabel", "classes": ["a"]})
        assert r.status_code == 201, r.text


def test_reconciler_resends_a_waiting_image_once_per_requeue_interval(api: Api) -> None:
    from service.queue import JobQueue
    from workers.reconcile import reconcile_once

    p = api.post("/api/v1/projects", json={"name": "p", "task": "multiclass",
                                           "classes": ["a"]}).json()
    upload(api, p["id"], [(s.name, s.data) for s in card_crops("test", per_class=1)[:2]])
    settings = api.settings.model_copy(update={"requeue_after_seconds": 1})
    queue, sessions = JobQueue(settings), api.client.app.state.ctx.sessions  # type: ignore[attr-defined]
    resent: dict[int, float] = {}
    assert reconcile_once(sessions, queue, settings, resent)["embeddings"] == 0  # still new
    time.sleep(1.2)
    # no worker runs, so both images stay unembedded (as behind a long training run)
    assert reconcile_once(sessions, queue, settings, resent)["embeddings"] == 2
    assert reconcile_once(sessions, queue, settings, resent)["embeddings"] == 0  # just sent
    assert reconcile_once(sessions, queue, settings)["embeddings"] == 2  # without memory
    time.sleep(1.2)
    assert reconcile_once(sessions, queue, settings, resent)["embeddings"] == 2
