"""Validation without leakage: stable folds, out-of-fold predictions, promotion decisions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.heads import HeadParams, train_head
from models.metrics import classification_metrics
from service.inference import prediction_views
from service.tables import Embedding, ModelVersion
from workers.context import WorkerContext
from workers.embedding import ensure_embeddings, model_backbone
from workers.labeled import LabeledSet

MAX_FOLDS = 5
# A newer model (trained on more labels) is kept back only when it is worse beyond the noise
# of the few labeled images both can be judged on: lower in at least this share of paired
# bootstrap resamples of them. Refusing on any lower score left a cards simulation (one seed)
# on one model for 60 labels; 3 of its 13 versions were never served.
REFUSE_SHARE = 0.95
BOOTSTRAP = 400


@dataclass
class Candidate:
    """A model a run may publish, with predictions on images it did not train on."""

    kind: str  # frozen_linear | finetuned
    params: HeadParams
    train_idx: np.ndarray  # rows of the labeled set it trained on
    eval_idx: np.ndarray  # rows its eval_probs cover (none of them trained on)
    eval_probs: np.ndarray | None
    metrics: dict[str, Any] = field(default_factory=dict)
    backbone_onnx: bytes | None = None  # a fine-tuned image -> embedding model


def hash_fraction(sha256: str) -> float:
    """A stable number in [0, 1) from an image's content hash."""
    return int(sha256[:8], 16) / 2**32


def assign_folds(data: LabeledSet, task: str, max_folds: int = MAX_FOLDS) -> tuple[
        np.ndarray, int]:
    """Stable cross-validation folds (stratified by class for multiclass); (fold ids, k).

    k is at most the label count of the rarest labeled class, so every fold's training part
    sees every labeled class; k = 0 when some class has a single label. An image keeps its fold
    from run to run while the labels of its class do not change.
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


def out_of_fold(data: LabeledSet, task: str, num_classes: int, device: torch.device,
                folds: np.ndarray, k: int, on_fold: Callable[[int], None]) -> np.ndarray:
    """Probabilities for every labeled image from a head that did not train on it."""
    oof = np.zeros((len(data.image_ids), num_classes), np.float32)
    for f in range(k):
        fit, hold = folds != f, folds == f
        x, y = data.head_rows(np.flatnonzero(fit))
        params = train_head(x, y, task, num_classes, device)  # type: ignore[arg-type]
        oof[hold] = data.predict(params, np.flatnonzero(hold))
        on_fold(f)
    return oof


def primary_score(task: str, metrics: dict[str, Any]) -> float | None:
    """The single number two models are compared on: accuracy or mAP."""
    value = metrics.get("accuracy" if task == "multiclass" else "map")
    return float(value) if isinstance(value, int | float) else None


def score_of(task: str, y: np.ndarray, probs: np.ndarray, classes: list[str],
             thresholds: np.ndarray) -> float | None:
    """Primary score of predictions."""
    return primary_score(task, classification_metrics(task, y, probs, classes, thresholds))


def promoted_probs(ctx: WorkerContext, session: Session, current: ModelVersion,
                   data: LabeledSet, rows: np.ndarray, classes: list[str]) -> tuple[
                       np.ndarray, np.ndarray]:
    """The promoted model's probabilities (and thresholds) on labeled rows, in ``classes`` order."""
    ref = model_backbone(current)
    head = ctx.head(current.id, current.head_key, current.head_sha256)
    if current.backbone_key is None and current.backbone == ctx.backbone:
        # averaged over the views it serves with (models/views.py), where they are loaded
        raw = data.average(head.run, rows, prediction_views(current.metrics or {}))
    else:
        ids = [data.image_ids[i] for i in rows]
        ensure_embeddings(ctx, session, ids, ref)
        vectors = dict(session.execute(select(Embedding.image_id, Embedding.vector).where(
            Embedding.backbone == ref.id, Embedding.image_id.in_(ids))).all())
        raw = head.run(np.stack([np.frombuffer(vectors[i], np.float32) for i in ids]))
    probs = np.zeros((len(rows), len(classes)), np.float32)  # classes it lacks: never predicted
    thresholds = np.full(len(classes), 0.5, np.float32)
    for j, name in enumerate(current.classes):
        if name in classes:
            probs[:, classes.index(name)] = raw[:, j]
            thresholds[classes.index(name)] = current.thresholds[j]
    return probs, thresholds


