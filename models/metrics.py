"""Evaluation metrics for classification heads (JSON-serialisable) and threshold choice."""

from __future__ import annotations

from collections.abc import Sequence
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
