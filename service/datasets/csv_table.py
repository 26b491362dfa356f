"""CSV export: one row per object (detection) or per tag (classification).

Columns: ``image, split, width, height, label, x, y, box_width, box_height, confidence,
source`` (pixels, top-left origin; ``confidence`` only for suggestions; ``source`` is ``label``
or ``suggestion``). An image labeled as holding nothing has one row with an empty label.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from service.datasets.items import ExportItem
from service.datasets.writer import Writer, num

COLUMNS = ["image", "split", "width", "height", "label", "x", "y", "box_width", "box_height",
           "confidence", "source"]


class CsvWriter(Writer):
    """``labels.csv`` with a ``split`` column."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rows = self.out.spool("labels.csv")
        self._write([COLUMNS])

    def _write(self, rows: list[list[Any]]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        self.rows.write(buf.getvalue().encode())

    def label(self, item: ExportItem) -> None:
        source = "suggestion" if item.predicted else "label"
        head = [item.image_path, item.split or "", item.width, item.height]
        if item.boxes is None:
            rows = [[*head, tag, "", "", "", "",
                     num(item.tag_scores[tag], 6) if tag in item.tag_scores else "", source]
                    for tag in item.tags]
        else:
            rows = [[*head, b["label"], num(b["x"]), num(b["y"]), num(b["width"]),
                     num(b["height"]), num(b["confidence"], 6) if "confidence" in b else "",
                     source] for b in item.boxes]
        self._write(rows or [[*head, "", "", "", "", "", "", source]])
