"""An import job through a real Celery worker: queued, run, progress, report, archive removed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from service.db import session_scope
from service.tables import Annotation, Image, ImportJob
from tests.conftest import Api, WorkerProcess, backend_values, make_api
from tests.test_api import make_project
from tests.test_datasets_api import (
    BCCD,
    BCCD_SUBSET,
    bccd_voc_zip,
    count,
    labels_by_sha,
    run_imports,
    start_import,
    zip_of,
)


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
        # the worker drops the upload and its extraction folder just after it commits the
        # job's SUCCEEDED status, so a busy machine may still be at it when the poll sees it
        archives = Path(api.settings.blob_dir) / "imports"
        workdirs = Path(values["data_dir"]) / "tmp"

        def leftovers() -> list[Path]:
            return [p for p in archives.rglob("*") if p.is_file()] + list(
                workdirs.glob("import-*"))

        deadline = time.monotonic() + 30
        while leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not leftovers()
    finally:
        worker.stop()
        gen.close()


# The whole of BCCD, three times over, so that checking lasts seconds even on a fast machine
# (one copy was checked in under a second once, and the job finished before it could be killed).
COPIES = 3


def bccd_copies_zip(names: list[str], copies: int) -> tuple[bytes, list[str]]:
    """A VOC archive of ``copies`` distinct copies of each BCCD image (bytes after the JPEG's
    end marker make each copy's sha256 differ; the pixels are the same) with its boxes."""
    members, stems = {}, []
    for name in names:
        xml = (BCCD / "Annotations" / f"{name}.xml").read_bytes()
        jpeg = (BCCD / "JPEGImages" / f"{name}.jpg").read_bytes()
        for i in range(copies):
            stem = f"{name}_c{i}"
            members[f"VOC/Annotations/{stem}.xml"] = xml.replace(
                f"{name}.jpg".encode(), f"{stem}.jpg".encode())
            members[f"VOC/JPEGImages/{stem}.jpg"] = jpeg + bytes(i)
            stems.append(stem)
    return zip_of(members), stems


def wait_job(api: Api, jid: int, worker: WorkerProcess, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/api/v1/imports/{jid}").json()
        if job["status"] in ("SUCCEEDED", "FAILED"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"import {jid} did not finish\n{worker.tail()}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["embedded", "redis"])
def test_sigkill_mid_import_imports_once(request: pytest.FixtureRequest, tmp_path: Path,
                                         cache_dir: Path, backend: str) -> None:
    """The worker child is killed while it checks the whole BCCD dataset: the job is taken
    over (attempt 2) and imported once, with the labels of an uninterrupted import."""
    names = sorted(p.stem for p in (BCCD / "Annotations").glob("*.xml"))
    archive, names = bccd_copies_zip(names, COPIES)
    values = backend_values(request, backend, tmp_path, cache_dir)
    gen = make_api(values)
    api = next(gen)
    worker = WorkerProcess(values, queues="embed")
    try:
        pid = make_project(api, task="detection", classes=())["id"]
        jid = start_import(api, pid, archive, "voc").json()["id"]
        deadline = time.monotonic() + 120
        while True:  # killed while it reads and checks images (phase 1)
            assert time.monotonic() < deadline, worker.tail()
            with session_scope(api.settings.db_url) as session:
                job = session.get(ImportJob, jid)
                assert job is not None and job.status in ("QUEUED", "RUNNING"), worker.tail()
                owner, stage = job.lease_owner, job.stage
            if owner and stage == "checking":
                break
            time.sleep(0.05)
        child = int(owner.rpartition(":")[2])
        assert child != worker.proc.pid  # the prefork child, not the main process
        os.kill(child, signal.SIGKILL)
        done = wait_job(api, jid, worker)
        assert done["status"] == "SUCCEEDED", (done, worker.tail())
        assert done["attempt"] == 2
        imported = labels_by_sha(api, pid)
        assert count(api, Annotation, pid) == len(imported)  # one label row per image
        time.sleep(3)  # no redelivery loop: nothing changes afterwards
        after = api.get(f"/api/v1/imports/{jid}").json()
        assert (after["status"], after["attempt"]) == ("SUCCEEDED", 2)
        worker.stop()
        # the same archive, uninterrupted, in-process
        ref = make_project(api, task="detection", classes=())["id"]
        start_import(api, ref, archive, "voc")
        run_imports(api)
        reference = labels_by_sha(api, ref)
        assert imported == reference
        assert count(api, Image, pid) == count(api, Image, ref) == len(names)
        assert done["report"]["labels"] == api.get(
            f"/api/v1/projects/{ref}/imports").json()[0]["counts"]["labels"]
    finally:
        worker.stop()
        gen.close()
