"""Evaluation metrics for classification heads (JSON-serialisable) and threshold choice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
)

Task = Literal["multiclass", "multilabel"]


def _check(task: Task, y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> None:
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(f"probs must be [N, {num_classes}], got {probs.shape}")
    n = probs.shape[0]
    if task == "multiclass":
        if y_true.shape != (n,):
            raise ValueError(f"multiclass y_true must be [N={n}] class indices, got {y_true.shape}")
        if n and (y_true.min() < 0 or y_true.max() >= num_classes):
            raise ValueError(f"class indices must lie in [0, {num_classes})")
    elif task == "multilabel":
        if y_true.shape != (n, num_classes):
            raise ValueError(
                f"multilabel y_true must be [N={n}, {num_classes}], got {y_true.shape}"
            )
    else:
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def classification_metrics(
    task: Task,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    thresholds: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-class precision/recall/AP/support plus accuracy (multiclass) or mAP + micro-F1.

    Multiclass predicts argmax; multilabel predicts ``probs >= thresholds`` (0.5 by default).
    A class with no positives in ``y_true`` gets ``ap = None``.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    _check(task, y_true, probs, num_classes)
    n = probs.shape[0]
    if task == "multiclass":
        onehot = np.zeros((n, num_classes), dtype=np.int64)
        onehot[np.arange(n), y_true.astype(np.int64)] = 1
        predicted = np.zeros_like(onehot)
        predicted[np.arange(n), probs.argmax(axis=1)] = 1
    else:
        onehot = y_true.astype(np.int64)
        thr = np.full(num_classes, 0.5) if thresholds is None else np.asarray(thresholds)
        if thr.shape != (num_classes,):
            raise ValueError(f"thresholds must be [{num_classes}], got {thr.shape}")
        predicted = (probs >= thr).astype(np.int64)
    if n:
        prec, rec, _, _ = precision_recall_fscore_support(
            onehot, predicted, average=None, labels=list(range(num_classes)), zero_division=0.0
        )
    else:
        prec = rec = np.zeros(num_classes)
    support = onehot.sum(axis=0)
    per_class: dict[str, dict[str, float | int | None]] = {}
    aps: list[float | None] = []
    for c, name in enumerate(class_names):
        ap = float(average_precision_score(onehot[:, c], probs[:, c])) if support[c] > 0 else None
        aps.append(ap)
        per_class[name] = {
            "precision": float(prec[c]),
            "recall": float(rec[c]),
            "ap": ap,
            "support": int(support[c]),
        }
    result: dict[str, Any] = {"task": task, "n_images": int(n), "per_class": per_class}
    if task == "multiclass":
        result["accuracy"] = float(np.mean(probs.argmax(axis=1) == y_true)) if n else None
    else:
        result["map"] = _mean_or_none(aps)
        result["micro_f1"] = (
            float(f1_score(onehot, predicted, average="micro", zero_division=0.0)) if n else None
        )
    result["macro_ap"] = _mean_or_none(aps)
    return result


def choose_thresholds(
    y_true: np.ndarray, probs: np.ndarray, default: float = 0.5, min_positives: int = 2
) -> np.ndarray:
    """Per-class threshold maximising F1 on this data; ``default`` where positives are too few.

    The threshold sits halfway between the lowest score kept and the next lower score, so it
    keeps the same F1 here while leaving a margin on new data.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if y_true.shape != probs.shape or probs.ndim != 2:
        raise ValueError(f"y_true and probs must both be [N,C], got {y_true.shape}, {probs.shape}")
    out = np.full(probs.shape[1], default, dtype=np.float32)
    for c in range(probs.shape[1]):
        positives = int(y_true[:, c].sum())
        if positives < max(min_positives, 1):
            continue
        precision, recall, cuts = precision_recall_curve(y_true[:, c], probs[:, c])
        denom = precision[:-1] + recall[:-1]
        f1 = np.divide(
            2 * precision[:-1] * recall[:-1], denom, out=np.zeros_like(denom), where=denom > 0
        )
        best = float(cuts[int(np.argmax(f1))])
        below = probs[:, c][probs[:, c] < best]
        out[c] = (best + below.max()) / 2 if below.size else best
    return out


@dataclass(frozen=True)
class ConfidenceFloor:
    """The least top-class confidence a multiclass suggestion needs, and what it keeps."""

    min_confidence: float  # NOT_SUGGESTED: no cut was precise enough
    precision: float | None  # share of kept held-out predictions that were right
    coverage: float  # share of held-out images that keep a suggestion
    support: int  # held-out predictions the choice rests on


# above any softmax confidence: "suggest nothing" (float32 softmax can round to exactly 1.0)
NOT_SUGGESTED = 1.01


def choose_confidence_floor(y_true: np.ndarray, probs: np.ndarray, min_precision: float,
                            min_kept: int = 5) -> ConfidenceFloor:
    """The lowest top-class confidence cut whose held-out precision is ``min_precision``.

    ``probs`` are predictions on images the model did not train on. A cut keeps the predictions
    at or above it; it counts only if it keeps ``min_kept`` or more (fewer is no evidence).
    The floor sits halfway to the next lower confidence, as in :func:`choose_thresholds`.
    With no such cut the floor is :data:`NOT_SUGGESTED`; with ``min_precision`` 0 it is 0.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    _check("multiclass", y_true, probs, probs.shape[1] if probs.ndim == 2 else 0)
    n = len(y_true)
    conf = probs.max(axis=1) if n else np.zeros(0)
    order = np.argsort(-conf, kind="stable")
    conf = conf[order]
    right = (probs.argmax(axis=1) == y_true)[order] if n else np.zeros(0, bool)
    kept = np.arange(1, n + 1)
    precision = np.cumsum(right) / np.maximum(kept, 1)
    if min_precision <= 0:  # no target: every top class is suggested
        return ConfidenceFloor(0.0, round(float(precision[-1]), 4) if n else None,
                               1.0 if n else 0.0, n)
    # a cut lies between distinct confidences: ties are kept or dropped together
    ok = np.append(conf[1:] < conf[:-1], True) & (kept >= min_kept) & (precision >= min_precision)
    if not ok.any():
        return ConfidenceFloor(NOT_SUGGESTED, None, 0.0, n)
    i = int(np.flatnonzero(ok)[-1])  # the most kept: the lowest cut that is precise enough
    # every held-out prediction qualifies: suggest every top class
    floor = 0.0 if i == n - 1 else float(conf[i] + conf[i + 1]) / 2
    return ConfidenceFloor(round(floor, 6), round(float(precision[i]), 4),
                           round((i + 1) / n, 4), n)
