"""Detection metrics with the standard COCO evaluator (pycocotools), and score thresholds.

AP comes from pycocotools only; precision, recall and per-class thresholds reuse its per-image
matches (greedy by score, IoU >= 0.5), so every number agrees with COCO's matching rules.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from models.detection_types import Detections, box_iou_matrix

_IOU50 = 0  # index of IoU 0.5 in COCOeval's iouThrs (0.50:0.05:0.95)
_AREA_ALL = 0  # index of the "all" area range
# Score threshold of a class whose validation data cannot vouch for its boxes (no objects, no
# correct detection, or no cut as precise as MIN_PRECISION): FCOS scores are at most 1, so its
# boxes are not suggested until a later model has the evidence. Before, such a class got 0.4; on
# a first cards detector (30 labels, 6 held-out boxes) two classes did, and on the next 40
# photos its suggestions would have cost an annotator 67% more time than none by the
# simulator's costs (149 boxes to delete for 64 true ones).
NOT_SUGGESTED = 1.0
# A suggested box that is wrong costs a look and a delete (~2.6 s with the simulator's costs),
# a right one saves drawing it (7 s, or 1.9 s when it still needs adjusting): below about half
# right, suggestions cost more than they save. Thresholds only cut where validation precision
# reaches this.
MIN_PRECISION = 0.5
# Different-class boxes that overlap at least this much (IoU) are one object named twice, unless
# the labels themselves overlap that much (see cross_class_iou).
CROSS_CLASS_IOU = 0.5
_CROSS_CLASS_MARGIN = 0.1


class Annotated(Protocol):
    """Ground truth of one image: ``DetectionSample`` and ``VocAnnotation`` both qualify."""

    @property
    def boxes(self) -> np.ndarray: ...  # [K,4] xyxy pixels

    @property
    def labels(self) -> np.ndarray: ...  # [K] 0-based class index


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _coco(
    images: list[dict[str, int]], annotations: list[dict[str, Any]], num_classes: int
) -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _evaluate(
    predictions: Sequence[Detections], targets: Sequence[Annotated], num_classes: int
) -> COCOeval:
    """Run COCOeval (bbox) over paired predictions and targets; returns it accumulated."""
    if len(predictions) != len(targets):
        raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets")
    images = [{"id": i + 1} for i in range(len(targets))]
    gts: list[dict[str, Any]] = []
    dts: list[dict[str, Any]] = []
    for i, (pred, target) in enumerate(zip(predictions, targets, strict=True)):
        for box, label in zip(_xywh(target.boxes), np.asarray(target.labels), strict=True):
            if not 0 <= int(label) < num_classes:
                raise ValueError(f"target label {int(label)} outside [0, {num_classes})")
            gts.append(_annotation(len(gts) + 1, i + 1, int(label), box))
        scores = np.asarray(pred.scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(pred.labels).reshape(-1)
        for box, score, label in zip(_xywh(pred.boxes), scores, labels, strict=True):
            if 0 <= int(label) < num_classes:
                dts.append(_annotation(len(dts) + 1, i + 1, int(label), box, float(score)))
    evaluator = COCOeval(_coco(images, gts, num_classes), _coco(images, dts, num_classes), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _annotation(
    ann_id: int, image_id: int, label: int, xywh: np.ndarray, score: float | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label + 1,
        "bbox": [float(v) for v in xywh],
        "area": float(xywh[2] * xywh[3]),
        "iscrowd": 0,
    }
    if score is not None:
        out["score"] = score
    return out


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def _matches(evaluator: COCOeval, label: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores and true-positive flags (IoU >= 0.5) of one class's detections, and its objects."""
    area = evaluator.params.areaRng[_AREA_ALL]
    scores: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    objects = 0
    for entry in evaluator.evalImgs:
        if entry is None or entry["category_id"] != label + 1 or entry["aRng"] != area:
            continue
        scores.append(np.asarray(entry["dtScores"], dtype=np.float64))
        hits.append(np.asarray(entry["dtMatches"])[_IOU50] > 0)
        objects += int((np.asarray(entry["gtIgnore"]) == 0).sum())
    if not scores:
        return np.zeros(0), np.zeros(0, dtype=bool), objects
    return np.concatenate(scores), np.concatenate(hits).astype(bool), objects


@dataclass(frozen=True)
class ClassMatches:
    """One class's detections matched at IoU 0.5 (COCO's rules), with the image of each."""

    image: np.ndarray  # [D] 0-based image index, in COCO's ranking order (score, then image)
    hits: np.ndarray  # [D] bool
    objects: np.ndarray  # [images] the class's objects in each image


def image_matches(
    predictions: Sequence[Detections], targets: Sequence[Annotated], num_classes: int
) -> list[ClassMatches]:
    """Per class, which detections are right, image by image: enough to recompute mAP@.5 on
    any resample of the images without matching again (matching never crosses images)."""
    evaluator = _evaluate(predictions, targets, num_classes)
    area = evaluator.params.areaRng[_AREA_ALL]
    out = []
    for c in range(num_classes):
        image, scores, hits = [], [], []
        objects = np.zeros(len(targets), np.int64)
        for entry in evaluator.evalImgs:
            if entry is None or entry["category_id"] != c + 1 or entry["aRng"] != area:
                continue
            i = int(entry["image_id"]) - 1
            image.append(np.full(len(entry["dtScores"]), i, np.int64))
            scores.append(np.asarray(entry["dtScores"], np.float64))
            hits.append(np.asarray(entry["dtMatches"])[_IOU50] > 0)
            objects[i] = int((np.asarray(entry["gtIgnore"]) == 0).sum())
        if scores:
            order = np.argsort(-np.concatenate(scores), kind="mergesort")  # as COCO ranks them
            out.append(ClassMatches(np.concatenate(image)[order],
                                    np.concatenate(hits)[order].astype(bool), objects))
        else:
            out.append(ClassMatches(np.zeros(0, np.int64), np.zeros(0, bool), objects))
    return out


