"""One training run: embeddings -> head -> validation -> ONNX -> publish -> promotion."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from models.heads import HeadParams, predict_proba, train_head
from models.metrics import choose_thresholds, classification_metrics
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models.onnx_export import build_head_onnx, merge_pipeline
from models.runtime import OnnxModel, select_device
from service.storage import model_key, sha256_hex
from service.tables import (
    Annotation,
    Embedding,
    Image,
    ModelVersion,
    Project,
    ProjectClass,
    TrainingRun,
    utcnow,
)
from workers.context import WorkerContext
from workers.embedding import ensure_embeddings, promoted, score_images
from workers.leases import Claim, Heartbeat, claim, finish, owner_id

log = logging.getLogger(__name__)
MIN_TRAIN_PER_CLASS = 3  # a class keeps at least this many images out of validation
KIND = "frozen_linear"


class RunFailed(Exception):
    """Training cannot produce a model; the run ends FAILED with this code and reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RunCancelled(Exception):
    """An operator cancelled the run."""


class LeaseLost(Exception):
    """Another delivery took the run over; stop without writing."""


@dataclass
class LabeledSet:
    """Labeled images of a project with their embeddings and targets."""

    image_ids: list[int]
    sha256: list[str]
    x: np.ndarray  # [N, D]
    y: np.ndarray  # [N] class index (multiclass) or [N, C] {0, 1} (multilabel)


def hash_fraction(sha256: str) -> float:
    """A stable number in [0, 1) from an image's content hash."""
    return int(sha256[:8], 16) / 2**32


def split(data: LabeledSet, task: str, num_classes: int, fraction: float) -> tuple[
        np.ndarray, np.ndarray]:
    """Stable hold-out split by content hash; every class keeps a few training images.

    The same image stays on the same side across runs, so successive models are compared on
    images none of them trained on.
    """
    frac = np.array([hash_fraction(s) for s in data.sha256])
    val = frac < fraction
    onehot = _onehot(data.y, task, num_classes)
    for i in np.argsort(-frac):  # move back the val images whose classes are short
        if not val[i]:
            continue
        train_counts = onehot[~val].sum(axis=0)
        if np.any((onehot[i] > 0) & (train_counts < MIN_TRAIN_PER_CLASS)):
            val[i] = False
    return np.flatnonzero(~val), np.flatnonzero(val)


def _onehot(y: np.ndarray, task: str, num_classes: int) -> np.ndarray:
    if task == "multilabel":
        return y.astype(np.float32)
    out = np.zeros((len(y), num_classes), np.float32)
    out[np.arange(len(y)), y] = 1
    return out


def load_labeled(ctx: WorkerContext, session: Session, project: Project,
                 classes: list[str]) -> LabeledSet:
    """Current labels with their embeddings (embedding any that are missing)."""
    rows = session.execute(
        select(Annotation.image_id, Annotation.tags, Image.sha256)
        .join(Image, Image.id == Annotation.image_id)
        .where(Annotation.project_id == project.id, Annotation.is_current.is_(True))
        .order_by(Annotation.image_id)).all()
    if not rows:
        raise RunFailed("no_labels", "the project has no labeled images")
    ensure_embeddings(ctx, session, [r[0] for r in rows])
    vectors = dict(session.execute(select(Embedding.image_id, Embedding.vector).where(
        Embedding.backbone == ctx.backbone,
        Embedding.image_id.in_([r[0] for r in rows]))).all())
    index = {c: i for i, c in enumerate(classes)}
    ids, shas, xs, ys = [], [], [], []
    for image_id, tags, sha in rows:
        if image_id not in vectors:
            continue  # unreadable blob: logged by the embedder
        known = [index[t] for t in (tags or []) if t in index]
        if project.task == "multiclass":
            if len(known) != 1:
                continue
            ys.append(known[0])
        else:
            target = np.zeros(len(classes), np.float32)
            target[known] = 1
            ys.append(target)
        ids.append(image_id)
        shas.append(sha)
        xs.append(np.frombuffer(vectors[image_id], np.float32))
    if not ids:
        raise RunFailed("no_labels", "no labeled image could be used")
    return LabeledSet(ids, shas, np.stack(xs), np.asarray(ys))


