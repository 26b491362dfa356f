"""Import jobs: the row is the record (status, progress, report); the broker carries its id.

``run_job`` is what the worker task (and the CLI, in-process) calls: it claims the job under a
DB lease (``workers.leases``: compare-and-swap, heartbeat, attempt cap in the row), extracts an
uploaded archive into a private folder, imports, and marks the job SUCCEEDED inside the
import's own transaction, which first checks and locks the lease (a duplicate delivery never
writes twice), or FAILED with a stable code. Only after the commit does it enqueue embeddings
for the new images and a training run if the policy says one is due.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.datasets.archive import ArchiveLimits, extract_archive, remove_tree
from service.datasets.importer import DatasetImport, ImportOptions, ImportResult
from service.datasets.items import ImportFailed, Report
from service.queue import JobQueue
from service.settings import Settings
from service.storage import BlobMissing, LocalBlobStore
from service.tables import ImportJob, utcnow
from workers.leases import Claim, Heartbeat, LeaseLost, claim, finish, hold, owner_id

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3
TERMINAL = ("SUCCEEDED", "FAILED")


def create_job(session: Session, project_id: int, fmt: str, options: ImportOptions, *,
               origin: str, source_name: str, archive_key: str | None = None,
               author_key_id: int | None = None, status: str = "QUEUED",
               lease_s: int = 30) -> ImportJob:
    """Add a job in the caller's transaction (commit, then send its id).

    In-process imports (CLI) start as RUNNING, leased to this process, so that no reconciler
    sends them to a worker.
    """
    leased = status == "RUNNING"
    job = ImportJob(project_id=project_id, format=fmt, options=options.as_json(),
                    origin=origin, source_name=source_name[:255], archive_key=archive_key,
                    status=status, stage=status.lower(), progress=0.0, counts={}, attempt=0,
                    max_attempts=MAX_ATTEMPTS, author_key_id=author_key_id,
                    lease_owner=owner_id() if leased else None,
                    lease_expires_at=utcnow() + timedelta(seconds=lease_s) if leased else None)
    session.add(job)
    session.flush()
    return job


def fail_job(sessions: sessionmaker[Session], job_id: int, code: str, message: str) -> None:
    """End a job FAILED with a stable code and a message."""
    with sessions.begin() as session:
        session.execute(update(ImportJob).where(ImportJob.id == job_id).values(
            status="FAILED", stage="failed", error_code=code, error=message[:2000],
            finished_at=utcnow(), lease_owner=None, lease_expires_at=None))


def run_job(sessions: sessionmaker[Session], blobs: LocalBlobStore, settings: Settings,
            queue: JobQueue | None, job_id: int, source: Path | None = None,
            annotation_file: Path | None = None, owner: str | None = None) -> Claim | str:
    """Run one import job; returns its final status, or the ``Claim`` that dropped the delivery.

    ``source`` is a folder to read in place (CLI); without it the job's uploaded archive is
    extracted first. Database outages propagate (the task retries); every other error ends
    the job FAILED with a code, and no row of the import is written.
    """
    owner = owner or owner_id()
    taken = claim(sessions, job_id, owner, settings.lease_seconds, ImportJob)
    if not taken.ok:
        log.info("import %s: delivery dropped (%s)", job_id, taken.reason)
        return taken
    with sessions() as session:
        job = session.get(ImportJob, job_id)
        assert job is not None
        session.expunge(job)
    with Heartbeat(sessions, job_id, owner, settings.lease_seconds, ImportJob) as hb:
        return _run(sessions, blobs, settings, queue, job, source, annotation_file, owner, hb)


def _run(sessions: sessionmaker[Session], blobs: LocalBlobStore, settings: Settings,
         queue: JobQueue | None, job: ImportJob, source: Path | None,
         annotation_file: Path | None, owner: str, hb: Heartbeat) -> str:
    def fail(code: str, message: str) -> str:
        finish(sessions, job.id, owner, "FAILED", code, message[:2000], ImportJob)
        return "FAILED"

    workdir: Path | None = None
    try:
        if source is None:
            if job.archive_key is None:
                raise ImportFailed("archive_missing", "the job has no archive")
            workdir = settings.data_dir.resolve() / "tmp" / f"import-{job.id}-{uuid.uuid4().hex}"
            hb.progress(0.0, "extracting", counts={})
            extract_archive(blobs.path(job.archive_key), workdir,
                            ArchiveLimits.from_settings(settings))
            source = workdir
        result = _import(sessions, blobs, settings, job, source, annotation_file, owner, hb)
    except LeaseLost:
        log.warning("import %s: the lease passed to another worker; stopping", job.id)
        return "lease lost"  # the archive stays: the new owner reads it
    except ImportFailed as exc:
        status = fail(exc.code, exc.message)
        _drop_archive(blobs, job)
        return status
    except BlobMissing:
        return fail("archive_missing", "the uploaded archive is no longer stored")
    except OperationalError:
        raise
    except Exception as exc:
        log.exception("import %s failed", job.id)
        status = fail("internal_error", "the import failed unexpectedly "
                      f"({exc.__class__.__name__}); nothing was written")
        _drop_archive(blobs, job)
        return status
    finally:
        if workdir is not None:
            remove_tree(workdir)
    _drop_archive(blobs, job)
    if queue is not None:  # only now, after the commit
        if result.new_image_ids:
            queue.send_embed(result.new_image_ids)
        if result.run_id is not None:
            queue.send_train(sessions, result.run_id)
    return "SUCCEEDED"


def _import(sessions: sessionmaker[Session], blobs: LocalBlobStore, settings: Settings,
            job: ImportJob, source: Path, annotation_file: Path | None, owner: str,
            hb: Heartbeat) -> ImportResult:
    def progress(value: float, stage: str, counts: dict[str, Any]) -> None:
        if hb.lost.is_set():
            raise LeaseLost
        hb.progress(round(value, 4), stage, counts=counts)

    def begin(session: Session) -> None:  # first in the write transaction: lock our lease
        hold(session, ImportJob, job.id, owner, stage="writing")

    def done(session: Session, report: Report) -> None:
        data = report.as_json()
        counts = {k: v for k, v in data.items() if k not in ("problems", "classes_created")}
        session.execute(update(ImportJob).where(ImportJob.id == job.id).values(
            status="SUCCEEDED", stage="done", progress=1.0, report=data, counts=counts,
            finished_at=utcnow(), lease_owner=None, lease_expires_at=None))

    importer = DatasetImport(sessions, blobs, settings, job.project_id, job.format,
                             ImportOptions.from_json(job.options), job.author_key_id, progress)
    return importer.run(source, annotation_file, done, begin)


def _drop_archive(blobs: LocalBlobStore, job: ImportJob) -> None:
    if job.archive_key:
        try:
            blobs.delete(job.archive_key)
        except OSError:
            log.warning("could not delete import archive %s", job.archive_key)
