"""Serving: verified ONNX artifacts of promoted models, cached per process."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from models.constants import INPUT_SIZE
from models.preprocess import to_model_input
from models.runtime import OnnxModel
from service.imaging import load_rgb
from service.prediction import Prediction
from service.storage import LocalBlobStore
from service.tables import ModelVersion


@dataclass
class LoadedModel:
    """A model version's runtime pieces. The pipeline (image -> probs) loads on first use."""

    model_id: int
    version: int
    task: str
    classes: tuple[str, ...]
    thresholds: np.ndarray
    head: OnnxModel
    pipeline_key: str
    pipeline_sha256: str
    _pipeline: OnnxModel | None = None


class ModelCache:
    """LRU of loaded models; artifacts are checked against their stored sha256 on load."""

    def __init__(self, blobs: LocalBlobStore, size: int = 4, threads: int | None = None) -> None:
        self.blobs = blobs
        self.size = size
        self.threads = threads or None
        self._items: OrderedDict[int, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, row: ModelVersion) -> LoadedModel:
        """The loaded model for a version row (loading it if needed)."""
        with self._lock:
            hit = self._items.get(row.id)
            if hit is not None:
                self._items.move_to_end(row.id)
                return hit
        head = OnnxModel(self.blobs.get(row.head_key, row.head_sha256), threads=1)
        loaded = LoadedModel(
            model_id=row.id, version=row.version, task=row.task, classes=tuple(row.classes),
            thresholds=np.asarray(row.thresholds, np.float32), head=head,
            pipeline_key=row.pipeline_key, pipeline_sha256=row.pipeline_sha256,
        )
        with self._lock:
            self._items[row.id] = loaded
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return loaded

    def pipeline(self, model: LoadedModel) -> OnnxModel:
        """The full image -> probabilities graph of a model."""
        if model._pipeline is None:
            data = self.blobs.get(model.pipeline_key, model.pipeline_sha256)
            model._pipeline = OnnxModel(data, threads=self.threads)
        return model._pipeline


def predict_embeddings(model: LoadedModel, vectors: np.ndarray) -> np.ndarray:
    """Class probabilities [N, C] from cached embeddings [N, D]."""
    return model.head.run(np.ascontiguousarray(vectors, dtype=np.float32))


def predict_image_bytes(cache: ModelCache, model: LoadedModel, data: bytes,
                        max_pixels: int) -> np.ndarray:
    """Probabilities [C] for an image that has no cached embedding (already validated)."""
    # same decode path as the embedding worker, so both routes give the same answer
    img = load_rgb(data, max_pixels=max_pixels, draft_size=INPUT_SIZE)
    return predict_rgb(cache, model, img)


def predict_rgb(cache: ModelCache, model: LoadedModel, img: PILImage.Image) -> np.ndarray:
    """Probabilities [C] for an RGB image decoded with ``draft_size=INPUT_SIZE``."""
    return cache.pipeline(model).run(to_model_input(img)[None])[0]


def to_prediction(model: LoadedModel, probs: np.ndarray, width: int, height: int) -> Prediction:
    """Wrap class probabilities in the canonical prediction type."""
    return Prediction(task=model.task, class_names=model.classes, width=width, height=height,
                      scores=np.asarray(probs, np.float32), thresholds=model.thresholds)
