"""Per-process application context: settings, sessions, blobs, models, queue."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from service.auth import KeyCache
from service.db import sessionmaker_for
from service.inference import ModelCache
from service.queue import JobQueue
from service.settings import Settings
from service.storage import LocalBlobStore


@dataclass
class AppContext:
    """Everything a request handler needs besides the request."""

    settings: Settings
    sessions: sessionmaker[Session]
    blobs: LocalBlobStore
    models: ModelCache
    queue: JobQueue
    keys: KeyCache


def build_context(settings: Settings) -> AppContext:
    """Create the context for these settings (engines and clients are lazy)."""
    blobs = LocalBlobStore(settings.blob_dir)
    return AppContext(
        settings=settings,
        sessions=sessionmaker_for(settings.db_url),
        blobs=blobs,
        models=ModelCache(blobs, threads=settings.onnx_threads or None),
        queue=JobQueue(settings),
        keys=KeyCache(),
    )
