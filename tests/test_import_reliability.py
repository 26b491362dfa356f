"""Import jobs under a DB lease, on SQLite and PostgreSQL: a duplicate delivery imports once,
the attempt cap ends a job FAILED ``worker_lost``, dead leases are re-sent, and a failed import
leaves no blob that it created and nothing references."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

import service.datasets.importer as importer
from service.datasets.jobs import run_job
from service.storage import image_key, sha256_hex
from service.tables import Annotation, Image, ImportJob, utcnow
from tests.conftest import Api
from tests.test_api import make_project, upload
from tests.test_datasets_api import (
    BCCD,
    BCCD_SUBSET,
    bccd_voc_zip,
    count,
    labels_by_sha,
    run_imports,
    start_import,
)


def ctx_of(api: Api) -> Any:
    return api.client.app.state.ctx  # type: ignore[attr-defined]


def job_row(api: Api, jid: int) -> ImportJob:
    with ctx_of(api).sessions() as session:
        job = session.get(ImportJob, jid)
        assert job is not None
        return job


def test_duplicate_delivery_during_an_import_writes_once(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker A's lease expires mid-import and B takes the job over and finishes it: A then
    writes nothing (its write transaction checks the lease first)."""
    ctx = ctx_of(api)
    pid = make_project(api, task="detection", classes=())["id"]
    jid = start_import(api, pid, bccd_voc_zip(), "voc").json()["id"]
    real = importer.read_dataset
    outcomes: dict[str, Any] = {}

    def take_over(*args: Any) -> Any:
        if "B" not in outcomes:  # A is reading: its lease expires, B is delivered the job
            outcomes["B"] = "running"
            with ctx.sessions.begin() as session:
                session.execute(update(ImportJob).where(ImportJob.id == jid).values(
                    lease_expires_at=utcnow() - timedelta(seconds=1)))
            outcomes["B"] = run_job(ctx.sessions, ctx.blobs, ctx.settings, None, jid,
                                    owner="hostB:2")
        return real(*args)

    monkeypatch.setattr(importer, "read_dataset", take_over)
    outcomes["A"] = run_job(ctx.sessions, ctx.blobs, ctx.settings, None, jid, owner="hostA:1")
    assert outcomes == {"A": "lease lost", "B": "SUCCEEDED"}
    job = job_row(api, jid)
    assert (job.status, job.attempt, job.lease_owner) == ("SUCCEEDED", 2, None)
    assert job.report is not None and job.report["labels"]["created"] == len(BCCD_SUBSET)
    # one label per image, and every image's blob is there (A did not clean up B's blobs)
    assert count(api, Annotation, pid) == len(BCCD_SUBSET) == len(labels_by_sha(api, pid))
    with ctx.sessions() as session:
        keys = list(session.scalars(select(Image.storage_key).where(Image.project_id == pid)))
    assert len(keys) == len(BCCD_SUBSET) and all(ctx.blobs.exists(k) for k in keys)
    # a late duplicate delivery is dropped
    late = run_job(ctx.sessions, ctx.blobs, ctx.settings, None, jid, owner="hostC:3")
    assert not isinstance(late, str) and late.reason == "already SUCCEEDED"


def test_a_live_lease_sends_a_duplicate_delivery_back_later(api: Api) -> None:
    from workers.leases import claim

    ctx = ctx_of(api)
    pid = make_project(api, task="detection", classes=())["id"]
    jid = start_import(api, pid, bccd_voc_zip(BCCD_SUBSET[:1]), "voc").json()["id"]
    assert claim(ctx.sessions, jid, "hostA:1", 30, ImportJob).ok
    other = claim(ctx.sessions, jid, "hostB:2", 30, ImportJob)
    assert not other.ok and other.retry_in is not None and other.retry_in > 20
    job = job_row(api, jid)
    assert (job.status, job.attempt, job.lease_owner) == ("RUNNING", 1, "hostA:1")


