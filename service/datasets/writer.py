"""What every format writer shares: where images go, one call per image, a final call."""

from __future__ import annotations

import tempfile
from typing import IO

from service.datasets.items import ExportItem
from service.datasets.zipstream import ZipOut

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def join(*parts: str | None) -> str:
    """Archive path from the parts that are set."""
    return "/".join(p for p in parts if p)


class Writer:
    """A format writer: ``add`` per image (bytes or None when referenced), then ``finish``."""

    image_dir = "images"
    needs_images = False  # True where the layout itself is made of image files

    def __init__(self, out: ZipOut, classes: list[str], task: str) -> None:
        self.out, self.classes, self.task = out, classes, task

    def image_path(self, item: ExportItem) -> str:
        return join(self.image_dir, item.split, item.name)

    def add(self, item: ExportItem, data: bytes | None) -> None:
        if data is not None:
            self.out.add_bytes(item.image_path, data, compress=False)
        self.label(item)

    def label(self, item: ExportItem) -> None:
        """Write or spool the item's label."""

    def finish(self) -> None:
        """Write what was spooled."""


class SplitFiles:
    """One temporary file per split for a list that becomes a member at the end."""

    def __init__(self) -> None:
        self.files: dict[str | None, IO[bytes]] = {}
        self.counts: dict[str | None, int] = {}

    def write(self, split: str | None, data: bytes, sep: bytes = b"") -> None:
        fh = self.files.get(split)
        if fh is None:
            fh = self.files[split] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close)
            self.counts[split] = 0
        if self.counts[split] and sep:
            fh.write(sep)
        fh.write(data)
        self.counts[split] += 1

    def splits(self) -> list[str | None]:
        return sorted(self.files, key=lambda s: SPLIT_ORDER.get(s or "", -1))

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


def num(value: float, places: int = 3) -> str:
    """A number with at most ``places`` decimals and no trailing zeros."""
    text = f"{value:.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def safe_part(name: str) -> str:
    """A class name usable as one folder name inside an archive."""
    clean = "".join("_" if c in '/\\:\x00' else c for c in name).strip()
    return "_" if clean in ("", ".", "..") else clean
