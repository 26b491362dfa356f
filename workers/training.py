"""One training run: embeddings -> head -> validation -> ONNX -> publish -> promotion."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models.heads import HeadParams, predict_proba, train_head
from models.metrics import choose_thresholds, classification_metrics
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
MAX_FOLDS = 5
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


def assign_folds(data: LabeledSet, task: str, max_folds: int = MAX_FOLDS) -> tuple[
        np.ndarray, int]:
    """Stable cross-validation folds (stratified by class for multiclass); (fold ids, k).

    k is at most the label count of the rarest labeled class, so every fold's training part
    sees every labeled class; k = 0 when some class has a single label.
    """
    order = np.argsort([hash_fraction(s) for s in data.sha256], kind="stable")
    folds = np.zeros(len(order), np.int64)
    if task == "multiclass":
        counts = np.bincount(data.y)
        k = int(min(max_folds, counts[counts > 0].min()))
        for c in np.flatnonzero(counts):
            members = [i for i in order if data.y[i] == c]
            folds[members] = np.arange(len(members)) % max(k, 1)
    else:
        positives = data.y.sum(axis=0)
        present = positives[positives > 0]
        k = int(min(max_folds, present.min() if present.size else 0, len(order)))
        folds[order] = np.arange(len(order)) % max(k, 1)
    return folds, (k if k >= 2 else 0)


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
                          classes: list[str], data: LabeledSet, oof: np.ndarray | None,
                          thresholds: np.ndarray) -> tuple[bool, str]:
    """Promote unless the candidate is worse than the promoted model on the same images.

    The images are the labeled ones the promoted model never trained on; the candidate is
    judged by its out-of-fold predictions there, so neither side has seen them.
    """
    if current is None:
        return True, "first model of the project"
    seen = set(current.train_image_ids)
    shared = np.array([i for i, iid in enumerate(data.image_ids) if iid not in seen], np.int64)
    if oof is None or len(shared) == 0:
        return True, "no labeled images unseen by the promoted model; promoted as newer"
    head = OnnxModel(ctx.blobs.get(current.head_key, current.head_sha256), threads=1)
    old_raw = head.run(data.x[shared])
    old = np.zeros((len(shared), len(classes)), np.float32)  # old model's classes, new order
    old_thr = np.full(len(classes), 0.5, np.float32)
    for j, name in enumerate(current.classes):
        if name in classes:
            old[:, classes.index(name)] = old_raw[:, j]
            old_thr[classes.index(name)] = current.thresholds[j]
    y = data.y[shared]
    new_score = primary_score(task, classification_metrics(task, y, oof[shared], classes,
                                                           thresholds))
    old_score = primary_score(task, classification_metrics(task, y, old, classes, old_thr))
    if new_score is None or old_score is None:
        return True, "no comparable score on shared images; promoted as newer"
    verdict = (f"{new_score:.4f} vs promoted v{current.version} {old_score:.4f} "
               f"on {len(shared)} labeled images neither model trained on")
    if new_score + 1e-9 >= old_score:
        return True, "not worse: " + verdict
    return False, "kept unpromoted, worse: " + verdict


def out_of_fold(data: LabeledSet, task: str, num_classes: int, device: torch.device,
                hb: Heartbeat) -> tuple[np.ndarray | None, int]:
    """Cross-validated probabilities for every labeled image (None when labels are too few)."""
    folds, k = assign_folds(data, task)
    if k == 0:
        return None, 0
    oof = np.zeros((len(data.image_ids), num_classes), np.float32)
    for f in range(k):
        _check(hb)
        fit, hold = folds != f, folds == f
        params = train_head(data.x[fit], data.y[fit], task, num_classes, device)  # type: ignore[arg-type]
        oof[hold] = predict_proba(params, data.x[hold])
        hb.progress(0.2 + 0.5 * (f + 1) / (k + 1), "cross-validating")
    return oof, k


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
        device = select_device(settings.device)
        session.execute(update(TrainingRun).where(TrainingRun.id == run_id)
                        .values(device=device.type, labels_seen=len(data.image_ids)))
        session.commit()
        hb.progress(0.2, "cross-validating")
        try:
            oof, k = out_of_fold(data, task, len(classes), device, hb)
            thresholds = np.full(len(classes), 0.5, np.float32)
            if task == "multilabel" and oof is not None:
                thresholds = choose_thresholds(data.y, oof).astype(np.float32)
            hb.progress(0.7, "training")
            # the served model learns from every label; CV above measured how well that works
            params: HeadParams = train_head(data.x, data.y, task, len(classes), device)  # type: ignore[arg-type]
            params.thresholds = thresholds
        except ValueError as exc:
            raise RunFailed("degenerate_labels", str(exc)) from exc
        if oof is not None:
            metrics = classification_metrics(task, data.y, oof, classes, thresholds)
        else:
            metrics = {"task": task, "n_images": 0,
                       "note": "too few labels per class to validate (need 2+ per class)"}
        metrics.update(labeled_images=len(data.image_ids), folds=k,
                       validation=f"{k}-fold cross-validation: every figure comes from a model "
                       "that did not train on the image")
        current = promoted(session, project.id)
        promote, note = compare_with_promoted(ctx, current, task, classes, data, oof,
                                              thresholds)
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
                            list(data.image_ids), promote, note)
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
