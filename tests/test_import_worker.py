"""An import job through a real Celery worker: queued, run, progress, report, archive removed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WorkerProcess, backend_values, make_api
from tests.test_api import make_project
from tests.test_datasets_api import BCCD_SUBSET, bccd_voc_zip, labels_by_sha, start_import


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["embedded", "redis"])
def test_import_job_on_a_real_worker(request: pytest.FixtureRequest, tmp_path: Path,
                                     cache_dir: Path, backend: str) -> None:
    values = backend_values(request, backend, tmp_path, cache_dir)
    gen = make_api(values)
    api = next(gen)
    worker = WorkerProcess(values, queues="embed")
    try:
        pid = make_project(api, task="detection", classes=())["id"]
        r = start_import(api, pid, bccd_voc_zip(), "voc")
        assert r.status_code == 202, r.text
        job: dict[str, Any] = r.json()
        seen = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            job = api.get(f"/api/v1/imports/{job['id']}", role="annotator").json()
            seen.append((job["status"], job["progress"]))
            if job["status"] in ("SUCCEEDED", "FAILED"):
                break
            time.sleep(0.2)
        assert job["status"] == "SUCCEEDED", (job, worker.tail())
        assert job["progress"] == 1.0 and job["attempt"] == 1 and job["started_at"]
        assert all(0 <= p <= 1 for _, p in seen)
        report = job["report"]
        assert report["labels"]["created"] == len(BCCD_SUBSET)
        assert {(p["file"], p["object"], p["code"]) for p in report["problems"]} == {
            ("VOC/Annotations/BloodImage_00338.xml", 12, "zero_area"),
            ("VOC/Annotations/BloodImage_00343.xml", 3, "zero_area")}
        assert len(labels_by_sha(api, pid)) == len(BCCD_SUBSET)
        archives = Path(api.settings.blob_dir) / "imports"
        assert not any(p.is_file() for p in archives.rglob("*"))  # the upload is dropped
        assert not list((Path(values["data_dir"]) / "tmp").glob("import-*"))
    finally:
        worker.stop()
        gen.close()