def compare_with_promoted(ctx: WorkerContext, session: Session, current: ModelVersion | None,
                          task: str, classes: list[str], data: LabeledSet,
                          cand: Candidate) -> tuple[bool, str]:
    """Promote unless the candidate is worse than the promoted model on the same images.

    The images are labeled ones that neither the promoted model nor the candidate trained on
    (the candidate's held-out predictions), so the comparison is fair to both.
    """
    if current is None:
        return True, "first model of the project"
    seen = set(current.train_image_ids)
    keep = [n for n, i in enumerate(cand.eval_idx) if data.image_ids[i] not in seen]
    if cand.eval_probs is None or not keep:
        return True, "no labeled images unseen by both models; promoted as newer"
    rows = cand.eval_idx[keep]
    old, old_thr = promoted_probs(ctx, session, current, data, rows, classes)
    new_score = score_of(task, data.y[rows], cand.eval_probs[keep], classes,
                         cand.params.thresholds)
    old_score = score_of(task, data.y[rows], old, classes, old_thr)
    if new_score is None or old_score is None:
        return True, "no comparable score on shared images; promoted as newer"
    verdict = (f"{new_score:.4f} vs promoted v{current.version} {old_score:.4f} "
               f"on {len(rows)} labeled images neither model trained on")
    if new_score + 1e-9 >= old_score:
        return True, "not worse: " + verdict
    share = worse_share(task, data.y[rows], cand.eval_probs[keep], old)
    verdict += f"; lower in {share:.0%} of paired resamples of them"
    if share < REFUSE_SHARE:
        return True, "promoted, lower within noise: " + verdict
    return False, "kept unpromoted, worse: " + verdict


def bootstrap_picks(n: int) -> np.ndarray:
    """[BOOTSTRAP, n] image indices, one resample per row; seeded, so the same predictions
    always get the same verdict."""
    return np.random.default_rng(0).integers(0, n, size=(BOOTSTRAP, n))


def lower_share(n: int, scores: Callable[[np.ndarray], tuple[float | None, float | None]]
                ) -> float:
    """Share of paired bootstrap resamples of ``n`` images on which the new model scores lower
    than the old one; ``scores(picks)`` gives (new, old) on a resample, None where undefined
    (such resamples are skipped)."""
    lower = total = 0
    for picks in bootstrap_picks(n):
        a, b = scores(picks)
        if a is not None and b is not None:
            total += 1
            lower += a < b - 1e-12
    return lower / total if total else 0.0


def worse_share(task: str, y: np.ndarray, new: np.ndarray, old: np.ndarray) -> float:
    """Share of bootstrap resamples of the shared images on which the candidate scores lower
    than the promoted model (paired: both judged on the same resampled images)."""
    if task == "multiclass":  # accuracy: per-image hits, vectorised
        gain = (new.argmax(1) == y).astype(np.float64) - (old.argmax(1) == y)
        return float((gain[bootstrap_picks(len(y))].mean(axis=1) < -1e-12).mean())
    # mAP: every class's AP on each resample
    return lower_share(len(y), lambda i: (_map(y[i], new[i]), _map(y[i], old[i])))


def _map(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean AP over the classes with a positive (the multilabel primary score; ties in score
    are broken by position, which sklearn averages over: equal on continuous scores)."""
    order = np.argsort(-probs, axis=0, kind="stable")
    hits = np.take_along_axis(np.asarray(y, np.float64), order, axis=0)
    positives = hits.sum(axis=0)
    if not (positives > 0).any():
        return None
    precision_at = np.cumsum(hits, axis=0) / np.arange(1, len(hits) + 1)[:, None]
    ap = (hits * precision_at).sum(axis=0)[positives > 0] / positives[positives > 0]
    return float(ap.mean())