def test_attempt_cap_ends_the_job_worker_lost(api: Api) -> None:
    ctx = ctx_of(api)
    pid = make_project(api, task="detection", classes=())["id"]
    jid = start_import(api, pid, bccd_voc_zip(BCCD_SUBSET[:1]), "voc").json()["id"]
    assert job_row(api, jid).max_attempts == 3
    with ctx.sessions.begin() as session:  # three workers died importing it
        session.execute(update(ImportJob).where(ImportJob.id == jid).values(
            status="RUNNING", attempt=3, lease_owner="hostZ:9",
            lease_expires_at=utcnow() - timedelta(seconds=1)))
    dropped = run_job(ctx.sessions, ctx.blobs, ctx.settings, None, jid, owner="hostA:1")
    assert not isinstance(dropped, str) and dropped.reason == "attempts exhausted"
    job = api.get(f"/api/v1/imports/{jid}").json()
    assert (job["status"], job["error_code"], job["attempt"]) == ("FAILED", "worker_lost", 3)
    assert count(api, Image, pid) == 0


def test_reconciler_resends_imports_with_a_dead_lease(api: Api) -> None:
    from workers.importing import resend_stale_imports

    class Queue:
        def __init__(self) -> None:
            self.sent: list[int] = []

        def send_import(self, sessions: Any, job_id: int) -> bool:
            self.sent.append(job_id)
            return True

    ctx = ctx_of(api)
    pid = make_project(api, task="detection", classes=())["id"]
    jid = start_import(api, pid, bccd_voc_zip(BCCD_SUBSET[:1]), "voc").json()["id"]
    live = utcnow() + timedelta(seconds=60)
    with ctx.sessions.begin() as session:  # running, leased by a live worker
        session.execute(update(ImportJob).where(ImportJob.id == jid).values(
            status="RUNNING", attempt=1, lease_owner="hostA:1", lease_expires_at=live,
            enqueued_at=utcnow() - timedelta(minutes=5)))
    queue = Queue()
    assert resend_stale_imports(ctx.sessions, queue, ctx.settings) == 0  # type: ignore[arg-type]
    with ctx.sessions.begin() as session:  # the worker died: its lease expired
        session.execute(update(ImportJob).where(ImportJob.id == jid).values(
            lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert resend_stale_imports(ctx.sessions, queue, ctx.settings) == 1  # type: ignore[arg-type]
    assert queue.sent == [jid]
    assert resend_stale_imports(ctx.sessions, queue, ctx.settings) == 0  # type: ignore[arg-type]
    assert run_job(ctx.sessions, ctx.blobs, ctx.settings, None, jid) == "SUCCEEDED"
    assert job_row(api, jid).attempt == 2


def test_a_failed_import_deletes_only_the_blobs_it_orphaned(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = ctx_of(api)
    # an image of another project shares a blob with the dataset (keys are by sha256)
    shared = (BCCD / "JPEGImages" / f"{BCCD_SUBSET[2]}.jpg").read_bytes()
    before = make_project(api, task="detection", classes=())["id"]
    upload(api, before, [("shared.jpg", shared)])
    blob_dir = Path(api.settings.blob_dir) / "images"
    existing = {p for p in blob_dir.rglob("*") if p.is_file()}
    assert len(existing) == 1
    calls = {"n": 0}
    real = importer.record_annotation

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(importer, "record_annotation", failing)
    pid = make_project(api, task="detection", classes=())["id"]
    jid = start_import(api, pid, bccd_voc_zip(), "voc").json()["id"]
    run_imports(api)
    assert job_row(api, jid).error_code == "internal_error"
    assert count(api, Image, pid) == 0
    assert {p for p in blob_dir.rglob("*") if p.is_file()} == existing
    assert ctx.blobs.exists(image_key(sha256_hex(shared)))
    assert api.get("/api/v1/images/1/file", role="annotator").status_code == 200
    # the same import then succeeds, and every image it names is stored
    monkeypatch.setattr(importer, "record_annotation", real)
    jid = start_import(api, pid, bccd_voc_zip(), "voc").json()["id"]
    run_imports(api)
    assert job_row(api, jid).status == "SUCCEEDED"
    with ctx.sessions() as session:
        keys = list(session.scalars(select(Image.storage_key)))
        assert session.scalar(select(func.count()).select_from(Image)) == len(BCCD_SUBSET) + 1
    assert all(ctx.blobs.exists(k) for k in keys)
