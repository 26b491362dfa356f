"""Second stage for detectors: re-classify each detected box from a crop of the original image.

The FCOS head decides classes on 64-channel FPN maps of the whole image at 320 px, where a card
is ~110 px and its rank a few pixels. This stage crops each box (RoIAlign, 224 x 224, from the
image at its own resolution), embeds the crop with the frozen pretrained backbone and applies a
linear head trained on crops of the labeled boxes. The detector keeps deciding *where* objects
are (its best score per box after class-agnostic NMS), the crop head *what* they are:
``score(box, class) = detector score x crop probability``. On cards (100 labeled images) this
lifted test mAP@.5 from 0.50 to 0.79 (models/README.md); whether a project uses it is decided on
its validation images (:func:`fit_box_classifier`).

Everything here is traceable, so :class:`RescoredPipeline` exports to ONNX as one graph with the
detector: serving does not change.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import box_iou, nms, roi_align

from models.backbone import Normalize, load_backbone
from models.constants import INPUT_SIZE
from models.detection_eval import detection_metrics
from models.detection_train import DetectorTrainingCancelled
from models.detection_types import Detections, DetectionSample
from models.heads import HeadParams, _single_thread_on_cpu, train_head
from models.views import VIEWS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoxClassifierConfig:
    """How crops are made, learned from and combined with the detector's boxes."""

    # Quarter turns of each crop averaged at inference. Upright only: on cards (100 images)
    # adding the half turn gained ~0.01 val mAP@.5 for twice the cost per box.
    tta_quarter_turns: tuple[int, ...] = (0,)
    # Training views per labeled box: quarter turns 0..3, each also with the box jittered (the
    # detector's boxes are not the labeled ones), then the upright crop under each of the
    # classification head's views (models.views: small turns, mirror, centre crop, brightness).
    # Those 8 lifted crop accuracy at 25 / 50 labeled card images from 0.667 / 0.744 to
    # 0.720 / 0.781 (3 seeds; benchmarks/crop_classifier.py --views). Averaging predictions
    # over views added under a point there, so serving crops stay upright only. Fewer views
    # when there are many boxes: the quarter turns first.
    max_views_per_box: int = 8 + len(VIEWS)
    max_training_views: int = 2400  # caps the embedding cost (~30 crops/s on one CPU thread)
    box_jitter: float = 0.07  # std of the shift and log-scale jitter, relative to the box side
    agnostic_nms: float = 0.5  # IoU at which boxes of different classes are one object
    # Boxes re-classified per image, best first, and the least detector score for it: each
    # crop costs a backbone pass (~10 ms on a CPU core); the rest keep the detector's classes.
    max_boxes: int = 8
    min_box_score: float = 0.1
    score_floor: float = 0.05  # combined scores below this are dropped (the detector's floor)
    max_detections: int = 100
    # Val mAP@.5 gain over the detector alone needed to use the stage: it triples the serving
    # time of an image (bccd: 49 -> 145 ms p50), so noise-sized gains (bccd, 25 images: +0.003)
    # do not pay for it; cards gained 0.10-0.17.
    min_gain: float = 0.02
    seed: int = 0


# Share of a detection run's time budget kept for this stage (at most CROP_STAGE_MAX_S): on
# one CPU thread 100 card images (1,280 training views) took ~60 s to embed and ~10 s to
# validate; the view cap bounds it for big projects.
CROP_STAGE_SHARE = 0.15
CROP_STAGE_MAX_S = 120.0


def crop_stage_reserve(budget_s: float | None) -> float:
    """Seconds of a run's ``budget_s`` to keep for this stage (the detector trains in the rest)."""
    return 0.0 if budget_s is None else min(CROP_STAGE_MAX_S, CROP_STAGE_SHARE * budget_s)


# Crops one CPU thread embeds per second, training views and validation crops alike (measured
# on the 2-core VM with the other core busy: 1,280 views + validation in 59-70 s, 2,400 views
# in 127 s); it sizes the stage to its reserve.
CPU_CROPS_PER_S = 20.0


