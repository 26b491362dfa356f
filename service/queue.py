"""Sending job ids to the workers. Only ids travel; the database holds the jobs."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

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

    def _send(self, task: str, args: list[Any], what: str) -> bool:
        """Send one task; False (logged, left for the reconciler) when the broker is down."""
        try:
            self.celery.send_task(task, args=args)
        except Exception:  # broker down: the job stays in the DB and is re-sent later
            log.warning("could not enqueue %s; the reconciler will retry", what, exc_info=True)
            return False
        return True

    def _send_job(self, sessions: sessionmaker[Session], task: str, table: Any,
                  job_id: int, what: str) -> bool:
        """Send a job row's id, then stamp its ``enqueued_at``."""
        if not self._send(task, [job_id], f"{what} {job_id}"):
            return False
        with sessions.begin() as session:
            session.execute(update(table).where(table.id == job_id).values(enqueued_at=utcnow()))
        return True

    def send_train(self, sessions: sessionmaker[Session], run_id: int) -> bool:
        """Send a run id and stamp ``enqueued_at``; False (run left for the reconciler) on error."""
        from workers.celery_app import TRAIN_TASK

        return self._send_job(sessions, TRAIN_TASK, TrainingRun, run_id, "run")

    def send_embed(self, image_ids: Iterable[int]) -> bool:
        """Send embedding jobs in chunks; False when the broker is unreachable."""
        from workers.celery_app import EMBED_TASK

        ids = list(image_ids)
        return all(self._send(EMBED_TASK, [ids[start:start + EMBED_CHUNK]], "embeddings")
                   for start in range(0, len(ids), EMBED_CHUNK))

    def send_score(self, project_id: int) -> bool:
        """Ask a worker to rescore a project's unlabeled images with its promoted model."""
        from workers.celery_app import SCORE_TASK

        return self._send(SCORE_TASK, [project_id], f"scoring of project {project_id}")

    def send_import(self, sessions: sessionmaker[Session], job_id: int) -> bool:
        """Send an import job id and stamp ``enqueued_at``; False (left for the reconciler)."""
        from workers.celery_app import IMPORT_TASK

        return self._send_job(sessions, IMPORT_TASK, ImportJob, job_id, "import")

    def ping(self, timeout: float = 2.0) -> None:
        """Raise if the broker cannot be reached."""
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)

