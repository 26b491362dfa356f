"""What an annotator does with a suggestion, given the true label: accept it unchanged or
correct it (and for boxes: how many were kept, moved, relabeled, deleted and added)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

IOU_UNCHANGED = 0.75  # a suggested box this close to the true one is accepted as it is
IOU_MOVED = 0.3  # closer than this (same label): the annotator drags it instead of redrawing


@dataclass
class BoxEdits:
    """The edits that turn the suggested boxes into the true ones."""

    unchanged: int = 0
    moved: int = 0  # right label, adjusted (IoU_MOVED <= IoU < IOU_UNCHANGED)
    relabeled: int = 0  # right place (IoU >= IOU_UNCHANGED), wrong label
    deleted: int = 0  # suggested, nothing there
    added: int = 0  # there, not suggested: drawn by hand

    @property
    def accepted(self) -> bool:
        """True when the suggestion needed no edit at all."""
        return self.moved == self.relabeled == self.deleted == self.added == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def iou(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Intersection over union of two ``x, y, width, height`` pixel boxes."""
    ix = max(0.0, min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"]))
    iy = max(0.0, min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"]))
    inter = ix * iy
    union = a["width"] * a["height"] + b["width"] * b["height"] - inter
    return inter / union if union > 0 else 0.0


def compare_boxes(suggested: Sequence[Mapping[str, Any]], truth: Sequence[Mapping[str, Any]],
                  iou_unchanged: float = IOU_UNCHANGED, iou_moved: float = IOU_MOVED) -> BoxEdits:
    """Match suggested to true boxes greedily by IoU, best pairs first, in three passes:
    same label and IoU >= ``iou_unchanged`` (unchanged), any label at that IoU (relabeled),
    same label and IoU >= ``iou_moved`` (moved). What is left is deleted or added."""
    pairs = sorted(((iou(s, t), i, j) for i, s in enumerate(suggested)
                    for j, t in enumerate(truth)), reverse=True)
    free_s, free_t = set(range(len(suggested))), set(range(len(truth)))
    edits = BoxEdits()

    def take(min_iou: float, same_label: bool | None, field: str) -> None:
        for score, i, j in pairs:
            if score < min_iou:
                break
            if i not in free_s or j not in free_t:
                continue
            same = suggested[i]["label"] == truth[j]["label"]
            if same_label is None or same == same_label:
                free_s.discard(i)
                free_t.discard(j)
                setattr(edits, field, getattr(edits, field) + 1)

    take(iou_unchanged, True, "unchanged")
    take(iou_unchanged, False, "relabeled")
    take(iou_moved, True, "moved")
    edits.deleted, edits.added = len(free_s), len(free_t)
    return edits


def tags_accepted(suggested: Sequence[str], truth: Sequence[str]) -> bool:
    """A tag suggestion is accepted when it is exactly the true set."""
    return set(suggested) == set(truth)
