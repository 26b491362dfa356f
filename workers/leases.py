"""DB leases on training runs: a run is trained by one worker at a time, a bounded number of times.

The broker may deliver a run's message twice (redelivery after a worker died, the reconciler
re-sending). Every delivery goes through ``claim``: a compare-and-swap on the run row decides
who trains it, and the attempt counter in the row caps retries of runs that kill their worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.tables import TrainingRun, utcnow

log = logging.getLogger(__name__)
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


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


def claim(sessions: sessionmaker[Session], run_id: int, owner: str, lease_s: int) -> Claim:
    """Try to take the run for this delivery."""
    with sessions.begin() as session:
        run = session.get(TrainingRun, run_id)
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
        if run.cancel_requested:
            _finish(session, run_id, "CANCELLED", None, None)
            return Claim(False, "cancelled")
        same_owner = run.status == "RUNNING" and prior == owner
        if not same_owner and run.attempt >= run.max_attempts:
            _finish(session, run_id, "FAILED", "worker_lost",
                    f"the worker died on each of {run.attempt} attempts")
            return Claim(False, "attempts exhausted")
        # compare-and-swap on the state we read, so two deliveries cannot both win
        taken = session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.status == run.status,
                   TrainingRun.attempt == run.attempt,
                   (TrainingRun.lease_owner == prior) if prior is not None
                   else TrainingRun.lease_owner.is_(None))
            .values(status="RUNNING", attempt=run.attempt + (0 if same_owner else 1),
                    lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
                    started_at=run.started_at or now, stage="starting", error=None,
                    error_code=None)
        ).rowcount
        if taken != 1:
            return Claim(False, "lost the race", retry_in=1.0)
    return Claim(True, "claimed")


def _finish(session: Session, run_id: int, status: str, code: str | None,
            error: str | None) -> None:
    session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(
        status=status, error_code=code, error=error, finished_at=utcnow(), lease_owner=None,
        lease_expires_at=None, stage=status.lower()))


def finish(sessions: sessionmaker[Session], run_id: int, owner: str, status: str,
           code: str | None = None, error: str | None = None) -> bool:
    """End a run we hold; False if the lease was lost meanwhile."""
    with sessions.begin() as session:
        held = session.scalar(select(TrainingRun.id).where(
            TrainingRun.id == run_id, TrainingRun.lease_owner == owner,
            TrainingRun.status == "RUNNING"))
        if held is None:
            return False
        _finish(session, run_id, status, code, error)
    return True


class Heartbeat:
    """Renews the lease while a run trains and carries progress and cancel requests."""

    def __init__(self, sessions: sessionmaker[Session], run_id: int, owner: str,
                 lease_s: int) -> None:
        self.sessions, self.run_id, self.owner, self.lease_s = sessions, run_id, owner, lease_s
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._progress: tuple[float, str] | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="lease-heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def progress(self, value: float, stage: str) -> None:
        """Record progress (written with the next beat, and now)."""
        self._progress = (min(max(value, 0.0), 1.0), stage)
        self.beat()

    def beat(self) -> None:
        """Renew the lease once."""
        values: dict[str, object] = {
            "lease_expires_at": utcnow() + timedelta(seconds=self.lease_s)}
        if self._progress is not None:
            values["progress"], values["stage"] = self._progress
        try:
            with self.sessions.begin() as session:
                n = session.execute(update(TrainingRun).where(
                    TrainingRun.id == self.run_id, TrainingRun.lease_owner == self.owner,
                    TrainingRun.status == "RUNNING").values(**values)).rowcount
                cancel = session.scalar(select(TrainingRun.cancel_requested).where(
                    TrainingRun.id == self.run_id))
        except Exception:  # DB blip: keep training, the next beat retries
            log.warning("lease heartbeat failed for run %s", self.run_id, exc_info=True)
            return
        if n != 1:
            self.lost.set()
        if cancel:
            self.cancelled.set()

    def _loop(self) -> None:
        while not self._stop.wait(max(1.0, self.lease_s / 3)):
            self.beat()
