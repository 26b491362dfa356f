"""Per-process worker context, built lazily on first task (never at import)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from models.backbone import backbone_id
from models.onnx_export import export_backbone_onnx
from models.runtime import OnnxModel
from service.db import sessionmaker_for
from service.settings import Settings, get_settings
from service.storage import LocalBlobStore

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What tasks need: settings, sessions, blobs and the embedding model."""

    settings: Settings
    sessions: sessionmaker[Session]
    blobs: LocalBlobStore
    _embedder: OnnxModel | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def backbone(self) -> str:
        return backbone_id()

    def backbone_path(self) -> Path:
        """The exported backbone ONNX file, exported once per data folder."""
        path = self.settings.cache_path / f"{self.backbone}.onnx"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("exporting backbone %s to ONNX", self.backbone)
            export_backbone_onnx(path)  # atomic: concurrent exports are harmless
        return path

    def backbone_bytes(self) -> bytes:
        return self.backbone_path().read_bytes()

    @property
    def embedder(self) -> OnnxModel:
        with self._lock:
            if self._embedder is None:
                self._embedder = OnnxModel(self.backbone_path(),
                                           threads=self.settings.onnx_threads or None)
            return self._embedder


@lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    """The context of this worker process."""
    settings = get_settings()
    return WorkerContext(settings=settings, sessions=sessionmaker_for(settings.db_url),
                         blobs=LocalBlobStore(settings.blob_dir))
