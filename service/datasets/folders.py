"""Folder per class (classification): ``{class}/image.jpg``, optionally below ``{split}/``.

Reading takes an image's class from the folder that holds it; a top-level ``train``, ``val``,
``valid`` or ``test`` folder is a split, not a class. The same image in several class folders
has several tags (multilabel). The YOLO classification export writes this layout
(``{split}/{class}/image.jpg``, Ultralytics' ``classify`` datasets).
"""

from __future__ import annotations

from collections.abc import Iterator

from service.datasets.files import FileIndex
from service.datasets.items import ExportItem, SourceItem
from service.datasets.writer import Writer, join, safe_part

SPLIT_FOLDERS = frozenset({"train", "val", "valid", "validation", "test"})


def read_folders(index: FileIndex) -> Iterator[SourceItem]:
    """One item per image file, tagged with its folder's name."""
    for image in index.images:
        index.used.add(image)
        rel = index.rel(image)
        parts = rel.split("/")
        tag = parts[-2] if len(parts) >= 2 else None
        if tag is not None and len(parts) == 2 and tag.lower() in SPLIT_FOLDERS:
            tag = None
        yield SourceItem(file=rel, image_ref=rel, image_path=image,
                         tags=[tag] if tag else None)


class FolderWriter(Writer):
    """Images in a folder per class (copied into each of its classes' folders)."""

    needs_images = True

    def image_path(self, item: ExportItem) -> str:
        return join(item.split, safe_part(item.tags[0]) if item.tags else "_unlabeled", item.name)

    def add(self, item: ExportItem, data: bytes | None) -> None:
        if data is None:
            return
        for tag in item.tags:
            self.out.add_bytes(join(item.split, safe_part(tag), item.name), data, compress=False)
