"""The ``prelabel`` command: serve (API + embedded worker), worker, migrate, create-key."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Annotated

import typer

from service.settings import get_settings

app = typer.Typer(help="prelabel: ML-assisted pre-labeling service", no_args_is_help=True)
log = logging.getLogger("prelabel")


def _prepare() -> None:
    """Create folders, migrate the database, make sure an admin key exists."""
    from service.auth import ensure_admin_key
    from service.db import session_scope
    from service.migrate import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    with session_scope(settings.db_url) as session:
        plain = ensure_admin_key(session, settings.admin_key)
    if plain:
        typer.secho(f"First admin API key (shown once, keep it): {plain}", fg="yellow", err=True)


@app.command()
def migrate() -> None:
    """Apply database migrations."""
    _prepare()


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
    embedded_worker: Annotated[bool, typer.Option(help="also start a worker process")] = True,
) -> None:
    """Start the API (and, by default, a worker process beside it)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    _prepare()
    worker: subprocess.Popen[bytes] | None = None
    if embedded_worker:
        worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"],
                                  env=os.environ.copy())
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so the
    # finally below still stops the worker instead of orphaning it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run("service.app:create_app", factory=True, host=host or settings.host,
                    port=port or settings.port, log_level="info")
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="worker processes")] = None,
    queues: Annotated[str, typer.Option(help="comma-separated queues")] = "train,embed",
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Start a Celery worker (training, embedding, scoring) and its reconciler."""
    from workers.celery_app import make_celery

    settings = get_settings()
    _prepare()
    celery = make_celery(settings)
    celery.worker_main([
        "worker", f"--loglevel={loglevel}", "-Q", queues,
        f"--concurrency={concurrency or settings.worker_concurrency}",
        "--pool=prefork", "--without-mingle", "--without-gossip",
        f"--hostname=prelabel-{os.getpid()}@%h",
    ])


@app.command("create-key")
def create_key_cmd(
    name: str, role: Annotated[str, typer.Option(help="annotator|operator|admin")] = "annotator",
    project: Annotated[int | None, typer.Option(help="limit the key to one project")] = None,
) -> None:
    """Create an API key and print it once."""
    from service.auth import create_key
    from service.db import session_scope

    _prepare()
    with session_scope(get_settings().db_url) as session:
        _, plain = create_key(session, name, role, project)
    typer.echo(plain)


if __name__ == "__main__":
    app()
