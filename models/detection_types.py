"""Detection data types shared by training, evaluation and serving (numpy only, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Detections(NamedTuple):
    """One image's detections: xyxy boxes in original image pixels, scores, 0-based labels."""

    boxes: np.ndarray  # float32 [N,4]
    scores: np.ndarray  # float32 [N]
    labels: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class DetectionSample:
    """An RGB uint8 image [H,W,3] with its boxes (xyxy float pixels) and 0-based class labels.

    A sample with no boxes is a valid negative example. Boxes must be finite with positive width
    and height; parts outside the image are clipped when the sample is used for training.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        image = np.asarray(self.image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"image must be RGB uint8 [H,W,3], got {image.dtype} {image.shape}")
        boxes = np.asarray(self.boxes, dtype=np.float32)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != (boxes.shape[0],):
            raise ValueError(
                f"boxes must be [K,4] and labels [K], got {np.shape(self.boxes)} and "
                f"{np.shape(self.labels)}"
            )
        if not np.isfinite(boxes).all():
            raise ValueError("boxes must be finite (no NaN or infinity)")
        if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            raise ValueError("every box needs x2 > x1 and y2 > y1 (xyxy pixels)")
        if (labels < 0).any():
            raise ValueError("labels must be 0-based class indices (>= 0)")
        object.__setattr__(self, "image", image)
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", labels)


# Names of the exported detector graph's input and outputs (see detection_export.py).
IMAGE_INPUT = "image"  # uint8 [height, width, 3] RGB, the image as decoded
BOXES_OUTPUT = "boxes"  # float32 [N, 4] xyxy in original image pixels
SCORES_OUTPUT = "scores"  # float32 [N], descending
LABELS_OUTPUT = "labels"  # int64 [N], 0-based class index


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [N,M] of xyxy boxes ``a`` [N,4] and ``b`` [M,4]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