def primary_score(task: str, metrics: dict[str, object]) -> float | None:
    """The single number two models are compared on."""
    value = metrics.get("accuracy" if task == "multiclass" else "map")
    return float(value) if isinstance(value, int | float) else None


def compare_with_promoted(ctx: WorkerContext, current: ModelVersion | None, task: str,
                          classes: list[str], data: LabeledSet, val: np.ndarray,
                          new_probs: np.ndarray, thresholds: np.ndarray) -> tuple[bool, str]:
    """Promote unless the candidate is worse than the promoted model on the same images."""
    if current is None:
        return True, "first model of the project"
    seen = set(current.train_image_ids)
    shared = np.array([i for i in val if data.image_ids[i] not in seen], dtype=np.int64)
    if len(shared) == 0:
        return True, "no validation images unseen by the promoted model; promoted as newer"
    head = OnnxModel(ctx.blobs.get(current.head_key, current.head_sha256), threads=1)
    old_raw = head.run(data.x[shared])
    old = np.zeros((len(shared), len(classes)), np.float32)  # old model's classes, new order
    old_thr = np.full(len(classes), 0.5, np.float32)
    for j, name in enumerate(current.classes):
        if name in classes:
            old[:, classes.index(name)] = old_raw[:, j]
            old_thr[classes.index(name)] = current.thresholds[j]
    y = data.y[shared]
    new_score = primary_score(task, classification_metrics(
        task, y, new_probs[np.searchsorted(val, shared)], classes, thresholds))
    old_score = primary_score(task, classification_metrics(task, y, old, classes, old_thr))
    if new_score is None or old_score is None:
        return True, "no comparable score on shared validation images; promoted as newer"
    verdict = f"{new_score:.4f} vs promoted v{current.version} {old_score:.4f} " \
              f"on {len(shared)} shared validation images"
    if new_score + 1e-9 >= old_score:
        return True, "not worse: " + verdict
    return False, "kept unpromoted, worse: " + verdict


def _thresholds(task: str, data: LabeledSet, train: np.ndarray,
                num_classes: int, device: object) -> np.ndarray:
    """Per-class thresholds from out-of-fold predictions on the training split (multilabel)."""
    if task != "multilabel" or len(train) < 6:
        return np.full(num_classes, 0.5, np.float32)
    folds = np.arange(len(train)) % 3
    oof = np.zeros((len(train), num_classes), np.float32)
    for k in range(3):
        fit, hold = train[folds != k], train[folds == k]
        try:
            p = train_head(data.x[fit], data.y[fit], "multilabel", num_classes, device)  # type: ignore[arg-type]
        except ValueError:
            return np.full(num_classes, 0.5, np.float32)
        oof[folds == k] = predict_proba(p, data.x[hold])
    return choose_thresholds(data.y[train], oof).astype(np.float32)


def train_run(ctx: WorkerContext, run_id: int) -> Claim | str:
    """Task body of a training run; returns why a delivery was dropped, or the outcome."""
    owner = owner_id()
    taken = claim(ctx.sessions, run_id, owner, ctx.settings.lease_seconds)
    if not taken.ok:
        return taken
    with Heartbeat(ctx.sessions, run_id, owner, ctx.settings.lease_seconds) as hb:
        try:
            outcome = _train(ctx, run_id, owner, hb)
        except RunFailed as exc:
            finish(ctx.sessions, run_id, owner, "FAILED", exc.code, exc.message)
            return "FAILED"
        except RunCancelled:
            finish(ctx.sessions, run_id, owner, "CANCELLED")
            return "CANCELLED"
        except LeaseLost:
            return "lease lost"
    return outcome


def _check(hb: Heartbeat) -> None:
    if hb.lost.is_set():
        raise LeaseLost
    if hb.cancelled.is_set():
        raise RunCancelled