def resampled_map50(matches: Sequence[ClassMatches], counts: np.ndarray) -> float | None:
    """COCO mAP@.5 (101 recall points) when image ``i`` is taken ``counts[i]`` times: a
    bootstrap resample of the images :func:`image_matches` saw; None if it has no object."""
    recall_points = np.linspace(0.0, 1.0, 101)
    aps = []
    for m in matches:
        objects = int((m.objects * counts).sum())
        if objects == 0:
            continue  # COCO leaves such a class out of the mean
        hits = np.repeat(m.hits, counts[m.image])
        if not len(hits):
            aps.append(0.0)
            continue
        tp = np.cumsum(hits)
        recall = tp / objects
        precision = tp / np.arange(1, len(hits) + 1)
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope
        at = np.searchsorted(recall, recall_points, side="left")  # recall never reached: 0
        aps.append(np.where(at < len(hits), precision[np.minimum(at, len(hits) - 1)], 0.0).mean())
    return float(np.mean(aps)) if aps else None


def _at_threshold(
    scores: np.ndarray, hits: np.ndarray, objects: int, threshold: float
) -> dict[str, Any]:
    kept = scores >= threshold
    tp = int(hits[kept].sum())
    fp = int(kept.sum()) - tp
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / objects if objects else None
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall > 0
        else 0.0
    )
    return {
        "threshold": float(threshold),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
    }


def detection_metrics(
    predictions: Sequence[Detections],
    targets: Sequence[Annotated],
    class_names: Sequence[str],
    thresholds: np.ndarray | Sequence[float] | None = None,
) -> dict[str, Any]:
    """COCO mAP@[.5:.95] ("map"), mAP@.5 ("map50") and per-class AP, JSON-ready.

    With ``thresholds`` (one score threshold per class) each class also gets precision, recall,
    F1, tp and fp at IoU 0.5 for the detections scoring at least its threshold. Values that are
    undefined (no objects of a class, no detections kept) are None.
    """
    num_classes = len(class_names)
    evaluator = _evaluate(predictions, targets, num_classes)
    precision = evaluator.eval["precision"]  # [IoU, recall, class, area, maxDets]
    per_class: dict[str, dict[str, Any]] = {}
    thr = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if thr is not None and thr.shape != (num_classes,):
        raise ValueError(f"thresholds must be [{num_classes}], got {thr.shape}")
    for c, name in enumerate(class_names):
        scores, hits, objects = _matches(evaluator, c)
        entry: dict[str, Any] = {
            "ap": _mean_valid(precision[:, :, c, _AREA_ALL, -1]),
            "ap50": _mean_valid(precision[_IOU50, :, c, _AREA_ALL, -1]),
            "support": objects,
        }
        if thr is not None:
            entry.update(_at_threshold(scores, hits, objects, float(thr[c])))
        per_class[name] = entry
    stats = evaluator.stats
    return {
        "n_images": len(targets),
        "map": float(stats[0]) if stats[0] > -1 else None,
        "map50": float(stats[1]) if stats[1] > -1 else None,
        "per_class": per_class,
    }


def choose_score_thresholds(
    predictions: Sequence[Detections],
    targets: Sequence[Annotated],
    num_classes: int,
    default: float = NOT_SUGGESTED,
    min_objects: int = 1,
    min_precision: float = MIN_PRECISION,
) -> np.ndarray:
    """Per-class score threshold maximising F1 at IoU 0.5 on (validation) predictions, among
    the cuts whose precision is at least ``min_precision``.

    A class with fewer than ``min_objects`` objects, no correct detection or no cut that
    precise gets ``default`` (by default :data:`NOT_SUGGESTED`). The threshold sits halfway
    between the lowest score kept and the next lower score, so it keeps the same F1 here while
    leaving a margin on new data.
    """
    evaluator = _evaluate(predictions, targets, num_classes)
    out = np.full(num_classes, default, dtype=np.float32)
    for c in range(num_classes):
        scores, hits, objects = _matches(evaluator, c)
        if objects < max(min_objects, 1) or not hits.any():
            continue
        order = np.argsort(-scores, kind="stable")
        scores, hits = scores[order], hits[order]
        tp = np.cumsum(hits)
        kept = np.arange(1, len(scores) + 1)
        f1 = 2 * tp / (kept + objects)
        # Only cut between distinct scores: the last index of each run of equal scores.
        cut = np.append(scores[1:] < scores[:-1], True) & (tp / kept >= min_precision)
        if not cut.any():
            continue
        best = int(np.flatnonzero(cut)[np.argmax(f1[cut])])
        below = scores[best + 1 :]
        out[c] = (scores[best] + below[0]) / 2 if below.size else scores[best]
    return out


def cross_class_iou(samples: Sequence[Annotated]) -> float:
    """IoU at which a suggested box hides a lower-scored one of another class.

    :data:`CROSS_CLASS_IOU`, raised above the largest overlap of two different-class boxes in
    the labels (plus a margin), so that objects the annotators do label on top of each other
    are still both suggested; 1.0 turns the rule off.
    """
    largest = 0.0
    for sample in samples:
        boxes = np.asarray(sample.boxes, np.float64).reshape(-1, 4)
        labels = np.asarray(sample.labels).reshape(-1)
        other = labels[:, None] != labels[None, :]
        if other.any():
            largest = max(largest, float(box_iou_matrix(boxes, boxes)[other].max()))
    return float(min(1.0, max(CROSS_CLASS_IOU, largest + _CROSS_CLASS_MARGIN)))
