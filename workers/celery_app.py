"""The Celery application: JSON only, late acks, one message at a time for long tasks."""

from __future__ import annotations

from celery import Celery

from service.settings import Settings

TRAIN_QUEUE = "train"
EMBED_QUEUE = "embed"
TRAIN_TASK = "prelabel.train"
EMBED_TASK = "prelabel.embed"
SCORE_TASK = "prelabel.score"
IMPORT_TASK = "prelabel.import_dataset"


def broker_options(settings: Settings) -> tuple[str, dict[str, object]]:
    """Broker URL and transport options (filesystem folders for the embedded default)."""
    if not settings.embedded_broker:
        # long runs exceed the default hour; the DB lease, not this, prevents double training
        return settings.broker_url, {"visibility_timeout": 6 * 3600}
    root = settings.broker_dir
    for sub in ("queue", "processed", "control"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return "filesystem://", {
        "data_folder_in": str(root / "queue"),
        "data_folder_out": str(root / "queue"),
        "processed_folder": str(root / "processed"),
        "control_folder": str(root / "control"),
        "store_processed": False,
    }


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app for these settings (no task code is imported here)."""
    url, options = broker_options(settings)
    app = Celery("prelabel", broker=url, include=["workers.tasks"])
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=EMBED_QUEUE,
        task_routes={TRAIN_TASK: {"queue": TRAIN_QUEUE}, EMBED_TASK: {"queue": EMBED_QUEUE},
                     SCORE_TASK: {"queue": EMBED_QUEUE}, IMPORT_TASK: {"queue": EMBED_QUEUE}},
        worker_enable_remote_control=not settings.embedded_broker,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