def _train(ctx: WorkerContext, run_id: int, owner: str, hb: Heartbeat) -> str:
    settings = ctx.settings
    with ctx.sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None
        project = session.get(Project, run.project_id)
        assert project is not None
        task = project.task
        if task not in ("multiclass", "multilabel"):
            raise RunFailed("unsupported_task", f"{task} training is not available yet")
        classes = list(session.scalars(select(ProjectClass.name).where(
            ProjectClass.project_id == project.id).order_by(ProjectClass.id)))
        hb.progress(0.05, "embedding")
        data = load_labeled(ctx, session, project, classes)
        present = np.unique(data.y) if task == "multiclass" else np.flatnonzero(data.y.sum(0))
        if task == "multiclass" and len(present) < 2:
            raise RunFailed("one_class", "multiclass training needs labels of at least two "
                            f"classes; only {[classes[i] for i in present]} are labeled")
        _check(hb)
        train, val = split(data, task, len(classes), settings.validation_fraction)
        device = select_device(settings.device)
        session.execute(update(TrainingRun).where(TrainingRun.id == run_id)
                        .values(device=device.type, labels_seen=len(data.image_ids)))
        session.commit()
        hb.progress(0.2, "training")
        try:
            params: HeadParams = train_head(
                data.x[train], data.y[train], task, len(classes), device,  # type: ignore[arg-type]
                progress=lambda p: hb.progress(0.2 + 0.5 * p, "training"))
            params.thresholds = _thresholds(task, data, train, len(classes), device)
        except ValueError as exc:
            raise RunFailed("degenerate_labels", str(exc)) from exc
        _check(hb)
        hb.progress(0.75, "evaluating")
        val_probs = predict_proba(params, data.x[val]) if len(val) else np.zeros((0, 0))
        if len(val):
            metrics = classification_metrics(task, data.y[val], val_probs, classes,
                                             params.thresholds)
        else:
            metrics = {"task": task, "n_images": 0, "note": "no validation images yet"}
        metrics.update(labeled_images=len(data.image_ids), train_images=len(train),
                       validation_images=len(val),
                       validation="stable hold-out by image hash, never trained on")
        current = promoted(session, project.id)
        promote, note = compare_with_promoted(ctx, current, task, classes, data, val,
                                              val_probs, params.thresholds)
        _check(hb)
        hb.progress(0.85, "exporting")
        head = build_head_onnx(params.weight, params.bias, params.activation,
                               params.temperature)
        pipeline = merge_pipeline(ctx.backbone_bytes(), head)
        keys = {name: model_key(project.id, run_id, name) for name in ("head.onnx",
                                                                       "pipeline.onnx")}
        ctx.blobs.put(keys["head.onnx"], head)  # artifacts first, then the row that names them
        ctx.blobs.put(keys["pipeline.onnx"], pipeline)
        _check(hb)
        hb.progress(0.95, "publishing")
        model_id = _publish(ctx, session, run_id, owner, project.id, task, classes, device.type,
                            keys, head, pipeline, params, metrics,
                            [data.image_ids[i] for i in train], promote, note)
        if promote:
            score_images(ctx, session, project.id)
            session.commit()
        log.info("run %s: model %s (%s)", run_id, model_id, note)
    return "SUCCEEDED"


def _publish(ctx: WorkerContext, session: Session, run_id: int, owner: str, project_id: int,
             task: str, classes: list[str], device: str, keys: dict[str, str], head: bytes,
             pipeline: bytes, params: HeadParams, metrics: dict[str, object],
             train_ids: list[int], promote: bool, note: str) -> int:
    """Write the version and end the run in one transaction, only while we hold the lease."""
    held = session.execute(update(TrainingRun).where(
        TrainingRun.id == run_id, TrainingRun.lease_owner == owner,
        TrainingRun.status == "RUNNING").values(status="SUCCEEDED")).rowcount
    if held != 1:
        session.rollback()
        raise LeaseLost
    version = (session.scalar(select(func.max(ModelVersion.version)).where(
        ModelVersion.project_id == project_id)) or 0) + 1
    if promote:
        session.execute(update(ModelVersion).where(ModelVersion.project_id == project_id)
                        .values(promoted=False))
    row = ModelVersion(
        project_id=project_id, run_id=run_id, version=version, task=task, classes=classes,
        backbone=ctx.backbone, kind=KIND, device=device, head_key=keys["head.onnx"],
        head_sha256=sha256_hex(head), pipeline_key=keys["pipeline.onnx"],
        pipeline_sha256=sha256_hex(pipeline), thresholds=[float(t) for t in params.thresholds],
        metrics=metrics, train_image_ids=train_ids, promoted=promote, promotion_note=note)
    session.add(row)
    session.flush()
    session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(
        model_id=row.id, progress=1.0, stage="succeeded", finished_at=utcnow(),
        lease_owner=None, lease_expires_at=None))
    session.commit()
    return row.id
