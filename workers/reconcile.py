"""The reconciler: re-sends jobs the broker lost (restart, wipe, killed worker).

The database is the record of every job; the broker only carries ids. Every few seconds this
looks for runs that should be moving but are not, and for images still lacking embeddings.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import timedelta

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.queue import JobQueue
from service.settings import Settings
from service.tables import Embedding, Image, TrainingRun, utcnow
from workers.importing import resend_stale_imports
from workers.leases import stale_ids

log = logging.getLogger(__name__)


def stale_runs(session: Session, settings: Settings) -> list[int]:
    """Runs to re-send: QUEUED and not sent recently, or RUNNING with a dead lease."""
    return [rid for rid, _ in stale_ids(session, TrainingRun, settings)]


def reconcile_once(sessions: sessionmaker[Session], queue: JobQueue, settings: Settings,
                   resent: dict[int, float] | None = None) -> dict[str, int]:
    """One pass: re-send stale runs (each claimed by a conditional stamp) and embeddings.

    ``resent`` (image id -> when this reconciler last re-sent it) keeps an image waiting
    behind a long training run from being re-sent on every pass.
    """
    sent_runs = 0
    with sessions() as session:
        candidates = stale_runs(session, settings)
    for rid in candidates:
        with sessions.begin() as session:
            # stamp first so that two reconcilers do not both re-send the same run
            stamped = session.execute(update(TrainingRun).where(
                TrainingRun.id == rid, TrainingRun.status.in_(("QUEUED", "RUNNING")))
                .values(enqueued_at=utcnow())).rowcount
        if stamped and queue.send_train(sessions, rid):
            sent_runs += 1
    cutoff = utcnow() - timedelta(seconds=settings.requeue_after_seconds)
    with sessions() as session:
        missing = list(session.scalars(
            select(Image.id).outerjoin(Embedding, and_(Embedding.image_id == Image.id))
            .where(Embedding.image_id.is_(None), Image.created_at < cutoff)
            .order_by(Image.id).limit(2048)))
    if resent is not None:
        now = time.monotonic()
        missing = [i for i in missing if now - resent.get(i, -math.inf)
                   >= settings.requeue_after_seconds]
        for key in [k for k, at in resent.items() if now - at >= settings.requeue_after_seconds]:
            del resent[key]
        resent.update(dict.fromkeys(missing, now))
    if missing:
        queue.send_embed(missing)
    if sent_runs or missing:
        log.info("reconciler re-sent %d runs and %d embeddings", sent_runs, len(missing))
    imports = resend_stale_imports(sessions, queue, settings)
    return {"runs": sent_runs, "embeddings": len(missing), "imports": imports}


class Reconciler(threading.Thread):
    """Background thread in the worker's main process."""

    def __init__(self, sessions: sessionmaker[Session], queue: JobQueue,
                 settings: Settings) -> None:
        super().__init__(daemon=True, name="prelabel-reconciler")
        self.sessions, self.queue, self.settings = sessions, queue, settings
        self.stopped = threading.Event()
        self.resent: dict[int, float] = {}

    def run(self) -> None:
        while not self.stopped.wait(self.settings.reconcile_interval_seconds):
            try:
                reconcile_once(self.sessions, self.queue, self.settings, self.resent)
            except Exception:  # DB or broker down: try again next tick
                log.warning("reconciler pass failed", exc_info=True)
