"""Adapters from the canonical :class:`Prediction` to the native API's suggestion shape."""

from __future__ import annotations

from typing import Any

from service.prediction import Prediction
from service.schemas import BoxScore, SuggestionOut, TagScore


def suggestion_out(pred: Prediction, model_id: int, version: int, suggestion_id: str | None,
                   image_id: int | None) -> SuggestionOut:
    """Canonical prediction -> native API shape (every box, low ones flagged)."""
    boxes = [BoxScore(label=name, confidence=round(conf, 6), x=round(x, 2), y=round(y, 2),
                      width=round(w, 2), height=round(h, 2), below_threshold=not over)
             for name, conf, (x, y, w, h), over in pred.box_items()]
    return SuggestionOut(
        suggestion_id=suggestion_id, image_id=image_id, model_id=model_id,
        model_version=version, width=pred.width, height=pred.height,
        tags=[TagScore(label=n, confidence=round(c, 6)) for n, c in pred.tags()],
        boxes=boxes,
        scores=[TagScore(label=n, confidence=round(c, 6)) for n, c in pred.ranked()],
    )


def without_low_boxes(payload: dict[str, Any]) -> dict[str, Any]:
    """A stored suggestion as served by default: boxes under their threshold left out."""
    boxes = payload.get("boxes")
    if not boxes or not any(b.get("below_threshold") for b in boxes):
        return payload
    return {**payload, "boxes": [b for b in boxes if not b.get("below_threshold")]}
