"""Label Studio JSON export: a list of tasks with ``data``, ``annotations`` and ``predictions``.

Reading takes each task's latest annotation that was not cancelled (predictions are not
labels): ``choices`` are tags; ``rectanglelabels`` and ``polygonlabels`` are objects whose
coordinates are PERCENT of the image (``original_width`` / ``original_height`` give its size).
Rotated rectangles are reported and skipped; an annotation with an empty ``result`` is a label
with no class (multilabel) or an image with no objects (detection). Writing puts labels in
``annotations`` and suggestions in ``predictions`` (with ``score`` and ``model_version``), plus
a matching ``label_config.xml``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from service.datasets.files import FileIndex, is_image
from service.datasets.items import ExportItem, SourceBox, SourceItem, problem
from service.datasets.writer import SplitFiles, Writer

_IMAGE_KEYS = ("image", "img", "image_url", "url")


def read_labelstudio(index: FileIndex, files: list[Path] | None = None,
                     notes: list[dict[str, Any]] | None = None) -> Iterator[SourceItem]:
    """One item per task of every Label Studio JSON export (other JSON files skipped)."""
    for path in files or index.with_suffix(".json"):
        try:
            rel = index.rel(path.resolve())
        except ValueError:
            rel = path.name
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, OSError) as exc:
            if files and notes is not None:
                notes.append(problem(rel, "parse_error", f"not readable JSON: {exc}"))
            continue
        tasks = [data] if isinstance(data, dict) and "data" in data else data
        if not (isinstance(tasks, list)
                and all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in tasks)):
            continue
        for n, task in enumerate(tasks):
            yield _task(index, path, f"{rel}#{task.get('id', n)}", task)


def _image_ref(data: dict[str, Any]) -> str:
    for key in _IMAGE_KEYS:
        if isinstance(data.get(key), str):
            return str(data[key])
    for value in data.values():
        if isinstance(value, str) and is_image(value.split("?", 1)[0]):
            return value
    return ""


def _task(index: FileIndex, path: Path, where: str, task: dict[str, Any]) -> SourceItem:
    ref = _image_ref(task["data"])
    item = SourceItem(file=where, image_ref=ref)
    item.image_path, why = index.resolve(ref, near=path.parent)
    if why:
        item.problem("ambiguous_image", why)
    done = [a for a in task.get("annotations") or []
            if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return item
    latest = max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""),
                                      a.get("id") or 0))
    results = latest.get("result") or []
    tags: list[str] = []
    boxes: list[SourceBox] = []
    for i, result in enumerate(results):
        if not isinstance(result, dict):
            continue
        kind, value = result.get("type"), result.get("value") or {}
        w, h = result.get("original_width"), result.get("original_height")
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            item.declared_size = (w, h)
        if kind == "choices":
            tags.extend(str(c) for c in value.get("choices") or [])
        elif kind in ("rectanglelabels", "polygonlabels"):
            boxes.extend(_objects(item, i, kind, value))
        else:
            item.problem("unsupported_result", f"result type {kind!r} is not a class, box or "
                         "polygon", obj=i)
    has_regions = any(isinstance(r, dict) and r.get("type") in ("rectanglelabels",
                                                                 "polygonlabels")
                      for r in results)
    # an annotation with an empty result (or empty choices) is a label with no class
    empty = not tags and not has_regions and all(
        isinstance(r, dict) and r.get("type") == "choices" for r in results)
    item.tags = tags if tags or empty else None
    item.boxes = boxes if boxes or has_regions or not tags else None
    return item


def _finite(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in values)


def _objects(item: SourceItem, i: int, kind: str, value: dict[str, Any]) -> list[SourceBox]:
    labels = value.get(kind) or []
    if not labels:
        item.problem("parse_error", f"the region has no {kind}", obj=i)
        return []
    if kind == "rectanglelabels":
        coords = [value.get(k) for k in ("x", "y", "width", "height")]
        if not _finite(*coords):
            item.problem("parse_error", "a rectangle needs numeric x, y, width, height", obj=i)
            return []
        if value.get("rotation") not in (None, 0, 0.0):
            item.problem("rotated_box", f"a rectangle rotated by {value.get('rotation')} "
                         "degrees is not an axis-aligned box", obj=i)
            return []
        x, y, w, h = (float(v) / 100 for v in coords)  # type: ignore[arg-type]
        return [SourceBox(i, str(name), x, y, w, h, normalized=True) for name in labels]
    points = value.get("points")
    if not (isinstance(points, list) and len(points) >= 3
            and all(isinstance(p, list) and len(p) == 2 and _finite(*p) for p in points)):
        item.problem("bad_polygon", "a polygon is a list of at least 3 [x, y] points", obj=i)
        return []
    poly = [[float(px) / 100, float(py) / 100] for px, py in points]
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    return [SourceBox(i, str(name), min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys),
                      polygon=poly, normalized=True) for name in labels]


class LabelStudioWriter(Writer):
    """``tasks.json`` (or ``{split}.json``) and ``label_config.xml``."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.tasks = SplitFiles()

    def label(self, item: ExportItem) -> None:
        results = self._results(item)
        task: dict[str, Any] = {
            "id": item.image_id,
            "data": {"image": item.image_path, "prelabel_url": item.url,
                     "sha256": item.sha256},
            "annotations": [], "predictions": []}
        if item.predicted:
            scores = [r["score"] for r in results if r.get("score") is not None]
            task["predictions"].append({
                "model_version": str(item.model_version), "result": results,
                "score": round(sum(scores) / len(scores), 6) if scores else None})
        else:
            task["annotations"].append({"result": results, "was_cancelled": False,
                                        "ground_truth": False})
        self.tasks.write(item.split, json.dumps(task, separators=(",", ":")).encode(), b",\n")

    def _results(self, item: ExportItem) -> list[dict[str, Any]]:
        if item.boxes is None and not item.tags:
            return []  # labeled with no class: an annotation with an empty result
        if item.boxes is None:
            result: dict[str, Any] = {"id": "c0", "type": "choices", "from_name": "tags",
                                      "to_name": "image", "value": {"choices": item.tags}}
            if item.predicted:
                result["score"] = min((item.tag_scores.get(t, 0.0) for t in item.tags),
                                      default=None)
            return [result]
        out = []
        for i, box in enumerate(item.boxes):
            w, h = item.width, item.height
            result = {"id": f"r{i}", "from_name": "label", "to_name": "image",
                      "original_width": w, "original_height": h, "image_rotation": 0}
            poly = box.get("polygon")
            if poly:
                result.update(type="polygonlabels", from_name="polygon", value={
                    "points": [[100 * px / w, 100 * py / h] for px, py in poly],
                    "closed": True, "polygonlabels": [box["label"]]})
            else:
                result.update(type="rectanglelabels", value={
                    "x": 100 * box["x"] / w, "y": 100 * box["y"] / h,
                    "width": 100 * box["width"] / w, "height": 100 * box["height"] / h,
                    "rotation": 0, "rectanglelabels": [box["label"]]})
            if "confidence" in box:
                result["score"] = box["confidence"]
            out.append(result)
        return out

    def finish(self) -> None:
        for split in self.tasks.splits():
            self.out.add_parts(f"{split}.json" if split else "tasks.json",
                               [b"[\n", self.tasks.files[split], b"\n]\n"])
        self.tasks.close()
        self.out.add_bytes("label_config.xml", self.label_config().encode())

    def label_config(self) -> str:
        """The labeling config XML these tasks' ``from_name`` / ``to_name`` refer to."""
        labels = "".join(f"\n    <Label value={quoteattr(c)}/>" for c in self.classes)
        choices = "".join(f"\n    <Choice value={quoteattr(c)}/>" for c in self.classes)
        if self.task == "detection":
            body = (f'  <RectangleLabels name="label" toName="image">{labels}\n'
                    f'  </RectangleLabels>\n  <PolygonLabels name="polygon" toName="image">'
                    f'{labels}\n  </PolygonLabels>')
        else:
            choice = "multiple" if self.task == "multilabel" else "single"
            body = (f'  <Choices name="tags" toName="image" choice="{choice}">{choices}\n'
                    '  </Choices>')
        return f'<View>\n  <Image name="image" value="$image"/>\n{body}\n</View>\n'
