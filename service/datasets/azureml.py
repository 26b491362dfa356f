"""Azure ML image JSONL (``MLTable`` data): one JSON object per line.

``{"image_url": ..., "image_details": {"width", "height"}, "label": ...}`` where ``label`` is a
class name (multiclass), a list of names (multilabel) or a list of
``{label, topX, topY, bottomX, bottomY}`` objects with coordinates as fractions of the image
size (detection; an object with ``polygon`` instead is a normalized polygon).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.datasets.files import FileIndex
from service.datasets.items import ExportItem, SourceBox, SourceItem, problem
from service.datasets.writer import SplitFiles, Writer

_PATHS = re.compile(r"^azureml://.*?/paths/")


def read_azureml(index: FileIndex, files: list[Path] | None = None,
                 notes: list[dict[str, Any]] | None = None) -> Iterator[SourceItem]:
    """One item per line of every ``.jsonl`` file."""
    for path in files or index.with_suffix(".jsonl"):
        try:
            rel = index.rel(path.resolve())
        except ValueError:
            rel = path.name
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    if notes is not None:
                        notes.append(problem(rel, "parse_error", f"line {lineno}: {exc}"))
                    continue
                if isinstance(row, dict):
                    yield _row(index, path, f"{rel}:{lineno}", row)


def _px(value: Any) -> int:
    match = re.match(r"^\s*(\d+)", str(value))
    return int(match.group(1)) if match else 0


def _row(index: FileIndex, path: Path, where: str, row: dict[str, Any]) -> SourceItem:
    ref = _PATHS.sub("", str(row.get("image_url") or ""))
    details = row.get("image_details") if isinstance(row.get("image_details"), dict) else {}
    w, h = _px(details.get("width")), _px(details.get("height"))  # type: ignore[union-attr]
    item = SourceItem(file=where, image_ref=ref, declared_size=(w, h) if w and h else None)
    item.image_path, why = index.resolve(ref, near=path.parent)
    if why:
        item.problem("ambiguous_image", why)
    label = row.get("label")
    if isinstance(label, str):
        item.tags = [label]
    elif label == []:  # nothing in the image (detection) / no class (classification)
        item.tags, item.boxes = [], []
    elif isinstance(label, list) and all(isinstance(v, str) for v in label):
        item.tags = list(label)
    elif isinstance(label, list):
        item.boxes = []
        for i, obj in enumerate(label):
            box = _object(item, i, obj)
            if box is not None:
                item.boxes.append(box)
    elif label is not None:
        item.problem("parse_error", "'label' must be a class name, a list of names or a list "
                     "of objects")
    return item


def _finite(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in values)


def _object(item: SourceItem, i: int, obj: Any) -> SourceBox | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
        item.problem("parse_error", "an object needs a 'label' name", obj=i)
        return None
    if obj.get("isCrowd") in (1, True, "1"):
        item.problem("crowd_skipped", "a crowd region is not an object", obj=i)
        return None
    poly = obj.get("polygon")
    if isinstance(poly, list) and poly:
        flat = poly[0] if isinstance(poly[0], list) else poly
        if len(poly) > 1 and isinstance(poly[0], list):
            item.problem("polygon_parts", f"a polygon in {len(poly)} parts: the first is kept",
                         obj=i)
        if not (_finite(*flat) and len(flat) >= 6 and len(flat) % 2 == 0):
            item.problem("bad_polygon", "a polygon is a list of at least 3 x, y pairs", obj=i)
            return None
        points = [[float(flat[k]), float(flat[k + 1])] for k in range(0, len(flat), 2)]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return SourceBox(i, obj["label"], min(xs), min(ys), max(xs) - min(xs),
                         max(ys) - min(ys), polygon=points, normalized=True)
    corners = [obj.get(k) for k in ("topX", "topY", "bottomX", "bottomY")]
    if not _finite(*corners):
        item.problem("parse_error", "a box needs numeric topX, topY, bottomX, bottomY", obj=i)
        return None
    x0, y0, x1, y1 = (float(v) for v in corners)  # type: ignore[arg-type]
    return SourceBox(i, obj["label"], x0, y0, x1 - x0, y1 - y0, normalized=True)


class AzureMLWriter(Writer):
    """``{split}.jsonl`` (or ``annotations.jsonl``) with ``image_url`` relative to the archive."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.lines = SplitFiles()

    def label(self, item: ExportItem) -> None:
        fmt = Path(item.name).suffix.lstrip(".").lower()
        row: dict[str, Any] = {"image_url": item.image_path,
                               "image_details": {"format": fmt, "width": item.width,
                                                 "height": item.height}}
        if item.boxes is not None:
            objects = []
            for box in item.boxes:
                obj = {"label": box["label"], "topX": round(box["x"] / item.width, 8),
                       "topY": round(box["y"] / item.height, 8),
                       "bottomX": round((box["x"] + box["width"]) / item.width, 8),
                       "bottomY": round((box["y"] + box["height"]) / item.height, 8),
                       "isCrowd": 0}
                if "confidence" in box:
                    obj["score"] = box["confidence"]
                objects.append(obj)
            row["label"] = objects
        elif self.task == "multiclass":
            row["label"] = item.tags[0]
        else:
            row["label"] = list(item.tags)
        if item.predicted:
            row["prelabel_source"] = "suggestion"
            row["model_version"] = item.model_version
            if item.tag_scores:
                row["scores"] = item.tag_scores
        self.lines.write(item.split, json.dumps(row, separators=(",", ":")).encode() + b"\n")

    def finish(self) -> None:
        for split in self.lines.splits():
            self.out.add_parts(f"{split}.jsonl" if split else "annotations.jsonl",
                               [self.lines.files[split]])
        self.lines.close()
