"""The canonical prediction type; adapters at the edges turn it into API shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.detection_types import box_iou_matrix


@dataclass(frozen=True)
class Prediction:
    """What a model says about one image, in the image's displayed pixel frame.

    For classification ``scores`` holds one confidence per class (model output order) and
    ``thresholds`` the per-class cut used for multilabel tags. Boxes (detection) are ``xywh``
    pixels with a label index and a confidence each; a box over its class threshold is not
    suggested when it overlaps a higher-scored suggested box of another class by
    ``cross_class_iou`` or more (one object named twice; 1.0: never). A multiclass top class
    is suggested only at ``min_confidence`` or more (what held-out predictions vouch for).
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
    cross_class_iou: float = 1.0
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        if self.scores.shape != (len(self.class_names),):
            raise ValueError(
                f"scores must have shape ({len(self.class_names)},), got {self.scores.shape}"
            )
        if not (len(self.boxes) == len(self.box_labels) == len(self.box_scores)):
            raise ValueError("boxes, box_labels and box_scores must have the same length")

    def tags(self) -> list[tuple[str, float]]:
        """Suggested tags: the top class (multiclass) or every class over its threshold."""
        return [(name, conf) for name, conf, ok in self.tag_items() if ok]

    def tag_items(self) -> list[tuple[str, float, bool]]:
        """Tag candidates, highest first: (label, confidence, suggested). Multiclass lists its
        top class, suggested only at ``min_confidence``; multilabel the classes over their
        thresholds."""
        if not len(self.class_names) or self.task == "detection":
            return []
        if self.task == "multiclass":
            best = int(np.argmax(self.scores))
            conf = float(self.scores[best])
            return [(self.class_names[best], conf, conf >= self.min_confidence)]
        picked = np.flatnonzero(self.scores >= self.thresholds)
        order = picked[np.argsort(-self.scores[picked])]
        return [(self.class_names[i], float(self.scores[i]), True) for i in order]

    def box_items(self) -> list[tuple[str, float, tuple[float, float, float, float], bool]]:
        """Detections, highest confidence first: (label, confidence, xywh, suggested)."""
        order = np.argsort(-self.box_scores, kind="stable")
        suggested = self._suggested(order)
        out = []
        for i, ok in zip(order, suggested, strict=True):
            x, y, w, h = (float(v) for v in self.boxes[i])
            out.append((self.class_names[int(self.box_labels[i])], float(self.box_scores[i]),
                        (x, y, w, h), ok))
        return out

    def _suggested(self, order: np.ndarray) -> list[bool]:
        """Per box in ``order``: over its class threshold and not a second name of an object."""
        labels = self.box_labels[order]
        over = self.box_scores[order] >= self.thresholds[labels]
        if self.cross_class_iou >= 1.0 or over.sum() < 2:
            return [bool(v) for v in over]
        xywh = self.boxes[order]
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        iou = box_iou_matrix(xyxy, xyxy)
        kept: list[int] = []
        for i in np.flatnonzero(over):
            if any(labels[j] != labels[i] and iou[i, j] >= self.cross_class_iou for j in kept):
                over[i] = False
            else:
                kept.append(int(i))
        return [bool(v) for v in over]

    def ranked(self) -> list[tuple[str, float]]:
        """Every class with its confidence, highest first."""
        order = np.argsort(-self.scores, kind="stable")
        return [(self.class_names[i], float(self.scores[i])) for i in order]
