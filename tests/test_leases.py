"""Run claims on the real databases: one trainer at a time, bounded attempts, idempotent ends."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db import sessionmaker_for
from service.migrate import upgrade
from service.tables import Project, TrainingRun, utcnow
from workers.leases import Heartbeat, claim, finish


@pytest.fixture
def sessions(db_url: str) -> sessionmaker[Session]:
    upgrade(db_url)
    return sessionmaker_for(db_url)


def new_run(sessions: sessionmaker[Session], **values: object) -> int:
    with sessions.begin() as s:
        p = Project(name="p", task="multiclass")
        s.add(p)
        s.flush()
        run = TrainingRun(project_id=p.id, trigger="manual", max_attempts=2, **values)
        s.add(run)
        s.flush()
        return run.id


def get(sessions: sessionmaker[Session], rid: int) -> TrainingRun:
    with sessions() as s:
        run = s.get(TrainingRun, rid)
        assert run is not None
        return run


def test_second_delivery_waits_for_live_lease(sessions: sessionmaker[Session]) -> None:
    rid = new_run(sessions)
    assert claim(sessions, rid, "hostA:1", 30).ok
    other = claim(sessions, rid, "hostB:2", 30)
    assert not other.ok and other.retry_in is not None and other.retry_in > 20
    run = get(sessions, rid)
    assert (run.status, run.attempt, run.lease_owner) == ("RUNNING", 1, "hostA:1")


def test_expired_lease_is_taken_over_and_counted(sessions: sessionmaker[Session]) -> None:
    rid = new_run(sessions)
    assert claim(sessions, rid, "hostA:1", 30).ok
    with sessions.begin() as s:
        s.get(TrainingRun, rid).lease_expires_at = utcnow() - timedelta(seconds=1)  # type: ignore[union-attr]
    assert claim(sessions, rid, "hostB:2", 30).ok
    run = get(sessions, rid)
    assert (run.attempt, run.lease_owner) == (2, "hostB:2")
    # the first owner lost its lease: it cannot finish the run
    assert not finish(sessions, rid, "hostA:1", "SUCCEEDED")
    assert finish(sessions, rid, "hostB:2", "SUCCEEDED")
    assert get(sessions, rid).status == "SUCCEEDED"


def test_dead_local_owner_is_detected_without_waiting(sessions: sessionmaker[Session]) -> None:
    import socket

    rid = new_run(sessions)
    dead = f"{socket.gethostname()}:{2**22 + 12345}"  # above pid_max on Linux: never alive
    assert claim(sessions, rid, dead, 300).ok
    assert claim(sessions, rid, "hostB:2", 300).ok
    assert get(sessions, rid).attempt == 2


def test_attempts_exhausted_fail_with_worker_lost(sessions: sessionmaker[Session]) -> None:
    rid = new_run(sessions, attempt=2, status="RUNNING", lease_owner="hostA:1",
                  lease_expires_at=utcnow() - timedelta(seconds=5))
    result = claim(sessions, rid, "hostB:2", 30)
    assert not result.ok and result.retry_in is None
    run = get(sessions, rid)
    assert (run.status, run.error_code) == ("FAILED", "worker_lost")
    assert not claim(sessions, rid, "hostC:3", 30).ok  # no redelivery loop
    assert get(sessions, rid).status == "FAILED"


@pytest.mark.parametrize("status", ["SUCCEEDED", "FAILED", "CANCELLED"])
def test_finished_runs_are_dropped(sessions: sessionmaker[Session], status: str) -> None:
    rid = new_run(sessions, status=status)
    assert claim(sessions, rid, "hostA:1", 30).reason == f"already {status}"


def test_cancel_requested_before_start(sessions: sessionmaker[Session]) -> None:
    rid = new_run(sessions, cancel_requested=True)
    assert not claim(sessions, rid, "hostA:1", 30).ok
    assert get(sessions, rid).status == "CANCELLED"


def test_heartbeat_renews_and_sees_cancel(sessions: sessionmaker[Session]) -> None:
    rid = new_run(sessions)
    assert claim(sessions, rid, "hostA:1", 3).ok
    before = get(sessions, rid).lease_expires_at
    with Heartbeat(sessions, rid, "hostA:1", 3) as hb:
        hb.progress(0.5, "training")
        with sessions.begin() as s:
            s.get(TrainingRun, rid).cancel_requested = True  # type: ignore[union-attr]
        hb.beat()
        assert hb.cancelled.is_set() and not hb.lost.is_set()
    run = get(sessions, rid)
    assert run.progress == 0.5 and run.stage == "training"
    assert run.lease_expires_at is not None and before is not None
    assert run.lease_expires_at >= before
