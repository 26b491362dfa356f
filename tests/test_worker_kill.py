"""SIGKILL a training worker mid-run: the run is retried once and trained exactly once.

The worker consumes only the ``train`` queue, so the run itself must embed every labeled image
(several seconds on 2 cores): the kill lands while the run is RUNNING.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from service.db import session_scope
from service.tables import ModelVersion
from tests.conftest import Api, WorkerProcess, backend_values, make_api
from tests.images import RANKS, card_crops
from tests.test_api import upload
from tests.test_end_to_end import label, wait_run

pytestmark = pytest.mark.slow


def wait_running(api: Api, rid: int, attempt: int, worker: WorkerProcess,
                 timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.get(f"/api/v1/training-runs/{rid}").json()
        if run["status"] == "RUNNING" and run["attempt"] == attempt:
            return run
        assert run["status"] in ("QUEUED", "RUNNING"), (run, worker.tail())
        time.sleep(0.1)
    raise AssertionError(f"run {rid} never ran attempt {attempt}\n{worker.tail()}")


def lease_pid(api: Api, rid: int) -> int:
    from service.tables import TrainingRun

    with session_scope(api.settings.db_url) as session:
        owner = session.get(TrainingRun, rid).lease_owner  # type: ignore[union-attr]
    assert owner, "running run without a lease owner"
    return int(owner.rpartition(":")[2])


def versions_of(api: Api, rid: int) -> int:
    with session_scope(api.settings.db_url) as session:
        return session.scalar(select(func.count()).select_from(ModelVersion)
                              .where(ModelVersion.run_id == rid)) or 0


@pytest.mark.parametrize("broker", ["redis", "embedded"])
@pytest.mark.parametrize("kills", [1, 2])
def test_sigkill_mid_run(broker: str, kills: int, tmp_path: Path, cache_dir: Path,
                         request: pytest.FixtureRequest) -> None:
    # reliability, not model quality, is under test: skip fine-tuning to keep runs short
    values = backend_values(request, broker, tmp_path, cache_dir, finetune=False)
    gen = make_api(values)
    api = next(gen)
    worker = None
    try:
        pid = api.post("/api/v1/projects", json={"name": "k", "task": "multiclass",
                                                 "classes": list(RANKS)}).json()["id"]
        crops = card_crops("train", per_class=30)
        ids = []
        for start in range(0, len(crops), 64):
            batch = crops[start:start + 64]
            ids += [i["id"] for i in upload(api, pid, [(s.name, s.data) for s in batch])
                    .json()["images"]]
        for iid, s in zip(ids, crops, strict=True):
            label(api, iid, list(s.labels))
        runs = api.get(f"/api/v1/projects/{pid}/training-runs").json()
        assert len(runs) == 1, runs  # the policy queued exactly one run
        rid = runs[0]["id"]
        worker = WorkerProcess(values, queues="train")
        for attempt in range(1, kills + 1):
            wait_running(api, rid, attempt, worker)
            child = lease_pid(api, rid)
            assert child != worker.proc.pid  # the prefork child, not the main process
            os.kill(child, signal.SIGKILL)
        run = wait_run(api, pid, worker, timeout=240)
        if kills == 1:
            assert run["status"] == "SUCCEEDED", (run, worker.tail())
            assert run["attempt"] == 2
            assert versions_of(api, rid) == 1
            models = api.get(f"/api/v1/projects/{pid}/models").json()
            assert len(models) == 1 and models[0]["promoted"]
        else:
            assert run["status"] == "FAILED", (run, worker.tail())
            assert run["error_code"] == "worker_lost" and run["attempt"] == 2
            assert versions_of(api, rid) == 0
        time.sleep(3)  # no redelivery loop: nothing changes afterwards
        assert api.get(f"/api/v1/training-runs/{rid}").json()["status"] == run["status"]
    finally:
        if worker is not None:
            worker.stop()
        gen.close()
