"""One training run: embeddings -> candidates -> validation -> ONNX -> publish -> promotion."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models.heads import train_head
from models.metrics import choose_confidence_floor, choose_thresholds, classification_metrics
from models.onnx_export import build_head_onnx, merge_pipeline
from models.runtime import select_device
from models.views import PREDICTION_VIEWS, VIEWS
from service.storage import model_key, sha256_hex
from service.tables import Image, ModelVersion, Project, ProjectClass, TrainingRun, utcnow
from workers.context import BackboneRef, WorkerContext
from workers.embedding import ensure_embeddings, promoted, score_images
from workers.evaluation import Candidate, assign_folds, compare_with_promoted, out_of_fold
from workers.finetuning import finetune_candidate
from workers.labeled import LabeledSet, RunFailed, load_labeled
from workers.leases import Claim, Heartbeat, LeaseLost, claim, finish, owner_id

log = logging.getLogger(__name__)


class RunCancelled(Exception):
    """An operator cancelled the run."""


def train_run(ctx: WorkerContext, run_id: int) -> Claim | str:
    """Task body of a training run; returns why a delivery was dropped, or the outcome."""
    owner = owner_id()
    taken = claim(ctx.sessions, run_id, owner, ctx.settings.lease_seconds)
    if not taken.ok:
        return taken
    with Heartbeat(ctx.sessions, run_id, owner, ctx.settings.lease_seconds) as hb:
        try:
            return _train(ctx, run_id, owner, hb)
        except RunFailed as exc:
            finish(ctx.sessions, run_id, owner, "FAILED", exc.code, exc.message)
            return "FAILED"
        except RunCancelled:
            finish(ctx.sessions, run_id, owner, "CANCELLED")
            return "CANCELLED"
        except LeaseLost:
            return "lease lost"


def _check(hb: Heartbeat) -> None:
    if hb.lost.is_set():
        raise LeaseLost
    if hb.cancelled.is_set():
        raise RunCancelled


def frozen_candidate(data: LabeledSet, task: str, classes: list[str], device: torch.device,
                     folds: np.ndarray, k: int, hb: Heartbeat) -> Candidate:
    """Linear head on the pretrained embeddings, validated by k-fold cross-validation."""
    oof = None
    if k:
        oof = out_of_fold(data, task, len(classes), device, folds, k, on_fold=lambda f: (
            _check(hb), hb.progress(0.1 + 0.2 * (f + 1) / k, "cross-validating")))
    thresholds = np.full(len(classes), 0.5, np.float32)
    if task == "multilabel" and oof is not None:
        thresholds = choose_thresholds(data.y, oof).astype(np.float32)
    # the served head learns from every label; the folds above measured how well that works
    params = train_head(*data.head_rows(), task, len(classes), device)  # type: ignore[arg-type]
    params.thresholds = thresholds
    every = np.arange(len(data.image_ids))
    if oof is not None:
        metrics = classification_metrics(task, data.y, oof, classes, thresholds)
        metrics["validation"] = (f"{k}-fold cross-validation: each figure comes from a head "
                                 "that did not train on the image")
    else:
        metrics = {"task": task, "n_images": 0,
                   "validation": "too few labels per class to validate (need 2+ per class)"}
    return Candidate("frozen_linear", params, every, every if oof is not None else every[:0],
                     oof, metrics)


def suggestion_floor(data: LabeledSet, cand: Candidate, min_precision: float) -> dict[str, Any]:
    """The confidence a multiclass suggestion needs, chosen on the candidate's held-out
    predictions so that at least ``min_precision`` of the suggestions made are right."""
    if cand.eval_probs is None or not len(cand.eval_idx):
        # nothing to judge by (too few labels to validate): suggest every top class, unvetted
        return {"min_confidence": 0.0, "target_precision": min_precision, "precision": None,
                "coverage": None, "support": 0}
    floor = choose_confidence_floor(data.y[cand.eval_idx], cand.eval_probs, min_precision)
    return {"min_confidence": floor.min_confidence, "target_precision": min_precision,
            "precision": floor.precision, "coverage": floor.coverage, "support": floor.support}


def _train(ctx: WorkerContext, run_id: int, owner: str, hb: Heartbeat) -> str:
    with ctx.sessions() as session:
        run = session.get(TrainingRun, run_id)
        project = session.get(Project, run.project_id) if run else None
        assert run is not None and project is not None
        task = project.task
        classes = list(session.scalars(select(ProjectClass.name).where(
            ProjectClass.project_id == project.id).order_by(ProjectClass.id)))
        if task == "detection":
            return _train_detector(ctx, session, run_id, owner, hb, project.id, classes)
        hb.progress(0.02, "embedding")
        views = list(VIEWS) if ctx.settings.head_views else []
        predict_views = list(PREDICTION_VIEWS) if ctx.settings.prediction_views else []
        data = load_labeled(ctx, session, project, classes, views, predict_views)
        present = np.flatnonzero(data.counts(len(classes)))
        if task == "multiclass" and len(present) < 2:
            raise RunFailed("one_class", "multiclass training needs labels of at least two "
                            f"classes; only {[classes[i] for i in present]} are labeled")
        _check(hb)
        device = select_device(ctx.settings.device)
        session.execute(update(TrainingRun).where(TrainingRun.id == run_id)
                        .values(device=device.type, labels_seen=len(data.image_ids)))
        session.commit()
        folds, k = assign_folds(data, task)
        try:
            frozen = frozen_candidate(data, task, classes, device, folds, k, hb)
            tuned, report = finetune_candidate(
                ctx, session, data, task, classes, device, folds, k, frozen.eval_probs,
                should_stop=lambda: hb.lost.is_set() or hb.cancelled.is_set(),
                progress=lambda p: hb.progress(0.3 + 0.45 * p, "fine-tuning"))
        except ValueError as exc:
            raise RunFailed("degenerate_labels", str(exc)) from exc
        _check(hb)
        cand = tuned or frozen
        cand.metrics.update(labeled_images=len(data.image_ids), folds=k, finetune=report,
                            train_images=len(cand.train_idx))
        if cand is frozen:  # the views its head trained on and averages over (models/views.py)
            cand.metrics.update(head_views=views, prediction_views=predict_views)
        if task == "multiclass":
            cand.metrics["suggestion_floor"] = suggestion_floor(
                data, cand, ctx.settings.suggestion_min_precision)
        if tuned is not None:
            cand.metrics["frozen_cross_validation"] = {
                key: frozen.metrics.get(key) for key in ("accuracy", "map", "macro_ap")}
        promote, note = compare_with_promoted(ctx, session, promoted(session, project.id),
                                              task, classes, data, cand)
        hb.progress(0.8, "exporting")
        ref, keys = _store_artifacts(ctx, project.id, run_id, cand)
        if promote and ref.key is not None:  # serve fast: embed the project with the new backbone
            _check(hb)
            hb.progress(0.85, "embedding with the fine-tuned backbone")
            ids = list(session.scalars(select(Image.id).where(Image.project_id == project.id)))
            ensure_embeddings(ctx, session, ids, ref)
        _check(hb)
        hb.progress(0.95, "publishing")
        model_id = _publish(session, run_id, owner, project.id, task, classes, device.type,
                            ref, keys, cand.kind, [float(t) for t in cand.params.thresholds],
                            cand.metrics, [data.image_ids[i] for i in cand.train_idx],
                            promote, note)
        if promote:
            score_images(ctx, session, project.id)
            session.commit()
        log.info("run %s: model %s %s (%s)", run_id, model_id, cand.kind, note)
    return "SUCCEEDED"


def _store_artifacts(ctx: WorkerContext, project_id: int, run_id: int,
                     cand: Candidate) -> tuple[BackboneRef, dict[str, tuple[str, str]]]:
    """Write head, pipeline (and a fine-tuned backbone) before any row names them."""
    blobs: dict[str, bytes] = {}
    if cand.backbone_onnx is not None:
        blobs["backbone.onnx"] = cand.backbone_onnx
    backbone = cand.backbone_onnx or ctx.backbone_bytes()
    head = build_head_onnx(cand.params.weight, cand.params.bias, cand.params.activation,
                           cand.params.temperature)
    blobs["head.onnx"] = head
    blobs["pipeline.onnx"] = merge_pipeline(backbone, head)
    keys: dict[str, tuple[str, str]] = {}
    for name, data in blobs.items():
        key = model_key(project_id, run_id, name)
        ctx.blobs.put(key, data)
        keys[name] = (key, sha256_hex(data))
    if "backbone.onnx" in keys:
        key, sha = keys["backbone.onnx"]
        return BackboneRef(f"ft-{sha[:24]}", key, sha), keys
    return BackboneRef(ctx.backbone), keys


def _publish(session: Session, run_id: int, owner: str, project_id: int, task: str,
             classes: list[str], device: str, ref: BackboneRef,
             keys: dict[str, tuple[str, str]], kind: str, thresholds: list[float],
             metrics: dict[str, Any], train_ids: list[int], promote: bool, note: str) -> int:
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
    head_key, head_sha = keys.get("head.onnx", (None, None))
    row = ModelVersion(
        project_id=project_id, run_id=run_id, version=version, task=task, classes=classes,
        backbone=ref.id, backbone_key=ref.key, backbone_sha256=ref.sha256, kind=kind,
        device=device, head_key=head_key, head_sha256=head_sha,
        pipeline_key=keys["pipeline.onnx"][0], pipeline_sha256=keys["pipeline.onnx"][1],
        thresholds=thresholds, metrics=metrics, train_image_ids=train_ids, promoted=promote,
        promotion_note=note)
    session.add(row)
    session.flush()
    session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(
        model_id=row.id, progress=1.0, stage="succeeded", finished_at=utcnow(),
        lease_owner=None, lease_expires_at=None))
    session.commit()
    return row.id


def _train_detector(ctx: WorkerContext, session: Session, run_id: int, owner: str,
                    hb: Heartbeat, project_id: int, classes: list[str]) -> str:
    """A detection run: train and validate, store the ONNX pipeline, publish, precompute."""
    from models.detection_train import DetectorTrainingCancelled
    from workers.detection import compare_detectors, score_detection, train_detector_run

    device = select_device(ctx.settings.device)
    labeled = session.scalar(select(func.count()).select_from(Image).where(
        Image.project_id == project_id, Image.labeled.is_(True))) or 0
    session.execute(update(TrainingRun).where(TrainingRun.id == run_id)
                    .values(device=device.type, labels_seen=labeled))
    session.commit()
    log.info("run %s: training a detector on %s", run_id, device)
    try:
        det = train_detector_run(ctx, session, project_id, classes, device,
                                 progress=lambda f, stage: (_check(hb), hb.progress(f, stage)),
                                 should_stop=lambda: hb.lost.is_set() or hb.cancelled.is_set())
    except DetectorTrainingCancelled:
        _check(hb)
        raise
    _check(hb)
    current = promoted(session, project_id)
    promote, note = compare_detectors(ctx, current, det.detector, det.val_items,
                                      det.val_samples, classes)
    key = model_key(project_id, run_id, "detector.onnx")
    ctx.blobs.put(key, det.onnx)  # the artifact exists before any row names it
    keys = {"pipeline.onnx": (key, sha256_hex(det.onnx))}
    _check(hb)
    hb.progress(0.95, "publishing")
    model_id = _publish(session, run_id, owner, project_id, "detection", classes, device.type,
                        BackboneRef(ctx.backbone), keys, "fcos",
                        [float(t) for t in det.thresholds], det.metrics, det.train_ids,
                        promote, note)
    log.info("run %s: detector model %s (%s)", run_id, model_id, note)
    if promote:
        row = session.get(ModelVersion, model_id)
        assert row is not None
        score_detection(ctx, session, row)
    return "SUCCEEDED"
