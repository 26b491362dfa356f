"""Detection runs: box labels -> FCOS on the pretrained backbone -> hold-out COCO metrics ->
ONNX -> promotion; and precomputed box suggestions for a project's unlabeled images."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.detection_eval import (
    ClassMatches,
    choose_score_thresholds,
    cross_class_iou,
    detection_metrics,
    image_matches,
    resampled_map50,
)
from models.detection_types import Detections, DetectionSample
from models.runtime import OnnxDetector
from models.uncertainty import detection_uncertainty
from service.db import insert_ignore
from service.imaging import ImageRejected, load_rgb
from service.inference import LoadedModel, detections_to_prediction
from service.storage import BlobMissing
from service.tables import Annotation, Image, ModelVersion, Suggestion
from workers.context import WorkerContext
from workers.evaluation import REFUSE_SHARE, hash_fraction, lower_share
from workers.labeled import RunFailed

if TYPE_CHECKING:  # torch stays out of this module's import
    from models.box_classifier import BoxClassifier, BoxClassifierFit
    from models.detection_train import DetectorTrainResult
    from service.settings import Settings

log = logging.getLogger(__name__)
HOLDOUT_FRACTION = 0.2  # of labeled images, by sha256: an image keeps its side across runs
MIN_HOLDOUT = 2  # below this many labeled images per run nothing is held out
SCORE_COMMIT_EVERY = 16


@dataclass(frozen=True)
class BoxLabel:
    """One labeled image: its row id, sha256 and boxes (xyxy pixels) with class indices."""

    image: Image
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Target:
    """Ground truth of one image for the COCO evaluator."""

    boxes: np.ndarray
    labels: np.ndarray


def load_box_labels(session: Session, project_id: int, classes: list[str]) -> list[BoxLabel]:
    """Current box labels of a project (images with zero boxes included: negatives)."""
    index = {c: i for i, c in enumerate(classes)}
    rows = session.execute(
        select(Image, Annotation.boxes).join(Annotation, Annotation.image_id == Image.id)
        .where(Annotation.project_id == project_id, Annotation.is_current.is_(True))
        .order_by(Image.id)).all()
    out = []
    for image, boxes in rows:
        kept = [b for b in (boxes or []) if b.get("label") in index]
        xyxy = np.asarray([[b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]]
                           for b in kept], np.float32).reshape(-1, 4)
        out.append(BoxLabel(image, xyxy, np.asarray([index[b["label"]] for b in kept],
                                                    np.int64)))
    return out


def split_holdout(items: Sequence[BoxLabel]) -> tuple[list[BoxLabel], list[BoxLabel]]:
    """(train, held out): a stable share of images by sha256, never all of the boxes."""
    if len(items) < MIN_HOLDOUT * 3:
        return list(items), []
    ranked = sorted(items, key=lambda b: hash_fraction(b.image.sha256))
    n_val = max(MIN_HOLDOUT, round(HOLDOUT_FRACTION * len(items)))
    val, train = ranked[:n_val], ranked[n_val:]
    return train, val


def decode_full(ctx: WorkerContext, image: Image) -> np.ndarray | None:
    """A stored image as RGB uint8 [H, W, 3] in its displayed frame (None when unreadable)."""
    try:
        data = ctx.blobs.get(image.storage_key)
        return np.asarray(load_rgb(data, max_pixels=ctx.settings.max_image_pixels))
    except (BlobMissing, ImageRejected) as exc:
        log.warning("image %s cannot be decoded: %s", image.id, exc)
        return None


def training_sample(rgb: np.ndarray, item: BoxLabel, longest: int) -> DetectionSample:
    """A training sample; big photos are shrunk first (the detector would resize them anyway)
    so that a run's images fit in memory."""
    h, w = rgb.shape[:2]
    scale = min(1.0, longest / max(h, w))
    boxes = item.boxes
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = np.asarray(PILImage.fromarray(rgb).resize(size, PILImage.Resampling.BILINEAR))
        boxes = boxes * np.asarray([size[0] / w, size[1] / h] * 2, np.float32)
    return DetectionSample(rgb, boxes, item.labels)


