"""The canonical prediction type; adapters at the edges turn it into API shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """What a model says about one image, in the image's displayed pixel frame.

    For classification ``scores`` holds one confidence per class (model output order) and
    ``thresholds`` the per-class cut used for multilabel tags. Boxes (detection) are ``xywh``
    pixels with a label index and a confidence each.
    """

    task: str
    class_names: tuple[str, ...]
    width: int
    height: int
    scores: np.ndarray
    thresholds: np.ndarray
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box_scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))

    def __post_init__(self) -> None:
        if self.scores.shape != (len(self.class_names),):
            raise ValueError(
                f"scores must have shape ({len(self.class_names)},), got {self.scores.shape}"
            )
        if not (len(self.boxes) == len(self.box_labels) == len(self.box_scores)):
            raise ValueError("boxes, box_labels and box_scores must have the same length")

    def tags(self) -> list[tuple[str, float]]:
        """Suggested tags: the top class (multiclass) or every class over its threshold."""
        if not len(self.class_names) or self.task == "detection":
            return []
        if self.task == "multiclass":
            best = int(np.argmax(self.scores))
            return [(self.class_names[best], float(self.scores[best]))]
        picked = np.flatnonzero(self.scores >= self.thresholds)
        order = picked[np.argsort(-self.scores[picked])]
        return [(self.class_names[i], float(self.scores[i])) for i in order]

    def box_items(self) -> list[tuple[str, float, tuple[float, float, float, float], bool]]:
        """Detections, highest confidence first: (label, confidence, xywh, over threshold)."""
        out = []
        for i in np.argsort(-self.box_scores, kind="stable"):
            label = int(self.box_labels[i])
            conf = float(self.box_scores[i])
            x, y, w, h = (float(v) for v in self.boxes[i])
            out.append((self.class_names[label], conf, (x, y, w, h),
                        conf >= float(self.thresholds[label])))
        return out

    def ranked(self) -> list[tuple[str, float]]:
        """Every class with its confidence, highest first."""
        order = np.argsort(-self.scores, kind="stable")
        return [(self.class_names[i], float(self.scores[i])) for i in order]
