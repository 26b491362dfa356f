"""Adapters between prelabel's suggestion shape and Label Studio's result items.

Out: a served suggestion (the native shape of the canonical prediction, as stored per model
version) becomes one Label Studio prediction. In: an annotation's result items become the tags
or pixel boxes prelabel records. Label Studio gives boxes in PERCENT of the displayed image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from service.errors import APIError
from service.labelstudio.label_config import LabelMapping


def _pct(value: float, size: int) -> float:
    return round(100.0 * value / size, 4) if size else 0.0


def ls_prediction(payload: Mapping[str, Any], mapping: LabelMapping,
                  model_version: str) -> dict[str, Any]:
    """A suggestion -> ``{"result": [...], "score": s, "model_version": v}``.

    Tags and boxes not suggested (flagged ``below_threshold``) are left out, as in the native
    default. ``score`` is the confidence of the least sure item (what a reviewer has to
    check), 0 when the model suggests nothing.
    """
    items: list[dict[str, Any]] = []
    if mapping.type == "choices":
        tags = [t for t in payload.get("tags") or [] if not t.get("below_threshold")]
        if tags:
            items.append({"from_name": mapping.from_name, "to_name": mapping.to_name,
                          "type": "choices",
                          "score": round(min(t["confidence"] for t in tags), 6),
                          "value": {"choices": [t["label"] for t in tags]}})
    else:
        width, height = int(payload["width"]), int(payload["height"])
        for n, box in enumerate(b for b in payload.get("boxes") or []
                                if not b.get("below_threshold")):
            items.append({
                "id": f"pl{n}", "from_name": mapping.from_name, "to_name": mapping.to_name,
                "type": "rectanglelabels", "original_width": width, "original_height": height,
                "image_rotation": 0, "score": round(float(box["confidence"]), 6),
                "value": {"x": _pct(box["x"], width), "y": _pct(box["y"], height),
                          "width": _pct(box["width"], width),
                          "height": _pct(box["height"], height),
                          "rotation": 0, "rectanglelabels": [box["label"]]},
            })
    score = min((i["score"] for i in items), default=0.0)
    return {"result": items, "score": score, "model_version": model_version}


def _bad(message: str, index: int) -> APIError:
    return APIError(422, "invalid_labelstudio_result", message, {"index": index})


def label_from_result(result: Sequence[Any], mapping: LabelMapping, width: int,
                      height: int) -> tuple[list[str] | None, list[dict[str, Any]] | None]:
    """An annotation's result -> (tags, None) or (None, pixel boxes) for ``mapping``'s control.

    Items of other controls (a comment box, a rating) are not ours and are skipped.
    """
    tags: list[str] = []
    boxes: list[dict[str, Any]] = []
    for n, item in enumerate(result):
        if not isinstance(item, Mapping) or item.get("from_name") != mapping.from_name:
            continue
        value = item.get("value")
        if not isinstance(value, Mapping):
            raise _bad("a result item has no 'value' object", n)
        if mapping.type == "choices":
            choices = value.get("choices")
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise _bad("a choices item needs value.choices, a list of labels", n)
            tags.extend(c for c in choices if c not in tags)
            continue
        labels = value.get("rectanglelabels")
        if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
            raise _bad("a rectangle needs exactly one label in value.rectanglelabels", n)
        try:
            x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
            rotation = float(value.get("rotation") or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad("a rectangle needs numeric value.x, y, width and height", n) from exc
        if abs(rotation) > 1e-6:
            raise APIError(422, "rotated_box_unsupported",
                           "prelabel learns axis-aligned boxes: rotated rectangles cannot be "
                           "recorded", {"index": n, "rotation": rotation})
        boxes.append({"label": labels[0], "x": x * width / 100, "y": y * height / 100,
                      "width": w * width / 100, "height": h * height / 100})
    if mapping.type == "choices":
        return tags, None
    return None, boxes
