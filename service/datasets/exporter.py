"""Exporting a project's labels as a zip archive, streamed while it is written.

Rows are read with a server-side cursor, each image's bytes are read, written and dropped, and
lists that a format keeps in one file (COCO, JSONL, Label Studio, CSV) are spooled to temporary
files: memory stays flat whatever the project's size. A writer thread fills a small bounded
queue that the HTTP response (or the CLI) drains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from service.datasets.azureml import AzureMLWriter
from service.datasets.coco import CocoWriter
from service.datasets.csv_table import CsvWriter
from service.datasets.folders import FolderWriter
from service.datasets.items import ExportItem, ImportFailed
from service.datasets.labelstudio import LabelStudioWriter
from service.datasets.voc import VocWriter
from service.datasets.writer import Writer
from service.datasets.yolo import YoloWriter
from service.datasets.zipstream import ZipOut
from service.storage import BlobMissing, LocalBlobStore
from service.tables import Annotation, Image, ModelVersion, Project, ProjectClass, Suggestion

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
_EXT = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "bmp": ".bmp", "tiff": ".tif",
        "gif": ".gif"}
_EXTS = {"jpeg": {".jpg", ".jpeg"}, "tiff": {".tif", ".tiff"}}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ExportOptions:
    """What to export (see the API route for the meaning of each field)."""

    format: str
    labels: str = "manual"  # manual | with_suggestions
    min_confidence: float | None = None
    images: str = "include"  # include | reference
    split: tuple[float, float, float] | None = None
    seed: int = 0


def parse_split(text: str | None) -> tuple[float, float, float] | None:
    """``"80,10,10"`` -> fractions of train, val and test (ValueError when malformed)."""
    if text is None or not text.strip():
        return None
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3 or any(not p >= 0 for p in parts) or sum(parts) <= 0:
        raise ValueError("split is three non-negative numbers, e.g. 80,10,10")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def split_of(sha256: str, seed: int, fractions: tuple[float, float, float] | None) -> str | None:
    """The split of an image: a function of the seed and the image's content only.

    So the same seed gives the same split on every export, and an image keeps its split when
    others are added; the proportions hold in expectation (not exactly on small projects).
    """
    if fractions is None:
        return None
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def writer_for(fmt: str, task: str) -> type[Writer]:
    """The writer class of a format for a project's task (ImportFailed when it cannot)."""
    if fmt == "voc" and task != "detection":
        raise ImportFailed("format_task_mismatch", "Pascal VOC holds boxes: export a "
                           "classification project as coco, yolo, azureml, labelstudio or csv")
    if fmt == "yolo":
        return YoloWriter if task == "detection" else FolderWriter
    writers: dict[str, type[Writer]] = {
        "coco": CocoWriter, "voc": VocWriter, "azureml": AzureMLWriter,
        "labelstudio": LabelStudioWriter, "csv": CsvWriter}
    if fmt not in writers:
        raise ImportFailed("unsupported_format", f"unknown export format {fmt!r}")
    return writers[fmt]


def check_options(task: str, options: ExportOptions) -> None:
    """Refuse combinations that cannot be written (ImportFailed, before streaming starts)."""
    cls = writer_for(options.format, task)
    if cls.needs_images and options.images == "reference":
        raise ImportFailed("images_required", "this layout is made of the image files "
                           "themselves: export it with images=include")


def _stem_ext(filename: str, fmt: str) -> tuple[str, str]:
    base = PurePosixPath(filename.replace("\\", "/")).name
    stem, ext = os.path.splitext(base)
    if ext.lower() not in _EXTS.get(fmt, {_EXT.get(fmt, "")}):
        stem, ext = base, _EXT.get(fmt, ".img")
    stem = _UNSAFE.sub("_", stem).strip("._")[:100] or "image"
    return stem, ext


def _name_key(stem: str) -> int:
    return int.from_bytes(hashlib.blake2b(stem.lower().encode(), digest_size=8).digest(), "big")


