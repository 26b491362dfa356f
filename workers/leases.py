"""DB leases on jobs (training runs, import jobs): one worker at a time, a bounded number of times.

The broker may deliver a job's message twice (redelivery after a worker died, the reconciler
re-sending). Every delivery goes through ``claim``: a compare-and-swap on the job row decides
who runs it, and the attempt counter in the row caps retries of jobs that kill their worker.
A leased table has ``status``, ``stage``, ``progress``, ``attempt``, ``max_attempts``,
``lease_owner``, ``lease_expires_at``, ``error_code``, ``error``, ``started_at``,
``finished_at`` and ``enqueued_at`` (``cancel_requested`` is optional).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from service.tables import ImportJob, TrainingRun, utcnow

log = logging.getLogger(__name__)
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
Leased = type[TrainingRun] | type[ImportJob]


class LeaseLost(Exception):
    """Another delivery took the job over; stop without writing."""


def owner_id() -> str:
    """This process, as recorded in a lease."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_dead(owner: str | None) -> bool:
    """True when the lease owner is a process on this host that no longer exists."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _aware(ts: datetime | None) -> datetime | None:
    if ts is not None and ts.tzinfo is None:  # SQLite drops the zone
        return ts.replace(tzinfo=UTC)
    return ts


@dataclass(frozen=True)
class Claim:
    """The outcome of a delivery: train (``ok``), drop, or come back later."""

    ok: bool
    reason: str
    retry_in: float | None = None


def claim(sessions: sessionmaker[Session], run_id: int, owner: str, lease_s: int,
          table: Leased = TrainingRun) -> Claim:
    """Try to take the job (a training run by default) for this delivery."""
    with sessions.begin() as session:
        run = session.get(table, run_id)
        if run is None:
            return Claim(False, "missing")
        if run.status in TERMINAL:
            return Claim(False, f"already {run.status}")
        now = utcnow()
        expires = _aware(run.lease_expires_at)
        prior = run.lease_owner
        if run.status == "RUNNING" and prior != owner:
            alive = expires is not None and expires > now and not owner_dead(prior)
            if alive:
                wait = (expires - now).total_seconds() if expires else lease_s
                return Claim(False, "leased by another worker", retry_in=max(1.0, wait + 1))
        if getattr(run, "cancel_requested", False):
            _finish(session, table, run_id, "CANCELLED", None, None)
            return Claim(False, "cancelled")
        same_owner = run.status == "RUNNING" and prior == owner
        if not same_owner and run.attempt >= run.max_attempts:
            _finish(session, table, run_id, "FAILED", "worker_lost",
                    f"the worker died on each of {run.attempt} attempts")
            return Claim(False, "attempts exhausted")
        # compare-and-swap on the state we read, so two deliveries cannot both win
        # (a job created RUNNING under our lease, as the CLI does, is on its first attempt)
        taken = session.execute(
            update(table)
            .where(table.id == run_id, table.status == run.status,
                   table.attempt == run.attempt,
                   (table.lease_owner == prior) if prior is not None
                   else table.lease_owner.is_(None))
            .values(status="RUNNING",
                    attempt=run.attempt + (0 if same_owner and run.attempt else 1),
                    lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
                    started_at=run.started_at or now, stage="starting", error=None,
                    error_code=None)
        ).rowcount
        if taken != 1:
            return Claim(False, "lost the race", retry_in=1.0)
    return Claim(True, "claimed")


def _finish(session: Session, table: Leased, run_id: int, status: str, code: str | None,
            error: str | None) -> None:
    session.execute(update(table).where(table.id == run_id).values(
        status=status, error_code=code, error=error, finished_at=utcnow(), lease_owner=None,
        lease_expires_at=None, stage=status.lower()))


def finish(sessions: sessionmaker[Session], run_id: int, owner: str, status: str,
           code: str | None = None, error: str | None = None,
           table: Leased = TrainingRun) -> bool:
    """End a job we hold; False if the lease was lost meanwhile."""
    with sessions.begin() as session:
        held = session.scalar(select(table.id).where(
            table.id == run_id, table.lease_owner == owner, table.status == "RUNNING"))
        if held is None:
            return False
        _finish(session, table, run_id, status, code, error)
    return True


def hold(session: Session, table: Leased, row_id: int, owner: str, **values: object) -> None:
    """In the caller's transaction: check we still hold the lease and lock the row.

    Raises ``LeaseLost`` otherwise. Until the caller commits, a competing claim waits on the
    row (PostgreSQL) or the database (SQLite) and then finds the outcome.
    """
    n = session.execute(update(table).where(
        table.id == row_id, table.lease_owner == owner, table.status == "RUNNING")
        .values(**(values or {"lease_owner": owner}))).rowcount
    if n != 1:
        raise LeaseLost


def stale_ids(session: Session, table: Leased, settings: Settings) -> list[tuple[int, str]]:
    """Jobs to re-send, with their status: QUEUED and not sent recently, or RUNNING with a
    dead lease (owner process gone, or lease expired) and not re-sent within a grace period."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.requeue_after_seconds)
    not_recent = or_(table.enqueued_at.is_(None), table.enqueued_at < cutoff)
    found = [(i, "QUEUED") for i in session.scalars(
        select(table.id).where(table.status == "QUEUED", not_recent))]
    running = session.execute(select(
        table.id, table.lease_owner, table.lease_expires_at, table.enqueued_at)
        .where(table.status == "RUNNING")).all()
    lease_grace = timedelta(seconds=max(2, settings.reconcile_interval_seconds // 2))
    for rid, owner, expires, enqueued in running:
        expires, enqueued = _aware(expires), _aware(enqueued)
        dead = owner_dead(owner) or expires is None or expires < now
        if dead and (enqueued is None or enqueued < now - lease_grace):
            found.append((rid, "RUNNING"))
    return found


class Heartbeat:
    """Renews the lease while a job runs and carries progress and cancel requests."""

    def __init__(self, sessions: sessionmaker[Session], run_id: int, owner: str,
                 lease_s: int, table: Leased = TrainingRun) -> None:
        self.sessions, self.run_id, self.owner, self.lease_s = sessions, run_id, owner, lease_s
        self.table = table
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._progress: dict[str, object] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True, name="lease-heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def progress(self, value: float, stage: str, **extra: object) -> None:
        """Record progress and other columns (written with the next beat, and now)."""
        self._progress = {"progress": min(max(value, 0.0), 1.0), "stage": stage, **extra}
        self.beat()

    def beat(self) -> None:
        """Renew the lease once."""
        table = self.table
        values: dict[str, object] = {
            "lease_expires_at": utcnow() + timedelta(seconds=self.lease_s), **self._progress}
        cancel = False
        try:
            with self.sessions.begin() as session:
                n = session.execute(update(table).where(
                    table.id == self.run_id, table.lease_owner == self.owner,
                    table.status == "RUNNING").values(**values)).rowcount
                if table is TrainingRun:
                    cancel = bool(session.scalar(select(TrainingRun.cancel_requested).where(
                        TrainingRun.id == self.run_id)))
        except Exception:  # DB blip: keep training, the next beat retries
            log.warning("lease heartbeat failed for %s %s", table.__tablename__, self.run_id,
                        exc_info=True)
            return
        if n != 1:
            self.lost.set()
        if cancel:
            self.cancelled.set()

    def _loop(self) -> None:
        while not self._stop.wait(max(1.0, self.lease_s / 3)):
            self.beat()
