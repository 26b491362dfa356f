"""The format-neutral records that readers produce and writers consume, and the import report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMPORT_FORMATS = ("coco", "voc", "yolo", "azureml", "labelstudio", "folders")
EXPORT_FORMATS = ("coco", "voc", "yolo", "azureml", "labelstudio", "csv")
MAX_PROBLEMS = 1000  # listed in a report; the counts cover every problem


class ImportFailed(Exception):
    """A fatal import error: nothing is written (stable ``code``, HTTP-style ``status``)."""

    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(code, message, status)
        self.code, self.message, self.status = code, message, status

    def __str__(self) -> str:
        return self.message


@dataclass
class SourceBox:
    """One object as a file states it: pixels, or fractions of the image size (``normalized``)."""

    index: int  # position among the image's objects in its file (0-based), for the report
    label: str
    x: float
    y: float
    width: float
    height: float
    polygon: list[list[float]] | None = None
    normalized: bool = False


@dataclass
class SourceItem:
    """One image of a dataset with its label as read from the files.

    ``tags`` and ``boxes`` are both None for an image without a label; ``boxes == []`` is a
    labeled image with nothing in it. ``declared_size`` is the (width, height) the file states.
    """

    file: str  # the file the label came from (relative), or the image's path
    image_ref: str  # the image as the file names it
    image_path: Path | None = None  # the image inside the dataset, when found
    tags: list[str] | None = None
    boxes: list[SourceBox] | None = None
    declared_size: tuple[int, int] | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, code: str, message: str, obj: int | None = None) -> None:
        """Note a problem found while reading (the object is skipped, or the label)."""
        self.problems.append(problem(self.file, code, message, image=self.image_ref, obj=obj))


def problem(file: str, code: str, message: str, *, image: str | None = None,
            obj: int | None = None) -> dict[str, Any]:
    """One entry of an import report."""
    entry: dict[str, Any] = {"file": file, "code": code, "message": message}
    if image is not None:
        entry["image"] = image
    if obj is not None:
        entry["object"] = obj
    return entry


@dataclass
class Report:
    """What an import did, and every problem by file and object (the list is capped)."""

    format: str
    items: int = 0
    images_new: int = 0
    images_existing: int = 0
    images_failed: int = 0
    labels_created: int = 0
    labels_unchanged: int = 0
    labels_kept: int = 0  # existing labels left alone (existing=keep)
    labels_skipped: int = 0
    objects_imported: int = 0
    objects_rejected: int = 0
    classes_created: list[str] = field(default_factory=list)
    problem_counts: dict[str, int] = field(default_factory=dict)
    problems: list[dict[str, Any]] = field(default_factory=list)

    def add(self, entry: dict[str, Any]) -> None:
        code = entry["code"]
        self.problem_counts[code] = self.problem_counts.get(code, 0) + 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(entry)

    def as_json(self) -> dict[str, Any]:
        return {
            "format": self.format, "items": self.items,
            "images": {"new": self.images_new, "existing": self.images_existing,
                       "failed": self.images_failed},
            "labels": {"created": self.labels_created, "unchanged": self.labels_unchanged,
                       "kept": self.labels_kept, "skipped": self.labels_skipped},
            "objects": {"imported": self.objects_imported, "rejected": self.objects_rejected},
            "classes_created": self.classes_created,
            "problem_counts": self.problem_counts,
            "problems": self.problems,
            "problems_listed": len(self.problems),
            "problems_total": sum(self.problem_counts.values()),
        }


@dataclass
class ExportItem:
    """One labeled image on its way into an export archive.

    ``boxes`` hold pixel ``{label, x, y, width, height, polygon?}`` (plus ``confidence`` when
    ``predicted``); ``tags`` the class names (``tag_scores`` their confidences when predicted).
    """

    image_id: int
    name: str  # unique file name inside the archive
    sha256: str
    storage_key: str
    format: str
    width: int
    height: int
    split: str | None
    tags: list[str]
    boxes: list[dict[str, Any]] | None
    predicted: bool = False
    model_version: int | None = None
    tag_scores: dict[str, float] = field(default_factory=dict)
    url: str = ""  # the image's API path (/api/v1/images/{id}/file)
    image_path: str = ""  # its path inside the archive (also when images are referenced)
