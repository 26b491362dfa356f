"""Sending job ids to the workers. Only ids travel; the database holds the jobs."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from service.tables import ImportJob, TrainingRun, utcnow

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)
EMBED_CHUNK = 32


class JobQueue:
    """Enqueue work by task name; call only after the rows it names are committed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._celery: Celery | None = None

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            from workers.celery_app import make_celery

            self._celery = make_celery(self.settings)
        return self._celery

    def send_train(self, sessions: sessionmaker[Session], run_id: int) -> bool:
        """Send a run id and stamp ``enqueued_at``; False (run left for the reconciler) on error."""
        from workers.celery_app import TRAIN_TASK

        try:
            self.celery.send_task(TRAIN_TASK, args=[run_id])
        except Exception:  # broker down: the run stays QUEUED and is re-sent later
            log.warning("could not enqueue run %s; the reconciler will retry", run_id,
                        exc_info=True)
            return False
        with sessions.begin() as session:
            session.execute(
                update(TrainingRun).where(TrainingRun.id == run_id).values(enqueued_at=utcnow())
            )
        return True

    def send_embed(self, image_ids: Iterable[int]) -> bool:
        """Send embedding jobs in chunks; False when the broker is unreachable."""
        from workers.celery_app import EMBED_TASK

        ids = list(image_ids)
        try:
            for start in range(0, len(ids), EMBED_CHUNK):
                self.celery.send_task(EMBED_TASK, args=[ids[start:start + EMBED_CHUNK]])
        except Exception:
            log.warning("could not enqueue embeddings; the reconciler will retry", exc_info=True)
            return False
        return True

    def send_score(self, project_id: int) -> bool:
        """Ask a worker to rescore a project's unlabeled images with its promoted model."""
        from workers.celery_app import SCORE_TASK

        try:
            self.celery.send_task(SCORE_TASK, args=[project_id])
        except Exception:
            log.warning("could not enqueue scoring for project %s", project_id, exc_info=True)
            return False
        return True

    def send_import(self, sessions: sessionmaker[Session], job_id: int) -> bool:
        """Send an import job id and stamp ``enqueued_at``; False (left for the reconciler)."""
        from workers.celery_app import IMPORT_TASK

        try:
            self.celery.send_task(IMPORT_TASK, args=[job_id])
        except Exception:
            log.warning("could not enqueue import %s; the reconciler will retry", job_id,
                        exc_info=True)
            return False
        with sessions.begin() as session:
            session.execute(
                update(ImportJob).where(ImportJob.id == job_id).values(enqueued_at=utcnow())
            )
        return True

    def ping(self, timeout: float = 2.0) -> None:
        """Raise if the broker cannot be reached."""
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)

