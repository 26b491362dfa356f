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
from workers.leases import Claim, owner_dead, stale_ids

if TYPE_CHECKING:
    from workers.context import WorkerContext

log = logging.getLogger(__name__)


_queues: dict[int, JobQueue] = {}


def _queue(settings: Settings) -> JobQueue:
    """One producer per process (the settings are read once per worker)."""
    if id(settings) not in _queues:
        _queues[id(settings)] = JobQueue(settings)
    return _queues[id(settings)]


def run_import(ctx: WorkerContext, job_id: int) -> Claim | str:
    """Run one import job (idempotent: a finished or leased job's extra deliveries are dropped)."""
    return run_job(ctx.sessions, ctx.blobs, ctx.settings, _queue(ctx.settings), job_id)


def resend_stale_imports(sessions: sessionmaker[Session], queue: JobQueue,
                         settings: Settings) -> int:
    """Re-send QUEUED imports not sent recently (broker down at upload, or wiped) and RUNNING
    ones whose lease is dead (the worker died); end in-process (CLI) imports whose process is
    gone as FAILED ``worker_lost``."""
    with sessions() as session:
        found = stale_ids(session, ImportJob, settings)
        cli = set(session.scalars(select(ImportJob.id).where(
            ImportJob.id.in_([i for i, _ in found]), ImportJob.origin == "cli")))
    cutoff = utcnow() - timedelta(seconds=settings.requeue_after_seconds)
    sent = 0
    for jid, status in found:
        if jid in cli:
            _fail_orphaned_cli(sessions, jid)
            continue
        recent = or_(ImportJob.enqueued_at.is_(None), ImportJob.enqueued_at < cutoff) \
            if status == "QUEUED" else ImportJob.status == "RUNNING"
        with sessions.begin() as session:  # stamp first: two reconcilers do not both send
            stamped = session.execute(update(ImportJob).where(
                ImportJob.id == jid, ImportJob.status == status, recent)
                .values(enqueued_at=utcnow())).rowcount
        if stamped and queue.send_import(sessions, jid):
            sent += 1
    if sent:
        log.info("reconciler re-sent %d import jobs", sent)
    return sent


def _fail_orphaned_cli(sessions: sessionmaker[Session], job_id: int) -> None:
    """A CLI import runs in its own process: nobody else can finish it once that is gone."""
    with sessions.begin() as session:
        job = session.get(ImportJob, job_id)
        if job is None or job.status != "RUNNING" or not owner_dead(job.lease_owner):
            return  # alive (maybe on another host): leave it
        session.execute(update(ImportJob).where(
            ImportJob.id == job_id, ImportJob.status == "RUNNING",
            ImportJob.lease_owner == job.lease_owner).values(
            status="FAILED", stage="failed", error_code="worker_lost",
            error="the importing process ended before the import finished",
            finished_at=utcnow(), lease_owner=None, lease_expires_at=None))