class _Rows:
    """The exported images, in id order, with their current label or suggestion."""

    def __init__(self, session: Session, project: Project, options: ExportOptions) -> None:
        self.session, self.project, self.options = session, project, options
        self.model: ModelVersion | None = None
        if options.labels == "with_suggestions":
            self.model = session.scalar(select(ModelVersion).where(
                ModelVersion.project_id == project.id, ModelVersion.promoted.is_(True)))

    def _query(self, *columns: Any) -> Any:
        current = and_(Annotation.image_id == Image.id, Annotation.is_current.is_(True))
        query = select(*columns).select_from(Image).where(Image.project_id == self.project.id)
        if self.model is None:
            return query.join(Annotation, current)
        return (query.outerjoin(Annotation, current)
                .outerjoin(Suggestion, and_(Suggestion.image_id == Image.id,
                                            Suggestion.model_id == self.model.id))
                .where(or_(Annotation.id.is_not(None), Suggestion.id.is_not(None))))

    def collided(self) -> set[int]:
        """Keys of file stems that more than one exported image shares (case-insensitive).

        The only per-image state of an export: 8 bytes per image, in a sorted array.
        """
        keys = array("Q")
        rows = self.session.execute(self._query(Image.filename, Image.format)
                                    .execution_options(yield_per=1000))
        for filename, fmt in rows:
            keys.append(_name_key(_stem_ext(filename, fmt)[0]))
        ordered = np.frombuffer(keys, dtype=np.uint64).copy()
        ordered.sort()
        return {int(k) for k in np.unique(ordered[1:][ordered[1:] == ordered[:-1]])}

    def __iter__(self) -> Iterator[ExportItem]:
        collided = self.collided()
        payload = Suggestion.payload if self.model is not None else None
        columns = [Image.id, Image.filename, Image.sha256, Image.storage_key, Image.format,
                   Image.width, Image.height, Annotation.tags, Annotation.boxes]
        query = self._query(*columns, *([payload] if payload is not None else []))
        query = query.order_by(Image.id, Annotation.id.desc()).execution_options(yield_per=500)
        last = None
        for row in self.session.execute(query):
            if row[0] == last:
                continue  # two current labels (a race): the newest wins
            last = row[0]
            item = self._item(row, collided)
            if item is not None:
                yield item

    def _item(self, row: Any, collided: set[int]) -> ExportItem | None:
        iid, filename, sha, key, fmt, width, height, tags, boxes = row[:9]
        stem, ext = _stem_ext(filename, fmt)
        if _name_key(stem) in collided:
            stem = f"{stem}~{iid}"  # '~' never survives sanitizing: no clash with other names
        item = ExportItem(image_id=iid, name=stem + ext, sha256=sha, storage_key=key,
                          format=fmt, width=width, height=height,
                          split=split_of(sha, self.options.seed, self.options.split),
                          tags=list(tags or []), boxes=boxes, url=f"/api/v1/images/{iid}/file")
        if tags is not None:
            if self.project.task == "detection" and boxes is None:
                return None
            return item
        return self._predicted(item, row[9] if len(row) > 9 else None)

    def _predicted(self, item: ExportItem, payload: dict[str, Any] | None) -> ExportItem | None:
        if not payload or self.model is None:
            return None
        floor = self.options.min_confidence
        item.predicted, item.model_version = True, self.model.version
        if self.project.task == "detection":
            item.boxes = [
                {"label": b["label"], "x": b["x"], "y": b["y"], "width": b["width"],
                 "height": b["height"], "confidence": b["confidence"]}
                for b in payload.get("boxes") or []
                if (b["confidence"] >= floor if floor is not None
                    else not b.get("below_threshold"))]
            item.tags = sorted({b["label"] for b in item.boxes})
            return item if item.boxes else None
        scored = payload.get("scores") or payload.get("tags") or []
        if floor is None:
            scored = [t for t in payload.get("tags") or [] if not t.get("below_threshold")]
        else:
            scored = [t for t in scored if t["confidence"] >= floor]
        if self.project.task == "multiclass":
            scored = sorted(scored, key=lambda t: -t["confidence"])[:1]
        item.tags = [t["label"] for t in scored]
        item.tag_scores = {t["label"]: t["confidence"] for t in scored}
        item.boxes = None
        return item if item.tags else None


def write_export(sessions: sessionmaker[Session], blobs: LocalBlobStore, project_id: int,
                 options: ExportOptions, sink: Callable[[bytes], None]) -> dict[str, Any]:
    """Write the whole archive to ``sink``; returns the manifest (also written as a member)."""
    with sessions() as session:
        project = session.get(Project, project_id)
        if project is None:
            raise ImportFailed("not_found", f"project {project_id} not found", 404)
        classes = list(session.scalars(select(ProjectClass.name).where(
            ProjectClass.project_id == project_id).order_by(ProjectClass.id)))
        out = ZipOut(sink)
        try:
            writer = writer_for(options.format, project.task)(out, classes, project.task)
            counts: dict[str, int] = {}
            missing: list[int] = []
            predicted = 0
            for item in _Rows(session, project, options):
                item.image_path = writer.image_path(item)
                data = None
                if options.images == "include":
                    try:
                        data = blobs.get(item.storage_key)
                    except BlobMissing:
                        missing.append(item.image_id)
                        continue
                writer.add(item, data)
                counts[item.split or "all"] = counts.get(item.split or "all", 0) + 1
                if item.predicted:
                    predicted += 1
                    out.spool("predicted.txt").write(f"{item.image_path}\n".encode())
            writer.finish()
            manifest = {
                "project": {"id": project.id, "name": project.name, "task": project.task},
                "classes": classes, "options": {**asdict(options), "split": options.split},
                "images": counts, "predicted_images": predicted,
                "missing_images": missing[:1000], "missing_count": len(missing)}
            out.add_bytes("manifest.json", json.dumps(manifest, indent=2).encode())
            out.close()
            return manifest
        except BaseException:
            out.abort()
            raise


class _Stopped(Exception):
    """The consumer went away."""


def stream_export(sessions: sessionmaker[Session], blobs: LocalBlobStore, project_id: int,
                  options: ExportOptions, buffered: int = 16) -> Iterator[bytes]:
    """The archive as an iterator of chunks, written by a thread into a bounded queue."""
    chunks: queue.Queue[Any] = queue.Queue(maxsize=buffered)
    stop = threading.Event()
    done = object()

    def put(value: Any) -> None:
        while not stop.is_set():
            try:
                chunks.put(value, timeout=0.5)
                return
            except queue.Full:
                continue
        raise _Stopped

    def produce() -> None:
        try:
            write_export(sessions, blobs, project_id, options, put)
            put(done)
        except _Stopped:
            log.info("export of project %s stopped: the client went away", project_id)
        except Exception as exc:
            log.exception("export of project %s failed", project_id)
            with contextlib.suppress(_Stopped):
                put(exc)

    thread = threading.Thread(target=produce, name=f"export-{project_id}", daemon=True)
    thread.start()
    try:
        while True:
            value = chunks.get()
            if value is done:
                return
            if isinstance(value, Exception):
                raise RuntimeError("the export failed while streaming") from value
            yield value
    finally:
        stop.set()
