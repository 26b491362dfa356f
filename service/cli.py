"""The ``prelabel`` command: serve (API + embedded worker), worker, migrate, create-key."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from service.settings import Settings, get_settings

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


def _fail(message: str) -> typer.Exit:
    typer.secho(message, fg="red", err=True)
    return typer.Exit(1)


@app.command("import")
def import_cmd(
    path: Annotated[Path, typer.Argument(help="dataset folder, zip/tar archive, or one "
                                              "annotation file (COCO/LS JSON, JSONL, VOC XML)")],
    project: Annotated[int, typer.Option(help="project id")],
    format: Annotated[str, typer.Option(
        "--format", help="coco | voc | yolo | azureml | labelstudio | folders")],
    mapping: Annotated[str | None, typer.Option(
        help="JSON {source class: project class | null}, or @file.json")] = None,
    create_classes: Annotated[bool, typer.Option(help="add classes the project lacks")] = True,
    existing: Annotated[str, typer.Option(help="replace | keep an image's current label")] = (
        "replace"),
    images: Annotated[Path | None, typer.Option(
        help="folder of the images, when PATH is one annotation file")] = None,
) -> None:
    """Import a dataset from a path on this machine (in-process; prints the report)."""
    import json
    import tempfile

    from service.datasets.archive import ArchiveLimits, archive_kind, extract_archive
    from service.datasets.importer import ImportOptions
    from service.datasets.items import IMPORT_FORMATS, ImportFailed
    from service.datasets.jobs import create_job, fail_job, run_job
    from service.db import sessionmaker_for
    from service.queue import JobQueue
    from service.storage import LocalBlobStore
    from service.tables import ImportJob, Project

    if format not in IMPORT_FORMATS:
        raise _fail(f"--format must be one of {', '.join(IMPORT_FORMATS)}")
    if existing not in ("replace", "keep"):
        raise _fail("--existing must be replace or keep")
    if mapping and mapping.startswith("@"):
        mapping = Path(mapping[1:]).read_text()
    try:
        mapped = json.loads(mapping) if mapping else {}
        assert isinstance(mapped, dict)
    except (ValueError, AssertionError) as exc:
        raise _fail("--mapping must be a JSON object") from exc
    settings = get_settings()
    _prepare()
    sessions = sessionmaker_for(settings.db_url)
    blobs = LocalBlobStore(settings.blob_dir)
    path = path.resolve()
    if not path.exists():
        raise _fail(f"{path} does not exist")
    with sessions.begin() as session:
        if session.get(Project, project) is None:
            raise _fail(f"project {project} not found")
        job_id = create_job(session, project, format, ImportOptions(mapped, create_classes,
                                                                    existing),
                            origin="cli", source_name=str(path), status="RUNNING",
                            lease_s=settings.lease_seconds).id
    with tempfile.TemporaryDirectory(dir=_tmp_dir(settings)) as tmp:
        source, annotation_file = path, None
        if path.is_file():
            with path.open("rb") as fh:
                kind = archive_kind(fh.read(512))
            if kind is not None:
                try:
                    source = Path(tmp) / "dataset"
                    extract_archive(path, source, ArchiveLimits.from_settings(settings))
                except ImportFailed as exc:
                    fail_job(sessions, job_id, exc.code, exc.message)
                    raise _fail(f"{exc.code}: {exc.message}") from exc
            else:
                source, annotation_file = (images or path.parent).resolve(), path
        status = run_job(sessions, blobs, settings, JobQueue(settings), job_id, source,
                         annotation_file)
    with sessions() as session:
        row = session.get(ImportJob, job_id)
        assert row is not None
        if row.status != "SUCCEEDED":
            raise _fail(f"import {job_id} {status}: {row.error_code}: {row.error}")
        typer.echo(json.dumps({"import_id": job_id, **(row.report or {})}, indent=2))


def _tmp_dir(settings: Settings) -> Path:
    path = settings.data_dir.resolve() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


@app.command("export")
def export_cmd(
    project: Annotated[int, typer.Option(help="project id")],
    format: Annotated[str, typer.Option(
        "--format", help="coco | voc | yolo | azureml | labelstudio | csv")],
    output: Annotated[Path, typer.Option("--output", "-o", help="the zip file to write")],
    labels: Annotated[str, typer.Option(help="manual | with_suggestions")] = "manual",
    min_confidence: Annotated[float | None, typer.Option(
        help="suggestions: keep classes/boxes at or above this confidence")] = None,
    images: Annotated[str, typer.Option(help="include | reference")] = "include",
    split: Annotated[str | None, typer.Option(help="train,val,test, e.g. 80,10,10")] = None,
    seed: Annotated[int, typer.Option(help="seed of the split")] = 0,
) -> None:
    """Export a project's labels to a zip archive (the same archive as the API's)."""
    import json

    from service.datasets.exporter import ExportOptions, check_options, parse_split, write_export
    from service.datasets.items import EXPORT_FORMATS, ImportFailed
    from service.db import sessionmaker_for
    from service.storage import LocalBlobStore
    from service.tables import Project

    if format not in EXPORT_FORMATS:
        raise _fail(f"--format must be one of {', '.join(EXPORT_FORMATS)}")
    if labels not in ("manual", "with_suggestions") or images not in ("include", "reference"):
        raise _fail("--labels is manual|with_suggestions; --images is include|reference")
    try:
        options = ExportOptions(format, labels, min_confidence, images, parse_split(split), seed)
    except ValueError as exc:
        raise _fail("--split is three non-negative numbers, e.g. 80,10,10") from exc
    settings = get_settings()
    _prepare()
    sessions = sessionmaker_for(settings.db_url)
    with sessions() as session:
        row = session.get(Project, project)
        if row is None:
            raise _fail(f"project {project} not found")
        try:
            check_options(row.task, options)
        except ImportFailed as exc:
            raise _fail(f"{exc.code}: {exc.message}") from exc
    tmp = output.with_name(f".{output.name}.partial")
    try:
        with tmp.open("wb") as fh:
            manifest = write_export(sessions, LocalBlobStore(settings.blob_dir), project,
                                    options, fh.write)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    typer.echo(json.dumps({"output": str(output), "images": manifest["images"],
                           "predicted_images": manifest["predicted_images"],
                           "missing_images": manifest["missing_count"]}))


@app.command("simulate")
def simulate_cmd(
    dataset: Annotated[Path, typer.Argument(help="labeled dataset: folder or zip/tar archive")],
    format: Annotated[str, typer.Option(
        "--format", help="coco | voc | yolo | azureml | labelstudio | folders")],
    task: Annotated[str, typer.Option(help="multiclass | multilabel | detection")],
    out: Annotated[Path, typer.Option(help="folder for the logs, summary and plots")] = Path(
        "simulation"),
    order: Annotated[list[str], typer.Option(
        help="uncertainty | diverse | random | file (repeat the flag for several sessions)"
    )] = ["uncertainty", "diverse", "random"],  # noqa: B006
    url: Annotated[str | None, typer.Option(
        help="a running prelabel; default: start one in a temporary folder")] = None,
    key: Annotated[str | None, typer.Option(help="its admin key (or PRELABEL_ADMIN_KEY)")] = None,
    seed: Annotated[list[int], typer.Option(
        help="seed of the held-out split and upload order; repeat it for several runs (a "
             "folder each) and their means in --out")] = [0],  # noqa: B006
    max_labels: Annotated[int | None, typer.Option(help="stop after this many labels")] = None,
    holdout: Annotated[float, typer.Option(help="share of images held out for the metric")] = 0.2,
    checkpoints: Annotated[str, typer.Option(help="labels per class to evaluate at")] = (
        "5,10,25,50,100"),
    iou: Annotated[float, typer.Option(help="IoU for a box to count as unchanged")] = 0.75,
    cost_tag: Annotated[float, typer.Option(help="s to choose a tag")] = 3.0,
    cost_verify_tag: Annotated[float, typer.Option(help="s to accept a suggested tag")] = 1.0,
    cost_draw_box: Annotated[float, typer.Option(help="s to draw a box")] = 7.0,
    cost_verify_box: Annotated[float, typer.Option(help="s to check a suggested box")] = 1.6,
    cost_adjust_box: Annotated[float, typer.Option(help="s to drag a box into place")] = 3.5,
    cost_relabel_box: Annotated[float, typer.Option(help="s to change a box's label")] = 1.5,
    cost_delete_box: Annotated[float, typer.Option(help="s to delete a box")] = 1.0,
    server_setting: Annotated[list[str], typer.Option(
        help="PRELABEL_NAME=VALUE for the server it starts, e.g. "
             "PRELABEL_SUGGESTION_MIN_PRECISION=0.85 (repeat the flag for several)")] = [],  # noqa: B006
) -> None:
    """Play an annotator over HTTP on a labeled dataset and measure what pre-labeling saves."""
    from service.simulate.aggregate import write_aggregate
    from service.simulate.client import SimulationError
    from service.simulate.driver import embedded_server, simulate
    from service.simulate.report import Costs
    from service.simulate.run import ORDERS, SimConfig

    if task not in ("multiclass", "multilabel", "detection"):
        raise _fail(f"unknown task {task!r}")
    if any(o not in ORDERS for o in order):
        raise _fail(f"--order must be one of {', '.join(ORDERS)}")
    try:
        points = tuple(int(c) for c in checkpoints.split(",") if c.strip())
    except ValueError:
        raise _fail("--checkpoints takes comma-separated integers") from None
    server_env: dict[str, str] = {}
    for item in server_setting:
        name, eq, value = item.partition("=")
        if not eq or not name.startswith("PRELABEL_"):
            raise _fail(f"--server-setting takes PRELABEL_NAME=VALUE, got {item!r}")
        server_env[name] = value
    if server_env and url:
        raise _fail("--server-setting applies to the server simulate starts, not to --url")
    configs = {n: SimConfig(seed=n, max_labels=max_labels, checkpoints=points,
                            iou_unchanged=iou) for n in seed}
    folders = {n: out / f"seed-{n}" if len(seed) > 1 else out for n in seed}
    costs = Costs(cost_tag, cost_verify_tag, cost_draw_box, cost_verify_box, cost_adjust_box,
                  cost_relabel_box, cost_delete_box)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    def run(server: str, admin: str, n: int) -> None:
        summary = simulate(server, admin, dataset, format, task, order, folders[n], configs[n],
                           costs, holdout=holdout)
        typer.echo((folders[n] / "summary.md").read_text())
        typer.echo(f"logs, summary.json and curves.png in {folders[n]} "
                   f"({len(summary['sessions'])} sessions)")

    try:
        for n in seed:
            if url:
                admin = key or os.environ.get("PRELABEL_ADMIN_KEY", "")
                if not admin:
                    raise _fail("--url needs --key (an admin key) or PRELABEL_ADMIN_KEY")
                run(url, admin, n)
            else:  # a fresh server per seed: no model or queue state carries over
                with embedded_server(server_env) as (server, admin):
                    run(server, admin, n)
    except SimulationError as exc:
        raise _fail(f"simulation failed: {exc}") from exc
    if len(seed) > 1:
        write_aggregate(out, list(folders.values()), dataset.name)
        typer.echo((out / "summary.md").read_text())


if __name__ == "__main__":
    app()
