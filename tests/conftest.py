"""Shared fixtures: real SQLite and PostgreSQL databases, an app client, a worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.db import session_scope
from service.migrate import upgrade
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
PG_ADMIN = os.environ.get("PRELABEL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PRELABEL_TEST_REDIS", "redis://127.0.0.1:6379/9")


def _pg_available() -> bool:
    try:
        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
        return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared cache so the backbone is exported to ONNX once per test session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL at 127.0.0.1:5432 is required in CI")
        pytest.skip("PostgreSQL not reachable")
    name = f"prelabel_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs on SQLite and on PostgreSQL."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def settings_values(tmp_path: Path, db_url: str, cache_dir: Path, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data", "database_url": db_url, "cache_dir": cache_dir,
        "device": "cpu", "lease_seconds": 6, "reconcile_interval_seconds": 2,
        "requeue_after_seconds": 8, "worker_concurrency": 1,
    }
    values.update(extra)
    return values


def env_for(values: dict[str, Any]) -> dict[str, str]:
    """The environment that makes a worker process read the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRELABEL_")}
    env.update({f"PRELABEL_{k.upper()}": str(v) for k, v in values.items()})
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"  # worker logs reach the file as they happen
    return env


class Api:
    """A TestClient bound to the app, with keys of every role."""

    def __init__(self, client: TestClient, settings: Settings, keys: dict[str, str]) -> None:
        self.client, self.settings, self.keys = client, settings, keys

    def h(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def get(self, url: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.get(url, headers=self.h(role), **kw)

    def post(self, url: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.post(url, headers=self.h(role), **kw)


def make_api(values: dict[str, Any]) -> Iterator[Api]:
    settings = Settings(**values)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    keys = {}
    with session_scope(settings.db_url) as session:
        for role in ("annotator", "operator", "admin"):
            keys[role] = create_key(session, f"test {role}", role)[1]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Api(client, settings, keys)


@pytest.fixture
def api(tmp_path: Path, db_url: str, cache_dir: Path) -> Iterator[Api]:
    """The app on a fresh database (SQLite and PostgreSQL), embedded broker, no worker."""
    yield from make_api(settings_values(tmp_path, db_url, cache_dir))


class WorkerProcess:
    """A real ``prelabel worker`` process (Celery prefork) reading the given settings."""

    def __init__(self, values: dict[str, Any], queues: str = "train,embed") -> None:
        self.values = values
        self.log = Path(values["data_dir"]) / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--queues", queues,
             "--concurrency", str(values.get("worker_concurrency", 1))],
            env=env_for(values), stdout=self._fh, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"worker did not start:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        stop_group(self.proc)
        self._fh.close()


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM a process group started with ``start_new_session``; SIGKILL after ``timeout``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def worker_stack(values: dict[str, Any]) -> Iterator[tuple[Api, WorkerProcess]]:
    """The app and a real worker process on the same settings; both stopped afterwards."""
    gen = make_api(values)
    api = next(gen)
    worker = WorkerProcess(values)
    try:
        yield api, worker
    finally:
        worker.stop()
        gen.close()


def flush_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def backend_values(request: pytest.FixtureRequest, backend: str, tmp_path: Path,
                   cache_dir: Path, **extra: Any) -> dict[str, Any]:
    """Settings for ``embedded`` (SQLite + filesystem broker) or ``redis`` (PostgreSQL + Redis)."""
    if backend == "redis":
        flush_redis()
        return settings_values(tmp_path, request.getfixturevalue("postgres_url"), cache_dir,
                               broker_url=REDIS_URL, **extra)
    return settings_values(tmp_path, request.getfixturevalue("sqlite_url"), cache_dir, **extra)
