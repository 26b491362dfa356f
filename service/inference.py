"""Serving: verified ONNX artifacts of promoted models, cached per process."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.constants import INPUT_SIZE
from models.detection_types import Detections
from models.preprocess import to_model_input
from models.runtime import OnnxDetector, OnnxModel
from models.views import VIEWS, average_over_views, view_key
from service.imaging import load_rgb
from service.prediction import Prediction
from service.storage import LocalBlobStore
from service.tables import Embedding, ModelVersion

MIN_BOX_SIDE = 1.0  # px: narrower suggested boxes are dropped


@dataclass
class LoadedModel:
    """A model version's runtime pieces. The pipeline (image -> probs) loads on first use."""

    model_id: int
    version: int
    task: str
    classes: tuple[str, ...]
    thresholds: np.ndarray
    head: OnnxModel | None  # classification: the head on cached embeddings
    pipeline_key: str
    pipeline_sha256: str
    cross_class_iou: float = 1.0  # detection: see Prediction
    min_confidence: float = 0.0  # multiclass: see Prediction
    views: tuple[str, ...] = ()  # probabilities averaged over the image and these views
    _pipeline: OnnxModel | None = None
    _detector: OnnxDetector | None = None

    @classmethod
    def from_row(cls, row: ModelVersion, head: OnnxModel | None = None) -> LoadedModel:
        """The runtime description of a version row (the graphs load on first use)."""
        return cls(model_id=row.id, version=row.version, task=row.task,
                   classes=tuple(row.classes), thresholds=np.asarray(row.thresholds, np.float32),
                   head=head, pipeline_key=row.pipeline_key, pipeline_sha256=row.pipeline_sha256,
                   # models published before the rule have no entry: the rule stays off
                   cross_class_iou=float((row.metrics or {}).get("cross_class_iou", 1.0)),
                   min_confidence=min_confidence(row.metrics or {}),
                   views=prediction_views(row.metrics or {}))


def min_confidence(metrics: Mapping[str, Any]) -> float:
    """A version's multiclass suggestion floor (0 for versions published before it existed)."""
    floor = metrics.get("suggestion_floor")
    return float(floor["min_confidence"]) if isinstance(floor, dict) else 0.0


def prediction_views(metrics: Mapping[str, Any]) -> tuple[str, ...]:
    """The views (``models.views``) a version's probabilities are averaged over: none for
    fine-tuned versions and those published before the averaging existed."""
    views = metrics.get("prediction_views")
    return tuple(v for v in views if v in VIEWS) if isinstance(views, list) else ()


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
        head = None
        if row.head_key is not None:
            head = OnnxModel(self.blobs.get(row.head_key, row.head_sha256), threads=1)
        loaded = LoadedModel.from_row(row, head)
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


    def detector(self, model: LoadedModel) -> OnnxDetector:
        """The image -> boxes graph of a detection model."""
        if model._detector is None:
            data = self.blobs.get(model.pipeline_key, model.pipeline_sha256)
            model._detector = OnnxDetector(data, threads=self.threads)
        return model._detector


