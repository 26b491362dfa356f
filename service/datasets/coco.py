"""COCO JSON: ``images``, ``categories``, ``annotations`` with pixel ``bbox [x, y, w, h]``.

Polygons (``segmentation``) become the object's polygon and box; crowd regions are skipped
(they are not objects); a category without ``bbox`` or ``segmentation`` is an image-level
class (classification); an image entry with ``"prelabel_empty": true`` and no annotations is
labeled with no class (an empty multilabel label). Exports write one JSON per split:
``annotations/instances_{split}.json`` (or ``annotations.json``), images below
``images/{split}/``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.datasets.files import FileIndex
from service.datasets.items import ExportItem, SourceBox, SourceItem, problem
from service.datasets.writer import SplitFiles, Writer, join


def read_coco(index: FileIndex, files: list[Path] | None = None,
              notes: list[dict[str, Any]] | None = None) -> Iterator[SourceItem]:
    """One item per entry of ``images`` in every COCO JSON file (other JSON files skipped)."""
    for path in files or index.with_suffix(".json"):
        rel = _rel(index, path)
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, OSError) as exc:
            if files and notes is not None:
                notes.append(problem(rel, "parse_error", f"not readable JSON: {exc}"))
            continue
        if not (isinstance(data, dict) and isinstance(data.get("images"), list)
                and isinstance(data.get("annotations", []), list)):
            continue
        yield from _read_file(index, path, rel, data, notes)


def _rel(index: FileIndex, path: Path) -> str:
    try:
        return index.rel(path.resolve())
    except ValueError:
        return path.name


def _read_file(index: FileIndex, path: Path, rel: str, data: dict[str, Any],
               notes: list[dict[str, Any]] | None) -> Iterator[SourceItem]:
    categories = {c.get("id"): str(c.get("name", "")).strip()
                  for c in data.get("categories") or [] if isinstance(c, dict)}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in data.get("annotations") or []:
        if isinstance(ann, dict):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
    for img in data["images"]:
        if not isinstance(img, dict):
            continue
        ref = str(img.get("file_name") or "")
        item = SourceItem(file=rel, image_ref=ref, declared_size=_size(img))
        item.image_path, why = index.resolve(ref, near=path.parent)
        if why:
            item.problem("ambiguous_image", why)
        boxes: list[SourceBox] = []
        tags: list[str] = []
        for i, ann in enumerate(by_image.pop(img.get("id"), [])):
            name = categories.get(ann.get("category_id"))
            if name is None:
                item.problem("unknown_category", f"annotation {ann.get('id')}: category_id "
                             f"{ann.get('category_id')!r} is not in 'categories'", obj=i)
                continue
            box = _object(item, i, ann, name)
            if box == "tag":
                tags.append(name)
            elif box is not None:
                boxes.append(box)  # type: ignore[arg-type]
        item.boxes = boxes if boxes or not tags else None
        # an image entry flagged ``prelabel_empty`` is labeled with no class (multilabel)
        item.tags = tags if tags or img.get("prelabel_empty") is True else None
        yield item
    if notes is not None:
        for image_id, anns in by_image.items():
            notes.append(problem(rel, "unknown_image", f"{len(anns)} annotation(s) name "
                                 f"image_id {image_id!r}, which is not in 'images'"))


def _size(img: dict[str, Any]) -> tuple[int, int] | None:
    w, h = img.get("width"), img.get("height")
    if isinstance(w, int | float) and isinstance(h, int | float) and w > 0 and h > 0:
        return int(w), int(h)
    return None


def _numbers(values: Any, count: int | None = None) -> list[float] | None:
    if not isinstance(values, list) or (count is not None and len(values) != count):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in values):
        return None
    return [float(v) for v in values]


def _object(item: SourceItem, i: int, ann: dict[str, Any], name: str) -> SourceBox | str | None:
    what = f"annotation {ann.get('id')}"
    if ann.get("iscrowd"):
        item.problem("crowd_skipped", f"{what} is a crowd region, not an object", obj=i)
        return None
    seg, bbox = ann.get("segmentation"), ann.get("bbox")
    if not seg and bbox is None:
        return "tag"
    polygon = None
    if isinstance(seg, list) and seg:
        parts = [_numbers(p) for p in seg]
        if any(p is None or len(p) < 6 or len(p) % 2 for p in parts):
            item.problem("bad_polygon", f"{what}: segmentation polygons are lists of at "
                         "least 3 x, y pairs", obj=i)
            return None
        if len(parts) == 1:
            flat = parts[0] or []
            polygon = [[flat[k], flat[k + 1]] for k in range(0, len(flat), 2)]
        else:
            item.problem("polygon_parts", f"{what}: a polygon in {len(parts)} parts is kept "
                         "as its box only", obj=i)
    if polygon is not None:
        xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
        return SourceBox(i, name, min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys),
                         polygon=polygon)
    box = _numbers(bbox, 4)
    if box is None:
        item.problem("parse_error", f"{what}: bbox must be [x, y, width, height]", obj=i)
        return None
    return SourceBox(i, name, *box)


def _polygon_area(points: list[list[float]]) -> float:
    total = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
        total += x0 * y1 - x1 * y0
    return abs(total) / 2


class CocoWriter(Writer):
    """COCO JSON per split; suggestions carry ``score`` and the image ``prelabel_source``."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.category = {name: i + 1 for i, name in enumerate(self.classes)}
        self.images, self.annotations = SplitFiles(), SplitFiles()
        self.next_id = 1

    def label(self, item: ExportItem) -> None:
        entry: dict[str, Any] = {
            "id": item.image_id, "file_name": item.name, "width": item.width,
            "height": item.height, "coco_url": item.url, "sha256": item.sha256,
            "prelabel_source": "suggestion" if item.predicted else "label"}
        if item.predicted:
            entry["model_version"] = item.model_version
        if item.boxes is None and not item.tags:
            entry["prelabel_empty"] = True  # labeled, with no class: no annotation says so
        self.images.write(item.split, _dumps(entry), b",")
        if item.boxes is None:
            for tag in item.tags:
                ann: dict[str, Any] = {"id": self._id(), "image_id": item.image_id,
                                       "category_id": self.category[tag]}
                if item.predicted:
                    ann["score"] = item.tag_scores.get(tag)
                self.annotations.write(item.split, _dumps(ann), b",")
            return
        for box in item.boxes:
            x, y, w, h = box["x"], box["y"], box["width"], box["height"]
            poly = box.get("polygon")
            ann = {"id": self._id(), "image_id": item.image_id,
                   "category_id": self.category[box["label"]], "bbox": [x, y, w, h],
                   "area": round(_polygon_area(poly) if poly else w * h, 3), "iscrowd": 0,
                   "segmentation": [[v for p in poly for v in p]] if poly else []}
            if "confidence" in box:
                ann["score"] = box["confidence"]
            self.annotations.write(item.split, _dumps(ann), b",")

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def finish(self) -> None:
        categories = [{"id": i, "name": n, "supercategory": "none"}
                      for n, i in self.category.items()]
        for split in self.images.splits():
            head = json.dumps({"info": {"description": "prelabel export"}, "licenses": [],
                               "categories": categories})[:-1].encode()
            parts: list[Any] = [head, b', "images": [', self.images.files[split],
                                b'], "annotations": [']
            if split in self.annotations.files:
                parts.append(self.annotations.files[split])
            parts.append(b"]}")
            name = f"annotations/instances_{split}.json" if split else "annotations.json"
            self.out.add_parts(join(name), parts)
        self.images.close()
        self.annotations.close()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
