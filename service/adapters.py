"""Adapters from the canonical :class:`Prediction` to the native API's suggestion shape."""

from __future__ import annotations

from typing import Any

from service.prediction import Prediction
from service.schemas import BoxScore, SuggestionOut, TagScore, TagSuggestion


def suggestion_out(pred: Prediction, model_id: int, version: int, suggestion_id: str | None,
                   image_id: int | None) -> SuggestionOut:
    """Canonical prediction -> native API shape (every box, low ones flagged)."""
    boxes = [BoxScore(label=name, confidence=round(conf, 6), x=round(x, 2), y=round(y, 2),
                      width=round(w, 2), height=round(h, 2), below_threshold=not over)
             for name, conf, (x, y, w, h), over in pred.box_items()]
    return SuggestionOut(
        suggestion_id=suggestion_id, image_id=image_id, model_id=model_id,
        model_version=version, width=pred.width, height=pred.height,
        tags=[TagSuggestion(label=n, confidence=round(c, 6), below_threshold=not ok)
              for n, c, ok in pred.tag_items()],
        boxes=boxes,
        scores=[TagScore(label=n, confidence=round(c, 6)) for n, c in pred.ranked()],
    )


def without_low(payload: dict[str, Any]) -> dict[str, Any]:
    """A stored suggestion as served by default: tags and boxes not suggested left out."""
    out = payload
    for key in ("tags", "boxes"):
        items = payload.get(key)
        if items and any(i.get("below_threshold") for i in items):
            out = {**out, key: [i for i in items if not i.get("below_threshold")]}
    return out