def views_within(budget_s: float, objects: int, val_detections: Sequence[Detections],
                 config: BoxClassifierConfig) -> int:
    """Training views that fit ``budget_s`` on one CPU thread once the validation crops are
    paid for: at least one per labeled object (the stage then overruns a tiny budget rather
    than train on a subset), at most ``config.max_training_views``."""
    # upper bound of the crops validation classifies: max_boxes per image, plus the padding box
    val_crops = sum(min(config.max_boxes, int((d.scores >= config.min_box_score).sum())) + 1
                    for d in val_detections)
    affordable = int(budget_s * CPU_CROPS_PER_S) - val_crops
    return min(max(affordable, objects), config.max_training_views)


@dataclass
class BoxClassifier:
    """A trained crop head and the settings it was trained with."""

    head: HeadParams
    config: BoxClassifierConfig = field(default_factory=BoxClassifierConfig)
    training_views: int = 0


@dataclass
class BoxClassifierFit:
    """Outcome of :func:`fit_box_classifier`: the head (None if not used) and why."""

    classifier: BoxClassifier | None
    reason: str
    val_map50_detector: float | None = None
    val_map50_rescored: float | None = None
    training_views: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, object]:
        """JSON-ready figures for run records."""
        return {"used": self.classifier is not None, "reason": self.reason,
                "val_map50_detector": self.val_map50_detector,
                "val_map50_rescored": self.val_map50_rescored,
                "training_views": self.training_views, "seconds": round(self.seconds, 1)}


