"""Per-process worker context, built lazily on first task (never at import)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from models.backbone import backbone_id
from models.onnx_export import export_backbone_onnx
from models.runtime import OnnxDetector, OnnxModel
from service.db import sessionmaker_for
from service.settings import Settings, get_settings
from service.storage import LocalBlobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneRef:
    """Which embedding a head reads: the pretrained backbone (no key) or a fine-tuned one."""

    id: str
    key: str | None = None
    sha256: str | None = None


@dataclass
class WorkerContext:
    """What tasks need: settings, sessions, blobs and the embedding model."""

    settings: Settings
    sessions: sessionmaker[Session]
    blobs: LocalBlobStore
    _embedders: dict[str, OnnxModel] = field(default_factory=dict)
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

    def head(self, model_id: int, key: str, sha256: str) -> OnnxModel:
        """A model version's head, loaded once per process (checked against its sha256)."""
        name = f"head-{model_id}"
        with self._lock:
            model = self._embedders.get(name)
            if model is None:
                model = OnnxModel(self.blobs.get(key, sha256), threads=1)
                self._embedders[name] = model
            return model

    def detector(self, model_id: int, key: str, sha256: str) -> OnnxDetector:
        """A detection model version's ONNX pipeline, loaded once per process."""
        name = f"detector-{model_id}"
        with self._lock:
            model = self._embedders.get(name)
            if model is None:
                model = OnnxDetector(self.blobs.get(key, sha256), threads=self.onnx_threads())
                self._embedders[name] = model
            assert isinstance(model, OnnxDetector)
            return model

    def onnx_threads(self) -> int:
        """Threads per ONNX session: one worker process per slot splits the cores."""
        return self.settings.onnx_threads or max(
            1, (os.cpu_count() or 1) // max(1, self.settings.worker_concurrency))

    def embedder(self, ref: BackboneRef | None = None) -> OnnxModel:
        """The image -> embedding model: the pretrained one, or a fine-tuned model's own."""
        name = ref.id if ref else self.backbone
        with self._lock:
            model = self._embedders.get(name)
            if model is None:
                threads = self.onnx_threads()
                if ref is None or ref.key is None:
                    model = OnnxModel(self.backbone_path(), threads=threads)
                else:  # only artifacts this service produced, checked against their sha256
                    model = OnnxModel(self.blobs.get(ref.key, ref.sha256), threads=threads)
                self._embedders[name] = model
            return model


@lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    """The context of this worker process."""
    settings = get_settings()
    return WorkerContext(settings=settings, sessions=sessionmaker_for(settings.db_url),
                         blobs=LocalBlobStore(settings.blob_dir))