def predict_embeddings(model: LoadedModel, vectors: np.ndarray,
                       views: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> np.ndarray:
    """Class probabilities [N, C] from cached embeddings [N, D], averaged with those of the
    cached view embeddings given as (row indices, [n, D]) per view."""
    assert model.head is not None, "detection models have no embedding head"
    head = model.head
    return average_over_views(lambda x: head.run(np.ascontiguousarray(x, dtype=np.float32)),
                              vectors, views)


def stored_views(session: Session, backbone: str, views: Sequence[str],
                 image_ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cached embeddings of ``views`` of the images as (row indices into ``image_ids``,
    [n, D]) per view, for ``predict_embeddings``; views not yet embedded are left out."""
    if not views or not image_ids:
        return []
    keys = {view_key(backbone, v) for v in views}
    found = session.execute(select(Embedding.backbone, Embedding.image_id, Embedding.vector)
                            .where(Embedding.backbone.in_(keys),
                                   Embedding.image_id.in_(image_ids))).all()
    index = {image_id: n for n, image_id in enumerate(image_ids)}
    out = []
    for key in sorted(keys):
        hits = [(index[i], vec) for b, i, vec in found if b == key]
        if hits:
            out.append((np.array([r for r, _ in hits]),
                        np.stack([np.frombuffer(v, np.float32) for _, v in hits])))
    return out


def predict_inputs(cache: ModelCache, model: LoadedModel, imgs: list[PILImage.Image],
                   with_views: bool = True) -> np.ndarray:
    """Probabilities [N, C] for decoded RGB images through the whole pipeline, averaged over
    each image and its views as the cached-embedding route averages them (``with_views``)."""
    pipeline = cache.pipeline(model)
    every = np.arange(len(imgs))
    return average_over_views(
        pipeline.run, np.stack([to_model_input(img) for img in imgs]),
        [(every, np.stack([to_model_input(VIEWS[v](img)) for img in imgs]))
         for v in (model.views if with_views else ())])


def predict_images_bytes(cache: ModelCache, model: LoadedModel, images: list[bytes],
                         max_pixels: int, with_views: bool) -> np.ndarray:
    """Probabilities [N, C] for images without cached embeddings (already validated), in one
    graph call (per view, ``with_views``). Same decode path as the embedding worker, so both
    routes give the same answer."""
    return predict_inputs(cache, model, [load_rgb(data, max_pixels=max_pixels,
                                                  draft_size=INPUT_SIZE) for data in images],
                          with_views)


def predict_rgb(cache: ModelCache, model: LoadedModel, img: PILImage.Image,
                with_views: bool = True) -> np.ndarray:
    """Probabilities [C] for an RGB image decoded with ``draft_size=INPUT_SIZE`` (averaged
    over the model's views with ``with_views``)."""
    return predict_inputs(cache, model, [img], with_views)[0]


def to_prediction(model: LoadedModel, probs: np.ndarray, width: int, height: int) -> Prediction:
    """Wrap class probabilities in the canonical prediction type."""
    return Prediction(task=model.task, class_names=model.classes, width=width, height=height,
                      scores=np.asarray(probs, np.float32), thresholds=model.thresholds,
                      min_confidence=model.min_confidence)


def detect_image_bytes(cache: ModelCache, model: LoadedModel, data: bytes,
                       max_pixels: int) -> Prediction:
    """Boxes for a stored image (already validated), decoded at full size in display frame."""
    return detect_rgb(cache, model, load_rgb(data, max_pixels=max_pixels))


def detect_rgb(cache: ModelCache, model: LoadedModel, img: PILImage.Image) -> Prediction:
    """Boxes for a full-size RGB image (in its displayed frame) as a canonical prediction."""
    det = cache.detector(model).predict(np.asarray(img))
    return detections_to_prediction(model, det, img.width, img.height)


def detections_to_prediction(model: LoadedModel, det: Detections, width: int,
                             height: int) -> Prediction:
    """Wrap detector output (xyxy pixels) in the canonical prediction type (xywh).

    ``scores`` holds, per class, the highest confidence of any of its boxes.
    """
    xyxy = np.asarray(det.boxes, np.float32).reshape(-1, 4)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    # boxes the graph clipped to a sliver at the image border carry no object
    keep = (xywh[:, 2] >= MIN_BOX_SIDE) & (xywh[:, 3] >= MIN_BOX_SIDE)
    xywh = xywh[keep]
    labels = np.asarray(det.labels, np.int64)[keep]
    scores = np.asarray(det.scores, np.float32)[keep]
    per_class = np.zeros(len(model.classes), np.float32)
    np.maximum.at(per_class, labels, scores)
    return Prediction(task=model.task, class_names=model.classes, width=width, height=height,
                      scores=per_class, thresholds=model.thresholds, boxes=xywh,
                      box_labels=labels, box_scores=scores,
                      cross_class_iou=model.cross_class_iou)
