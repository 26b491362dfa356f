"""YOLO (Ultralytics / Darknet) detection: ``images/...`` with ``labels/....txt`` beside them.

Each line is ``class cx cy w h`` as fractions of the image size (a sixth column, a confidence,
is ignored); a line of ``class x1 y1 x2 y2 ...`` is a polygon. Class names come from
``data.yaml`` (``names`` list or mapping) or ``classes.txt``. An empty label file is an image
with nothing in it; an image without a label file has no label.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from service.datasets.files import FileIndex
from service.datasets.items import ExportItem, ImportFailed, SourceBox, SourceItem
from service.datasets.writer import SPLIT_ORDER, Writer, join


def class_names(index: FileIndex) -> list[str]:
    """Names by class index from data.yaml / dataset.yaml, else classes.txt."""
    for path in index.with_suffix("data.yaml", "dataset.yaml", "data.yml"):
        try:
            data = yaml.safe_load(path.read_text(errors="replace"))
        except (yaml.YAMLError, OSError) as exc:
            raise ImportFailed("parse_error", f"{index.rel(path)} is not readable YAML: "
                               f"{str(exc)[:200]}") from exc
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, list):
            return [str(n) for n in names]
        if isinstance(names, dict):
            try:
                ordered = sorted((int(k), str(v)) for k, v in names.items())
            except (TypeError, ValueError) as exc:
                raise ImportFailed("parse_error", f"{index.rel(path)}: 'names' keys must be "
                                   "class indices") from exc
            out = [""] * (ordered[-1][0] + 1) if ordered else []
            for k, v in ordered:
                out[k] = v
            return out
    for path in index.with_suffix("classes.txt", "obj.names"):
        return [line.strip() for line in path.read_text(errors="replace").splitlines()
                if line.strip()]
    raise ImportFailed("no_annotations", "a YOLO dataset needs data.yaml (with 'names') or "
                       "classes.txt")


def label_file(index: FileIndex, image: Path) -> Path | None:
    """The label file of an image: ``.../labels/...`` for ``.../images/...``, or beside it."""
    rel = Path(index.rel(image))
    parts = list(rel.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            cand = index.root.joinpath(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt")
            if cand.is_file():
                return cand
            break
    beside = image.with_suffix(".txt")
    return beside if beside.is_file() else None


def read_yolo(index: FileIndex) -> Iterator[SourceItem]:
    """One item per image file (labeled when it has a label file)."""
    names = class_names(index)
    for image in index.images:
        index.used.add(image)
        rel = index.rel(image)
        labels = label_file(index, image)
        if labels is None:
            yield SourceItem(file=rel, image_ref=rel, image_path=image)
            continue
        item = SourceItem(file=index.rel(labels), image_ref=rel, image_path=image, boxes=[])
        lines = [ln for ln in labels.read_text(errors="replace").splitlines() if ln.strip()]
        for i, line in enumerate(lines):
            box = _line(item, i, line, names)
            if box is not None:
                item.boxes.append(box)  # type: ignore[union-attr]
        yield item


def _line(item: SourceItem, i: int, line: str, names: list[str]) -> SourceBox | None:
    parts = line.split()
    try:
        cls = int(parts[0])
        values = [float(v) for v in parts[1:]]
    except ValueError:
        item.problem("parse_error", f"line {i + 1}: {line[:80]!r} is not 'class cx cy w h'",
                     obj=i)
        return None
    if not 0 <= cls < len(names) or not names[cls]:
        item.problem("unknown_class_index", f"line {i + 1}: class index {cls} is not in the "
                     f"{len(names)} names", obj=i)
        return None
    if not all(math.isfinite(v) for v in values):
        item.problem("not_finite", f"line {i + 1}: coordinates must be finite", obj=i)
        return None
    if len(values) in (4, 5):
        cx, cy, w, h = values[:4]
        return SourceBox(i, names[cls], cx - w / 2, cy - h / 2, w, h, normalized=True)
    if len(values) >= 6 and len(values) % 2 == 0:
        poly = [[values[k], values[k + 1]] for k in range(0, len(values), 2)]
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        return SourceBox(i, names[cls], min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys),
                         polygon=poly, normalized=True)
    item.problem("parse_error", f"line {i + 1}: expected 'class cx cy w h' or a polygon, got "
                 f"{len(values)} numbers", obj=i)
    return None


class YoloWriter(Writer):
    """``images/{split}/``, ``labels/{split}/`` and ``data.yaml`` (boxes; polygons as boxes)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.index = {name: i for i, name in enumerate(self.classes)}
        self.splits: set[str | None] = set()

    def label(self, item: ExportItem) -> None:
        self.splits.add(item.split)
        lines = []
        for box in item.boxes or []:
            cx = (box["x"] + box["width"] / 2) / item.width
            cy = (box["y"] + box["height"] / 2) / item.height
            lines.append(f"{self.index[box['label']]} {cx:.6f} {cy:.6f} "
                         f"{box['width'] / item.width:.6f} {box['height'] / item.height:.6f}\n")
        stem = Path(item.name).stem
        self.out.add_bytes(join("labels", item.split, f"{stem}.txt"), "".join(lines).encode())

    def finish(self) -> None:
        splits = sorted(self.splits, key=lambda s: SPLIT_ORDER.get(s or "", -1))
        data: dict[str, Any] = {"path": "."}
        if splits == [None] or not splits:
            data.update(train="images", val="images")
        else:
            for split in splits:
                data[split or "train"] = f"images/{split}"
            data.setdefault("val", data.get("test", data.get("train")))
        data.update(nc=len(self.classes), names=dict(enumerate(self.classes)))
        self.out.add_bytes("data.yaml", yaml.safe_dump(data, sort_keys=False).encode())
