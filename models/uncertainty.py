"""Per-image uncertainty scores for active learning (higher = more worth labelling)."""

from __future__ import annotations

from typing import Literal

import numpy as np


def uncertainty(
    task: Literal["multiclass", "multilabel"],
    probs: np.ndarray,
    thresholds: np.ndarray | None = None,
) -> np.ndarray:
    """Uncertainty [N] in [0,1].

    multiclass: 1 - (top1 - top2) probability margin.
    multilabel: max over classes of 1 - |p - t| / max(t, 1 - t), i.e. closeness to the threshold.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N,C], got {p.shape}")
    n, num_classes = p.shape
    if num_classes == 0:
        return np.zeros(n, dtype=np.float32)
    if task == "multiclass":
        if num_classes == 1:
            margin = p[:, 0]
        else:
            top2 = np.partition(p, num_classes - 2, axis=1)[:, -2:]
            margin = top2[:, 1] - top2[:, 0]
        score = 1.0 - margin
    elif task == "multilabel":
        t = np.full(num_classes, 0.5) if thresholds is None else np.asarray(thresholds, float)
        if t.shape != (num_classes,):
            raise ValueError(f"thresholds must be [{num_classes}], got {t.shape}")
        scale = np.maximum(t, 1.0 - t)
        score = (1.0 - np.abs(p - t) / scale).max(axis=1)
    else:
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
    return np.clip(score, 0.0, 1.0).astype(np.float32)


def detection_uncertainty(scores: np.ndarray, labels: np.ndarray,
                          thresholds: np.ndarray) -> float:
    """Uncertainty in [0,1] of one image's detections: how close its most doubtful box is to
    its class threshold (1 = exactly at it). No candidate box at all counts as certain (0)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return 0.0
    t = np.asarray(thresholds, dtype=np.float64)[np.asarray(labels, dtype=np.int64).reshape(-1)]
    closeness = 1.0 - np.abs(s - t) / np.maximum(t, 1.0 - t)
    return float(np.clip(closeness.max(), 0.0, 1.0))
