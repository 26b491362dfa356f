"""Import jobs in the worker: run one, and re-send queued ones the broker lost."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.datasets.jobs import run_job
from service.queue import JobQueue
from service.settings import Settings
from service.tables import ImportJob, utcnow

if TYPE_CHECKING:
    from workers.context import WorkerContext

log = logging.getLogger(__name__)


_queues: dict[int, JobQueue] = {}


def _queue(settings: Settings) -> JobQueue:
    """One producer per process (the settings are read once per worker)."""
    if id(settings) not in _queues:
        _queues[id(settings)] = JobQueue(settings)
    return _queues[id(settings)]


def run_import(ctx: WorkerContext, job_id: int) -> str:
    """Run one import job (idempotent: a finished job's extra deliveries are dropped)."""
    return run_job(ctx.sessions, ctx.blobs, ctx.settings, _queue(ctx.settings), job_id)


def resend_stale_imports(sessions: sessionmaker[Session], queue: JobQueue,
                         settings: Settings) -> int:
    """Re-send QUEUED imports not sent recently (broker down at upload, or wiped)."""
    cutoff = utcnow() - timedelta(seconds=settings.requeue_after_seconds)
    with sessions() as session:
        ids = list(session.scalars(select(ImportJob.id).where(
            ImportJob.status == "QUEUED",
            or_(ImportJob.enqueued_at.is_(None), ImportJob.enqueued_at < cutoff))))
    sent = 0
    for jid in ids:
        with sessions.begin() as session:  # stamp first: two reconcilers do not both send
            stamped = session.execute(update(ImportJob).where(
                ImportJob.id == jid, ImportJob.status == "QUEUED",
                or_(ImportJob.enqueued_at.is_(None), ImportJob.enqueued_at < cutoff))
                .values(enqueued_at=utcnow())).rowcount
        if stamped and queue.send_import(sessions, jid):
            sent += 1
    if sent:
        log.info("reconciler re-sent %d import jobs", sent)
    return sent
