"""Import jobs: the row is the record (status, progress, report); the broker carries its id.

``run_job`` is what the worker task (and the CLI, in-process) calls: it claims the job, extracts
an uploaded archive into a private folder, imports, and marks the job SUCCEEDED inside the
import's own transaction, or FAILED with a stable code. Only after the commit does it enqueue
embeddings for the new images and a training run if the policy says one is due.
"""

from __future__ import annotations

import logging
import uuid
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

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3
TERMINAL = ("SUCCEEDED", "FAILED")


def create_job(session: Session, project_id: int, fmt: str, options: ImportOptions, *,
               origin: str, source_name: str, archive_key: str | None = None,
               author_key_id: int | None = None, status: str = "QUEUED") -> ImportJob:
    """Add a job in the caller's transaction (commit, then send its id).

    In-process imports (CLI) start as RUNNING, so that no reconciler sends them to a worker.
    """
    job = ImportJob(project_id=project_id, format=fmt, options=options.as_json(),
                    origin=origin, source_name=source_name[:255], archive_key=archive_key,
                    status=status, stage=status.lower(), progress=0.0, counts={}, attempt=0,
                    author_key_id=author_key_id)
    session.add(job)
    session.flush()
    return job


def _claim(sessions: sessionmaker[Session], job_id: int) -> ImportJob | str:
    """Move the job to RUNNING (a redelivery after a lost worker counts an attempt)."""
    with sessions.begin() as session:
        job = session.get(ImportJob, job_id)
        if job is None:
            return "missing"
        if job.status in TERMINAL:
            return f"already {job.status}"
        if job.attempt >= MAX_ATTEMPTS:
            job.status, job.stage, job.finished_at = "FAILED", "failed", utcnow()
            job.error_code = "worker_lost"
            job.error = f"the import was interrupted {job.attempt} times"
            return "worker_lost"
        claimed = session.execute(
            update(ImportJob).where(ImportJob.id == job_id, ImportJob.attempt == job.attempt)
            .values(status="RUNNING", stage="starting", attempt=job.attempt + 1,
                    started_at=utcnow())).rowcount
        if not claimed:
            return "claimed elsewhere"
        session.expunge(job)
        return job


def _progress(sessions: sessionmaker[Session], job_id: int):  # type: ignore[no-untyped-def]
    def report(progress: float, stage: str, counts: dict[str, Any]) -> None:
        with sessions.begin() as session:
            session.execute(update(ImportJob).where(ImportJob.id == job_id).values(
                progress=round(progress, 4), stage=stage, counts=counts))

    return report


def fail_job(sessions: sessionmaker[Session], job_id: int, code: str, message: str) -> None:
    """End a job FAILED with a stable code and a message."""
    with sessions.begin() as session:
        session.execute(update(ImportJob).where(ImportJob.id == job_id).values(
            status="FAILED", stage="failed", error_code=code, error=message[:2000],
            finished_at=utcnow()))


def run_job(sessions: sessionmaker[Session], blobs: LocalBlobStore, settings: Settings,
            queue: JobQueue | None, job_id: int, source: Path | None = None,
            annotation_file: Path | None = None) -> str:
    """Run one import job; returns its final status (or why the delivery was dropped).

    ``source`` is a folder to read in place (CLI); without it the job's uploaded archive is
    extracted first. Database outages propagate (the task retries); every other error ends
    the job FAILED with a code, and no row of the import is written.
    """
    job = _claim(sessions, job_id)
    if isinstance(job, str):
        log.info("import %s: delivery dropped (%s)", job_id, job)
        return job
    workdir: Path | None = None
    try:
        if source is None:
            if job.archive_key is None:
                raise ImportFailed("archive_missing", "the job has no archive")
            workdir = settings.data_dir.resolve() / "tmp" / f"import-{job_id}-{uuid.uuid4().hex}"
            _progress(sessions, job_id)(0.0, "extracting", {})
            extract_archive(blobs.path(job.archive_key), workdir,
                            ArchiveLimits.from_settings(settings))
            source = workdir
        result = _import(sessions, blobs, settings, job, source, annotation_file)
    except ImportFailed as exc:
        fail_job(sessions, job_id, exc.code, exc.message)
        _drop_archive(blobs, job)
        return "FAILED"
    except BlobMissing:
        fail_job(sessions, job_id, "archive_missing", "the uploaded archive is no longer stored")
        return "FAILED"
    except OperationalError:
        raise
    except Exception as exc:
        log.exception("import %s failed", job_id)
        fail_job(sessions, job_id, "internal_error",
              f"the import failed unexpectedly ({exc.__class__.__name__}); nothing was written")
        _drop_archive(blobs, job)
        return "FAILED"
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
            job: ImportJob, source: Path, annotation_file: Path | None) -> ImportResult:
    def finish(session: Session, report: Report) -> None:
        data = report.as_json()
        counts = {k: v for k, v in data.items() if k not in ("problems", "classes_created")}
        session.execute(update(ImportJob).where(ImportJob.id == job.id).values(
            status="SUCCEEDED", stage="done", progress=1.0, report=data, counts=counts,
            finished_at=utcnow()))

    importer = DatasetImport(sessions, blobs, settings, job.project_id, job.format,
                             ImportOptions.from_json(job.options), job.author_key_id,
                             _progress(sessions, job.id))
    return importer.run(source, annotation_file, finish)


def _drop_archive(blobs: LocalBlobStore, job: ImportJob) -> None:
    if job.archive_key:
        try:
            blobs.delete(job.archive_key)
        except OSError:
            log.warning("could not delete import archive %s", job.archive_key)