def load_samples(ctx: WorkerContext, items: Sequence[BoxLabel],
                 longest: int | None) -> tuple[list[BoxLabel], list[DetectionSample]]:
    """Decoded samples (full size when ``longest`` is None) and the items they came from."""
    kept, samples = [], []
    for item in items:
        rgb = decode_full(ctx, item.image)
        if rgb is None:
            continue
        kept.append(item)
        samples.append(training_sample(rgb, item, longest) if longest
                       else DetectionSample(rgb, item.boxes, item.labels))
    return kept, samples


def detect_all(detector: OnnxDetector, samples: Sequence[DetectionSample]) -> list[Detections]:
    """The exported detector's output on in-memory images (what serving will answer)."""
    return [detector.predict(s.image) for s in samples]


def evaluate(detector: OnnxDetector, samples: Sequence[DetectionSample], classes: list[str],
             thresholds: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """COCO metrics on held-out samples, with per-class thresholds chosen there if not given."""
    preds = detect_all(detector, samples)
    targets = [Target(s.boxes, s.labels) for s in samples]
    if thresholds is None:
        thresholds = choose_score_thresholds(preds, targets, len(classes))
    return detection_metrics(preds, targets, classes, thresholds), thresholds


def remap(det: Detections, old: Sequence[str], new: Sequence[str]) -> Detections:
    """Detections of a model with class list ``old`` in the class indices of ``new``."""
    lookup = np.asarray([new.index(c) if c in new else -1 for c in old], np.int64)
    labels = lookup[det.labels] if len(det.labels) else det.labels
    keep = labels >= 0
    return Detections(det.boxes[keep], det.scores[keep], labels[keep])


def compare_detectors(ctx: WorkerContext, current: ModelVersion | None, new: OnnxDetector,
                      val: Sequence[BoxLabel], samples: Sequence[DetectionSample],
                      classes: list[str]) -> tuple[bool, str]:
    """Promote unless mAP@.5 is lower, beyond noise, than the promoted model's on held-out
    images that neither model trained on (the rule classification uses, see evaluation.py)."""
    if current is None:
        return True, "first model of the project"
    if current.task != "detection":
        return True, "the promoted model is not a detector; promoted as newer"
    seen = set(current.train_image_ids)
    shared = [s for item, s in zip(val, samples, strict=True) if item.image.id not in seen]
    if not shared:
        return True, "no labeled images unseen by both models; promoted as newer"
    old = ctx.detector(current.id, current.pipeline_key, current.pipeline_sha256)
    targets = [Target(s.boxes, s.labels) for s in shared]
    new_m = image_matches(detect_all(new, shared), targets, len(classes))
    old_m = image_matches([remap(d, current.classes, classes) for d in detect_all(old, shared)],
                          targets, len(classes))
    every = np.ones(len(shared), np.int64)
    new_map, old_map = resampled_map50(new_m, every), resampled_map50(old_m, every)
    if new_map is None or old_map is None:
        return True, "no comparable mAP@.5 on shared images; promoted as newer"
    verdict = (f"mAP@.5 {new_map:.4f} vs promoted v{current.version} {old_map:.4f} on "
               f"{len(shared)} labeled images neither model trained on")
    if new_map + 1e-9 >= old_map:
        return True, "not worse: " + verdict
    share = lower_map_share(new_m, old_m, len(shared))
    verdict += f"; lower in {share:.0%} of paired resamples of them"
    if share < REFUSE_SHARE:
        return True, "promoted, lower within noise: " + verdict
    return False, "kept unpromoted, worse: " + verdict


def lower_map_share(new: Sequence[ClassMatches], old: Sequence[ClassMatches],
                    images: int) -> float:
    """Share of paired bootstrap resamples of the images on which the new detector's mAP@.5 is
    lower than the old one's (resamples without any object are skipped)."""
    def scores(picks: np.ndarray) -> tuple[float | None, float | None]:
        counts = np.bincount(picks, minlength=images)
        return resampled_map50(new, counts), resampled_map50(old, counts)

    return lower_share(images, scores)


def export_bytes(config: Any, state_dict: dict[str, Any],
                 box_classifier: BoxClassifier | None = None) -> bytes:
    """The trained detector (with its crop classifier, if any) as an ONNX pipeline: image in,
    boxes in its pixels out."""
    from models.detection_export import export_detector_onnx

    with tempfile.TemporaryDirectory(prefix="prelabel-det-") as tmp:
        path = Path(tmp) / "detector.onnx"
        export_detector_onnx(config, state_dict, path, box_classifier=box_classifier)
        return path.read_bytes()


def train_budget(settings: Settings) -> float | None:
    """Seconds one detector run may take, crop stage included (None: only the epoch cap)."""
    return settings.detection_train_seconds or None


def fit_crop_stage(ctx: WorkerContext, result: DetectorTrainResult,
                   train: Sequence[DetectionSample], val: Sequence[DetectionSample],
                   num_classes: int, device: Any,
                   should_stop: Callable[[], bool]) -> BoxClassifierFit:
    """Train the crop re-classifier and keep it if it lifts held-out mAP@.5
    (``models.box_classifier``); its decision and figures go into the run record."""
    from models.box_classifier import (
        BoxClassifierConfig,
        BoxClassifierFit,
        crop_stage_reserve,
        fit_box_classifier,
    )
    from models.detector import load_detector, predict_detections

    if not ctx.settings.detection_crop_stage:
        return BoxClassifierFit(None, "turned off (detection_crop_stage)")

    model = load_detector(result.config, result.state_dict).to(device)
    val_dets = predict_detections(model, [s.image for s in val], device)
    budget = train_budget(ctx.settings)
    try:
        config = BoxClassifierConfig(min_gain=ctx.settings.detection_crop_min_gain)
        return fit_box_classifier(train, val, val_dets, num_classes, device, config,
                                  should_stop=should_stop,
                                  budget_s=None if budget is None else crop_stage_reserve(budget))
    except ValueError as exc:  # e.g. the head diverged: the detector alone still serves
        log.warning("crop stage not trained: %s", exc)
        return BoxClassifierFit(None, f"not trained: {exc}")


def train_detector_run(ctx: WorkerContext, session: Session, project_id: int,
                       classes: list[str], device: Any,
                       progress: Callable[[float, str], None],
                       should_stop: Callable[[], bool]) -> DetectorRun:
    """Train, export and validate a detector on a project's current box labels.

    Raises RunFailed with a reason when the labels cannot train a detector.
    """
    from models.box_classifier import crop_stage_reserve
    from models.detection_train import TrainConfig, train_detector
    from models.detector import DetectorConfig, config_for

    items = load_box_labels(session, project_id, classes)
    if not items:
        raise RunFailed("no_labels", "the project has no labeled images")
    if not any(len(i.labels) for i in items):
        raise RunFailed("degenerate_labels", "no labeled image has a box: nothing to detect")
    train_items, val_items = split_holdout(items)
    sizes = DetectorConfig(num_classes=len(classes))  # the input size the detector works at
    progress(0.05, "loading images")
    train_items, train = load_samples(ctx, train_items, longest=round(sizes.max_size * 1.25))
    val_items, val = load_samples(ctx, val_items, longest=None)
    # anchor sizes from the labeled boxes: small objects (cells) get the finest FPN levels
    config = config_for(train, len(classes))
    log.info("detector run: %d training and %d held-out images decoded", len(train), len(val))
    if not any(len(s.labels) for s in train):
        raise RunFailed("degenerate_labels",
                        "no training image has a box (the labeled boxes are all held out)")
    # One intra-op thread on the CPU: in a forked pool process a second OpenMP thread made
    # training ~3x slower whenever the other core was busy (measured: 1.9 vs 6.3 epochs in the
    # same 150 s), and a busy second core is the normal case (API, other worker slot).
    budget = train_budget(ctx.settings)
    if ctx.settings.detection_crop_stage and budget is not None:
        budget -= crop_stage_reserve(budget)  # the whole run stays within the setting
    settings = TrainConfig(time_budget_s=budget,
                           max_epochs=ctx.settings.detection_max_epochs, threads=1)
    try:
        result = train_detector(train, val, config, device, settings,
                                progress=lambda f: progress(0.08 + 0.72 * f, "training"),
                                should_stop=should_stop)
    except ValueError as exc:
        raise RunFailed("degenerate_labels", str(exc)) from exc
    log.info("detector trained on %s: %.1f epochs in %.0f s (%s), best mAP@.5 %s",
             result.device, result.epochs, result.seconds, result.stop_reason, result.best_map50)
    progress(0.80, "crop classifier")
    crops = fit_crop_stage(ctx, result, train, val, len(classes), device, should_stop)
    progress(0.84, "exporting")
    onnx = export_bytes(result.config, result.state_dict, crops.classifier)
    detector = OnnxDetector(onnx, threads=ctx.onnx_threads())
    progress(0.88, "validating")
    history = [vars(h) for h in result.history]
    run_info = {"device": result.device, "epochs": round(result.epochs, 2),
                "best_epoch": round(result.best_epoch, 2), "train_seconds":
                round(result.seconds, 1), "stop_reason": result.stop_reason,
                "head_epochs": result.head_epochs, "head_seconds": result.head_seconds,
                "cached_variants": result.cached_variants,
                "box_classifier": crops.summary(),
                "history": history, "detector": result.config.to_dict()}
    if val:
        metrics, thresholds = evaluate(detector, val, classes)
        metrics["validation"] = (
            f"hold-out: {len(val)} labeled images (a stable {HOLDOUT_FRACTION:.0%} by sha256) "
            "the detector did not train on; they also chose the stopping epoch and the "
            "per-class thresholds")
    else:
        thresholds = np.full(len(classes), 0.3, np.float32)
        metrics = {"n_images": 0, "map": None, "map50": None,
                   "validation": f"too few labeled images to hold any out "
                                 f"(need {MIN_HOLDOUT * 3}+)"}
    metrics.update(task="detection", labeled_images=len(items), train_images=len(train),
                   training=run_info, cross_class_iou=cross_class_iou(items))
    return DetectorRun(onnx, detector, np.asarray(thresholds, np.float32), metrics,
                       [i.image.id for i in train_items], val_items, val)


@dataclass
class DetectorRun:
    """A trained, exported and validated detector, before it is published."""

    onnx: bytes
    detector: OnnxDetector
    thresholds: np.ndarray
    metrics: dict[str, Any]
    train_ids: list[int]
    val_items: list[BoxLabel]
    val_samples: list[DetectionSample]


def score_detection(ctx: WorkerContext, session: Session, row: ModelVersion,
                    image_ids: Sequence[int] | None = None) -> int:
    """Precompute box suggestions (and uncertainty) of unlabeled images with a promoted
    detector; they are stored unserved until a client asks for them."""
    from workers.embedding import suggestion_row

    query = select(Image).where(Image.project_id == row.project_id, Image.labeled.is_(False))
    if image_ids is not None:
        query = query.where(Image.id.in_(image_ids))
    have = set(session.scalars(select(Suggestion.image_id).where(Suggestion.model_id == row.id)))
    # an image already served by this model still needs its uncertainty (order=uncertainty)
    images = [i for i in session.scalars(query.order_by(Image.id))
              if i.id not in have or i.uncertainty_model_id != row.id]
    detector = ctx.detector(row.id, row.pipeline_key, row.pipeline_sha256)
    model = LoadedModel.from_row(row)
    done = 0
    for start in range(0, len(images), SCORE_COMMIT_EVERY):
        rows, scores = [], []
        for image in images[start:start + SCORE_COMMIT_EVERY]:
            rgb = decode_full(ctx, image)
            if rgb is None:
                continue
            det = detector.predict(rgb)
            pred = detections_to_prediction(model, det, rgb.shape[1], rgb.shape[0])
            if image.id not in have:
                rows.append(suggestion_row(row, image.id, pred))
            scores.append({"id": image.id, "uncertainty": detection_uncertainty(
                det.scores, det.labels, model.thresholds), "uncertainty_model_id": row.id})
        if scores:
            insert_ignore(session, Suggestion, rows)  # a client may have been served first
            session.execute(update(Image), scores)
            session.commit()
            done += len(scores)
    return done
