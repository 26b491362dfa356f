"""Celery tasks: thin wrappers that take ids (JSON) and call the worker modules."""

from __future__ import annotations

import logging

from celery import Celery, Task, shared_task
from celery.signals import worker_process_init, worker_ready, worker_shutting_down
from sqlalchemy.exc import OperationalError

from workers.celery_app import EMBED_TASK, IMPORT_TASK, SCORE_TASK, TRAIN_TASK
from workers.context import worker_context
from workers.embedding import embed_images, score_images
from workers.leases import Claim

# imported here, in the worker's main process before it forks its pool, so that the first run
# does not pay seconds of imports (torch, timm, sklearn)
from workers.training import train_run

log = logging.getLogger(__name__)
_reconciler = None


@shared_task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
             max_retries=20)
def train(self: Task, run_id: int) -> str:
    """Train one run (idempotent: extra deliveries of the same run are dropped)."""
    try:
        outcome = train_run(worker_context(), int(run_id))
    except OperationalError as exc:  # DB down: back off and try again
        raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries)) from exc
    if isinstance(outcome, Claim):
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in)
        log.info("run %s: delivery dropped (%s)", run_id, outcome.reason)
        return outcome.reason
    return outcome


@shared_task(name=EMBED_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
             max_retries=10)
def embed(self: Task, image_ids: list[int]) -> int:
    """Embed images (idempotent)."""
    try:
        return embed_images(worker_context(), [int(i) for i in image_ids])
    except OperationalError as exc:
        raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries)) from exc


@shared_task(name=SCORE_TASK, bind=True, acks_late=True, max_retries=10)
def score(self: Task, project_id: int) -> int:
    """Rescore a project's unlabeled images with its promoted model."""
    ctx = worker_context()
    try:
        with ctx.sessions() as session:
            n = score_images(ctx, session, int(project_id))
            session.commit()
        return n
    except OperationalError as exc:
        raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries)) from exc


@worker_process_init.connect
def one_intra_op_thread(**_: object) -> None:
    """Run torch in each pool process with one intra-op thread."""
    import torch

    # A process forked after its parent ran a multi-threaded torch op hangs in its own first
    # one: the OpenMP thread pool does not survive fork (tests/test_pool_threads.py). On an H200
    # detector training in pool processes never finished (7 minutes for a run that takes 5 s
    # in-process), and unlike CPU training the GPU path did not pin one thread; forked there
    # with one thread, the run took 5 s. That this was the worker's hang is likely, not shown.
    # CPU training already uses one thread per slot, so nothing changes on the CPU.
    torch.set_num_threads(1)


@worker_ready.connect
def _start_reconciler(sender: object = None, **_: object) -> None:
    """Start the reconciler in the worker's main process."""
    global _reconciler
    from service.queue import JobQueue
    from workers.reconcile import Reconciler

    ctx = worker_context()
    app: Celery | None = getattr(sender, "app", None)
    queue = JobQueue(ctx.settings)
    if app is not None:
        queue._celery = app
    _reconciler = Reconciler(ctx.sessions, queue, ctx.settings)
    _reconciler.start()


@worker_shutting_down.connect
def _stop_reconciler(**_: object) -> None:
    if _reconciler is not None:
        _reconciler.stopped.set()


@shared_task(name=IMPORT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
             max_retries=10)
def import_dataset(self: Task, job_id: int) -> str:
    """Import one dataset job (idempotent: a job is imported by one lease holder, once)."""
    from workers.importing import run_import

    try:
        outcome = run_import(worker_context(), int(job_id))
    except OperationalError as exc:  # DB down: back off and try again
        raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries)) from exc
    if isinstance(outcome, Claim):
        if outcome.retry_in is not None:  # leased by a live worker: look again later
            raise self.retry(countdown=outcome.retry_in)
        return outcome.reason
    return outcome