def crop_boxes(image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crops [K,3,224,224] (float, 0-255) of xyxy ``boxes`` [K,4] from a float [3,H,W] image.

    RoIAlign squashes each box to the square (as classification squashes whole images); its
    adaptive sampling averages several points per output pixel when a box is larger than the
    crop, so big photos are not aliased.
    """
    return roi_align(image[None], [boxes.to(image.dtype)], output_size=(INPUT_SIZE, INPUT_SIZE),
                     spatial_scale=1.0, sampling_ratio=0, aligned=True)


_REVERSED = torch.arange(INPUT_SIZE - 1, -1, -1)


def quarter_turns(x: torch.Tensor, turns: int) -> torch.Tensor:
    """``torch.rot90(x, turns, (-2, -1))`` for square 224-px crops, built from ops ONNX has
    (rot90 itself does not export): mirrors are gathers with a constant reversed index."""
    turns %= 4
    if turns == 0:
        return x
    if turns == 2:
        return x[..., _REVERSED, :][..., _REVERSED]
    if turns == 1:
        return x[..., _REVERSED].transpose(-2, -1)
    return x.transpose(-2, -1)[..., _REVERSED]


class CropClassifier(nn.Module):
    """Crops [K,3,224,224] (0-255) -> class probabilities [K,C], averaged over quarter turns."""

    def __init__(self, head: HeadParams, quarter_turns: Sequence[int],
                 backbone: nn.Module | None = None) -> None:
        super().__init__()
        if head.activation != "softmax":
            raise ValueError("the crop head must be a softmax (multiclass) head")
        self.normalize = Normalize()
        self.backbone = (backbone if backbone is not None else load_backbone()).eval()
        self.register_buffer("weight", torch.as_tensor(head.weight, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(head.bias, dtype=torch.float32))
        self.turns = tuple(int(t) % 4 for t in quarter_turns) or (0,)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self.normalize(crops)
        probs = [F.softmax(self.backbone(quarter_turns(x, t))
                           @ self.weight.T + self.bias, dim=1) for t in self.turns]
        return torch.stack(probs).mean(0)

    def classify_boxes(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Class probabilities [K,C] of xyxy ``boxes`` [K,4] in a float [3,H,W] image."""
        return self(crop_boxes(image, boxes))


# (float [3,H,W] image in 0-255, xyxy boxes [K,4]) -> class probabilities [K,C]
BoxProbabilities = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rescore(image: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
            labels: torch.Tensor, classify: BoxProbabilities, config: BoxClassifierConfig
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detector output -> (boxes, scores, labels) with the classes ``classify`` gives
    (:meth:`CropClassifier.classify_boxes`; the crop benchmark also passes an oracle).

    ``image`` is float [3,H,W] in 0-255, the frame the boxes are in. The best-scored boxes
    (class-agnostic NMS, at most ``max_boxes``, at least ``min_box_score``) are re-classified:
    one detection per (box, class) whose combined score reaches the floor. The detector's own
    detections of at least ``min_box_score`` that overlap none of them pass through unchanged.
    Best first.
    """
    top = nms(boxes, scores, config.agnostic_nms)[: config.max_boxes]
    top = top[scores[top] >= config.min_box_score]
    chosen, chosen_scores = boxes[top], scores[top]
    # A box outside every image is appended so the backbone never sees an empty batch
    # (onnxruntime rejects zero-sized convolution inputs) and the overlap test below always
    # has a column; its rows are dropped.
    outside = torch.tensor([[-10.0, -10.0, -9.0, -9.0]], dtype=boxes.dtype, device=boxes.device)
    padded = torch.cat([chosen, outside])
    probs = classify(image, padded)[:-1]
    combined = (chosen_scores[:, None] * probs).reshape(-1)
    num_classes = probs.shape[1]
    order = torch.argsort(combined, descending=True)[: config.max_detections]
    order = order[combined[order] >= config.score_floor]
    # Beyond max_boxes objects the detector's own detections stay; below min_box_score they go
    # (kept, they outranked the re-classified boxes' other classes: test mAP@.5 0.764 vs 0.785).
    rest = (box_iou(boxes, padded) < config.agnostic_nms).all(dim=1) & (
        scores >= config.min_box_score)
    out_boxes = torch.cat([chosen[order // num_classes], boxes[rest]])
    out_scores = torch.cat([combined[order], scores[rest]])
    out_labels = torch.cat([order % num_classes, labels[rest]])
    best = torch.argsort(out_scores, descending=True)[: config.max_detections]
    return out_boxes[best], out_scores[best], out_labels[best]


class RescoredPipeline(nn.Module):
    """uint8 RGB [H,W,3] -> detector boxes re-classified by the crop head (export contract of
    :class:`models.detection_export.DetectorPipeline`)."""

    def __init__(self, detector_pipeline: nn.Module, classifier: BoxClassifier) -> None:
        super().__init__()
        self.detector_pipeline = detector_pipeline.eval()
        self.crop_classifier = CropClassifier(classifier.head, classifier.config.tta_quarter_turns)
        self.config = classifier.config
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, scores, labels = self.detector_pipeline(image)
        pixels = image.permute(2, 0, 1).to(torch.float32)
        return rescore(pixels, boxes, scores, labels, self.crop_classifier.classify_boxes,
                       self.config)


# ---------------------------------------------------------------- training


class CropView(NamedTuple):
    """One training crop: a box of one sample, turned, optionally under a classification view."""

    sample: int
    box: np.ndarray  # xyxy, in the sample's pixels
    turns: int  # quarter turns of the 224-px crop
    view: str | None = None  # a models.views.VIEWS name, applied to the turned crop


# per box: the upright labeled box, 7 turned/jittered ones, then the classification views
_TURN_VIEWS = 8
_VIEW_NAMES = tuple(VIEWS)


def view_of_crop(crop: torch.Tensor, view: str) -> torch.Tensor:
    """A float [3,224,224] crop (0-255) under a classification view, squashed back to 224 px
    (turns expand the canvas like they do for whole images)."""
    size = crop.shape[-1]
    pixels = crop.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    shown = VIEWS[view](Image.fromarray(pixels)).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(shown, np.float32).copy()).permute(2, 0, 1)


def _jitter(box: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    x0, y0, x1, y1 = box.astype(np.float64)
    w, h = x1 - x0, y1 - y0
    dx, dy, sw, sh = rng.normal(0.0, amount, 4)
    cx, cy = (x0 + x1) / 2 + dx * w, (y0 + y1) / 2 + dy * h
    w, h = w * np.exp(sw), h * np.exp(sh)
    return np.asarray([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], np.float32)


def _training_views(samples: Sequence[DetectionSample], config: BoxClassifierConfig,
                    ) -> tuple[list[CropView], np.ndarray]:
    """The training crops and their labels (each box's views in a row)."""
    rng = np.random.default_rng(config.seed)
    objects = [(i, b, int(c)) for i, s in enumerate(samples)
               for b, c in zip(s.boxes, s.labels, strict=True)]
    if not objects:
        return [], np.zeros(0, np.int64)
    per_box = int(np.clip(config.max_training_views // len(objects), 1, config.max_views_per_box))
    if per_box == 1 and len(objects) > config.max_training_views:
        # Too many boxes (thousands of cells): a class-balanced random subset.
        labels = np.asarray([o[2] for o in objects])
        weights = 1.0 / np.bincount(labels)[labels]
        chosen = rng.choice(len(objects), config.max_training_views, replace=False,
                            p=weights / weights.sum())
        objects = [objects[k] for k in sorted(chosen)]
    views, y = [], []
    for i, box, label in objects:
        for v in range(per_box):
            if v < _TURN_VIEWS:
                # view 0 is the labeled box upright; the next ones turn and jitter it
                shown = box if v == 0 else _jitter(box, config.box_jitter, rng)
                views.append(CropView(i, shown, v % 4))
            else:
                views.append(CropView(i, box, 0, _VIEW_NAMES[(v - _TURN_VIEWS) % len(VIEWS)]))
            y.append(label)
    return views, np.asarray(y, np.int64)


def _embed_views(samples: Sequence[DetectionSample], views: Sequence[CropView],
                 backbone: nn.Module, device: torch.device,
                 should_stop: Callable[[], bool] | None, batch_size: int = 32) -> np.ndarray:
    """Embeddings [len(views), 1280] in view order (views come grouped by image)."""
    normalize = Normalize().to(device)
    out: list[torch.Tensor] = []
    crops: list[torch.Tensor] = []

    def flush() -> None:
        if should_stop is not None and should_stop():
            raise DetectorTrainingCancelled
        with torch.inference_mode():
            out.append(backbone(normalize(torch.stack(crops).to(device))).float().cpu())
        crops.clear()

    for i, group in groupby(views, key=lambda view: view.sample):
        of_image = list(group)
        image = torch.tensor(samples[i].image).permute(2, 0, 1).float()  # copies: often read-only
        with torch.inference_mode():
            cut = crop_boxes(image, torch.from_numpy(np.stack([v.box for v in of_image])))
        for row, view in enumerate(of_image):
            crop = quarter_turns(cut[row], view.turns)
            crops.append(crop if view.view is None else view_of_crop(crop, view.view))
            if len(crops) == batch_size:
                flush()
    if crops:
        flush()
    return torch.cat(out).numpy()


def train_box_classifier(samples: Sequence[DetectionSample], num_classes: int,
                         device: torch.device | str = "cpu",
                         config: BoxClassifierConfig | None = None,
                         should_stop: Callable[[], bool] | None = None,
                         backbone: nn.Module | None = None) -> BoxClassifier:
    """Fit the crop head on the labeled boxes of ``samples`` (frozen pretrained backbone;
    ``backbone`` is a loaded one to reuse).

    Raises ValueError when fewer than two classes have boxes and DetectorTrainingCancelled when
    ``should_stop()`` says so.
    """
    config = config or BoxClassifierConfig()
    views, y = _training_views(samples, config)
    if len(np.unique(y)) < 2:
        raise ValueError("the crop classifier needs boxes of at least two classes")
    device = torch.device(device)
    backbone = (backbone if backbone is not None else load_backbone()).to(device).eval()
    x = _embed_views(samples, views, backbone, device, should_stop)
    head = train_head(x, y, "multiclass", num_classes, device)
    return BoxClassifier(head=head, config=config, training_views=len(y))


def rescore_detections(samples: Sequence[DetectionSample], detections: Sequence[Detections],
                       classifier: BoxClassifier, device: torch.device | str = "cpu",
                       backbone: nn.Module | None = None) -> list[Detections]:
    """Eager :func:`rescore` of detector output on in-memory images (evaluation)."""
    device = torch.device(device)
    crop_classifier = CropClassifier(classifier.head, classifier.config.tta_quarter_turns,
                                     backbone)
    crop_classifier.to(device).eval()
    return rescore_all(samples, detections, crop_classifier.classify_boxes, classifier.config,
                       device)


def rescore_all(samples: Sequence[DetectionSample], detections: Sequence[Detections],
                classify: BoxProbabilities, config: BoxClassifierConfig,
                device: torch.device | str = "cpu") -> list[Detections]:
    """:func:`rescore` of each image's detections with any ``classify`` (eager, no grad)."""
    device = torch.device(device)
    out = []
    with torch.inference_mode():
        for sample, det in zip(samples, detections, strict=True):
            image = torch.tensor(sample.image, device=device)
            boxes, scores, labels = rescore(
                image.permute(2, 0, 1).float(), torch.from_numpy(det.boxes).to(device),
                torch.from_numpy(det.scores).to(device), torch.from_numpy(det.labels).to(device),
                classify, config)
            out.append(Detections(boxes.float().cpu().numpy(), scores.float().cpu().numpy(),
                                  labels.cpu().numpy().astype(np.int64)))
    return out


def fit_box_classifier(train: Sequence[DetectionSample], val: Sequence[DetectionSample],
                       val_detections: Sequence[Detections], num_classes: int,
                       device: torch.device | str = "cpu",
                       config: BoxClassifierConfig | None = None,
                       should_stop: Callable[[], bool] | None = None,
                       budget_s: float | None = None) -> BoxClassifierFit:
    """Train the crop head on ``train`` and keep it only if it lifts mAP@.5 on ``val``.

    ``val_detections`` are the detector's own predictions on ``val``. Without validation
    boxes, or with a single class, the stage is not used (nothing to choose by). On the CPU a
    ``budget_s`` caps the training views (:func:`views_within`).
    """
    config = config or BoxClassifierConfig()
    start = time.perf_counter()
    if budget_s is not None and torch.device(device).type == "cpu":
        objects = sum(len(s.labels) for s in train)
        cap = views_within(budget_s, objects, val_detections, config)
        if cap < config.max_training_views:
            logger.info("box classifier: %d training views fit %.0f s", cap, budget_s)
            config = dataclasses.replace(config, max_training_views=cap)
    classes = [str(c) for c in range(num_classes)]
    if num_classes < 2:
        return BoxClassifierFit(None, "one class: nothing to re-classify")
    if not any(len(s.labels) for s in val):
        return BoxClassifierFit(None, "no validation boxes to decide on")
    if len(np.unique(np.concatenate([s.labels for s in train]))) < 2:
        return BoxClassifierFit(None, "training boxes of fewer than two classes")
    # One intra-op thread on the CPU, like detector training in the worker: the other core is
    # normally busy (API, another worker slot), where two threads were slower.
    with _single_thread_on_cpu(torch.device(device)):
        backbone = load_backbone()  # loaded once for training and validation
        classifier = train_box_classifier(train, num_classes, device, config, should_stop,
                                          backbone)
        rescored = rescore_detections(val, val_detections, classifier, device, backbone)
    before = detection_metrics(val_detections, val, classes)["map50"]
    after = detection_metrics(rescored, val, classes)["map50"]
    seconds = time.perf_counter() - start
    gain = (after or 0.0) - (before or 0.0)
    used = after is not None and gain > config.min_gain
    reason = (f"validation mAP@.5 {after or 0.0:.3f} with crop re-classification vs "
              f"{before or 0.0:.3f} from the detector alone: "
              + ("used" if used else f"not used (it must gain more than {config.min_gain})"))
    logger.info("box classifier: %s (%.0f s)", reason, seconds)
    return BoxClassifierFit(classifier if used else None, reason, before, after,
                            classifier.training_views, seconds)
