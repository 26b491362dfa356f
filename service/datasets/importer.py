"""Importing a dataset into a project: check everything first, then write in one transaction.

Phase 1 reads the files, stores new image blobs (content-addressed) and validates every label
against the image it belongs to; it writes no rows, so progress can be committed beside it.
Phase 2 creates classes, images and labels in one transaction (``record_annotation`` for every
label), calling ``begin`` first and ``finish`` last inside it: a fatal error leaves nothing
half-imported, and the blobs this import wrote that no image row references are deleted.
Re-importing the same data adds nothing: images are matched by sha256 and an identical current
label is left alone.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.boxes import BoxRejected, clean_boxes
from service.datasets.files import _LS_UPLOAD_PREFIX, FileIndex
from service.datasets.frames import SWAPPED, box_to_displayed, orientation
from service.datasets.items import ImportFailed, Report, SourceItem, problem
from service.datasets.reading import read_dataset
from service.db import insert_ignore
from service.errors import APIError
from service.imaging import ImageRejected, inspect_image
from service.labeling import record_annotation
from service.settings import Settings
from service.storage import BlobMissing, LocalBlobStore, image_key, sha256_hex
from service.tables import Annotation, Image, Project, ProjectClass, utcnow
from workers.leases import LeaseLost
from workers.policy import maybe_queue_run

log = logging.getLogger(__name__)
MAX_CLASSES = 1000
# imported anyway: in a simpler form (polygon_parts), or moved into the displayed frame
WARNINGS = frozenset({"polygon_parts", "frame_corrected"})
_CHUNK = 200
Progress = Callable[[float, str, dict[str, Any]], None]
Finish = Callable[[Session, Report], None]
Begin = Callable[[Session], None]


@dataclass(frozen=True)
class ImportOptions:
    """``mapping``: source class -> project class, or None to leave the class out;
    ``create_classes``: add classes the project lacks (else their objects are reported);
    ``existing``: ``replace`` the current label of an image, or ``keep`` it."""

    mapping: dict[str, str | None] = field(default_factory=dict)
    create_classes: bool = True
    existing: str = "replace"

    def as_json(self) -> dict[str, Any]:
        return {"mapping": self.mapping, "create_classes": self.create_classes,
                "existing": self.existing}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImportOptions:
        return cls(mapping=dict(data.get("mapping") or {}),
                   create_classes=bool(data.get("create_classes", True)),
                   existing=str(data.get("existing", "replace")))


@dataclass
class _NewImage:
    sha256: str
    filename: str
    format: str
    size_bytes: int
    width: int
    height: int
    path: Path


@dataclass
class _Label:
    file: str
    tags: list[str] | None
    boxes: list[dict[str, Any]] | None


@dataclass
class ImportResult:
    """The report and what to enqueue once the transaction is committed."""

    report: Report
    new_image_ids: list[int]
    run_id: int | None


_DROP = object()


class DatasetImport:
    """One import of a dataset folder into a project."""

    def __init__(self, sessions: sessionmaker[Session], blobs: LocalBlobStore,
                 settings: Settings, project_id: int, fmt: str, options: ImportOptions,
                 author_key_id: int | None = None, progress: Progress | None = None) -> None:
        self.sessions, self.blobs, self.settings = sessions, blobs, settings
        self.project_id, self.fmt, self.options = project_id, fmt, options
        self.author_key_id = author_key_id
        self.progress = progress or (lambda *_: None)
        self.report = Report(format=fmt)
        self.new_images: dict[str, _NewImage] = {}
        self.labels: dict[tuple[str, Any], _Label] = {}
        self.sizes: dict[tuple[str, Any], tuple[int, int]] = {}
        self.existing_seen: set[int] = set()
        self.unsynced: list[str] = []
        self.written: dict[str, Path] = {}  # blobs this import created -> their source file
        self._by_name: dict[str, list[tuple[int, int, int]]] | None = None
        self.task = ""
        self.classes: set[str] = set()  # the project's, and those this import will create

    # -- phase 1 -----------------------------------------------------------------------------

    def run(self, root: Path, annotation_file: Path | None = None,
            finish: Finish | None = None, begin: Begin | None = None) -> ImportResult:
        """Read, check and write; ``begin`` and ``finish`` run inside the final transaction.

        On failure the blobs this import created are deleted unless an image row names them
        (not on ``LeaseLost``: the delivery that took over may be using them).
        """
        try:
            return self._run(root, annotation_file, finish, begin)
        except LeaseLost:
            raise
        except BaseException:
            self.drop_orphans()
            raise

    def _run(self, root: Path, annotation_file: Path | None, finish: Finish | None,
             begin: Begin | None) -> ImportResult:
        with self.sessions() as session:
            project = session.get(Project, self.project_id)
            if project is None:
                raise ImportFailed("not_found", f"project {self.project_id} not found", 404)
            self.task = project.task
            self.classes = set(session.scalars(
                select(ProjectClass.name).where(ProjectClass.project_id == self.project_id)))
        self.progress(0.0, "reading", {})
        items, notes = read_dataset(self.fmt, FileIndex(root), self.task, annotation_file)
        for note in notes:
            self.report.add(note)
        self.report.items = len(items)
        last = time.monotonic()
        with self.sessions() as session:
            for n, item in enumerate(items, 1):
                self._prepare(session, item)
                if time.monotonic() - last > 0.5:
                    session.rollback()  # do not hold a read snapshot across progress commits
                    self.progress(0.9 * n / len(items), "checking", self.counts())
                    last = time.monotonic()
        self.progress(0.9, "writing", self.counts())
        self._restore_missing()
        self.blobs.sync(self.unsynced)  # blobs are on disk before a row points at them
        checked = copy.deepcopy(self.report)
        for attempt in range(1, 4):
            try:
                return self._write(finish, begin)
            except IntegrityError:  # a concurrent import or upload added the same class/row
                if attempt == 3:
                    raise
                log.info("import into project %s: write conflict, trying again",
                         self.project_id)
                self.report = copy.deepcopy(checked)
        raise AssertionError("unreachable")

    def _restore_missing(self) -> None:
        """Re-store a new image's blob that was there in phase 1 but is gone now (another
        failed import that had written it cleaned it up)."""
        for new in self.new_images.values():
            key = image_key(new.sha256)
            if key not in self.written and not self.blobs.exists(key):
                self.blobs.put(key, new.path.read_bytes(), sync=False)
                self.unsynced.append(key)
                self.written[key] = new.path

    def drop_orphans(self) -> None:
        """Delete the blobs this import created that no image row (of any project) names.

        A blob named meanwhile by a concurrent upload is put back from its source file.
        """
        if not self.written:
            return
        try:
            keys = list(self.written)
            dropped = [k for k in keys if k not in self._referenced(keys)]
            for key in dropped:
                self.blobs.delete(key)
            for key in self._referenced(dropped):
                self.blobs.put(key, self.written[key].read_bytes())
            log.info("import into project %s failed: %d new blobs deleted", self.project_id,
                     len(dropped))
        except Exception:  # the database is down: the blobs stay (unreferenced)
            log.warning("could not clean up the blobs of a failed import", exc_info=True)

    def _referenced(self, keys: list[str]) -> set[str]:
        found: set[str] = set()
        with self.sessions() as session:
            for start in range(0, len(keys), 500):
                found.update(session.scalars(select(Image.storage_key).where(
                    Image.storage_key.in_(keys[start:start + 500]))))
        return found

    def counts(self) -> dict[str, Any]:
        summary = self.report.as_json()
        for key in ("problems", "classes_created"):
            summary.pop(key)
        return summary

    def _note(self, entry: dict[str, Any]) -> None:
        if entry["code"] in WARNINGS:
            entry["level"] = "warning"
        elif entry.get("object") is not None:
            self.report.objects_rejected += 1
        self.report.add(entry)

    def _prepare(self, session: Session, item: SourceItem) -> None:
        for entry in item.problems:
            self._note(entry)
        target = self._image(session, item)
        if target is None:
            if item.tags is not None or item.boxes:
                self.report.labels_skipped += 1
            return
        width, height = self.sizes[target]
        label = self._label(item, target, width, height)
        if label is None:
            return
        previous = self.labels.get(target)
        if previous is None:
            self.labels[target] = label
        elif (previous.tags, previous.boxes) == (label.tags, label.boxes):
            return
        elif self.task == "multilabel" and previous.tags is not None and label.tags is not None:
            previous.tags = sorted(set(previous.tags) | set(label.tags))
        else:
            self._note(problem(item.file, "conflicting_labels", "this image is also labeled "
                               f"(differently) by {previous.file}; that label is kept",
                               image=item.image_ref))
            self.report.labels_skipped += 1

    def _image(self, session: Session, item: SourceItem) -> tuple[str, Any] | None:
        """The image an item labels: ("sha", digest) for a new one, ("id", id) for a stored one."""
        path = item.image_path
        if path is None:
            return self._stored_by_name(session, item)
        name = item.image_ref or path.name
        try:
            if path.stat().st_size > self.settings.max_upload_bytes:
                raise ImageRejected("payload_too_large", "the file exceeds the upload limit "
                                    f"({self.settings.max_upload_bytes} bytes)", 413)
            data = path.read_bytes()
            digest = sha256_hex(data)
            if digest in self.new_images:
                return ("sha", digest)
            row = session.execute(select(Image.id, Image.width, Image.height).where(
                Image.project_id == self.project_id, Image.sha256 == digest)).first()
            if row is not None:
                return self._stored(row)
            info = inspect_image(data, max_pixels=self.settings.max_image_pixels)
        except ImageRejected as exc:
            self._note(problem(name, exc.code, exc.message))
            self.report.images_failed += 1
            return None
        key = image_key(digest)
        if not self.blobs.exists(key):
            self.blobs.put(key, data, sync=False)  # flushed together before any row is written
            self.unsynced.append(key)
            self.written[key] = path
        self.new_images[digest] = _NewImage(digest, PurePosixPath(name).name[:255] or "image",
                                            info.format, len(data), info.width, info.height,
                                            path)
        self.sizes[("sha", digest)] = (info.width, info.height)
        self.report.images_new += 1
        return ("sha", digest)

    def _stored(self, row: Any) -> tuple[str, Any]:
        target = ("id", int(row[0]))
        self.sizes[target] = (int(row[1]), int(row[2]))
        if target[1] not in self.existing_seen:
            self.existing_seen.add(target[1])
            self.report.images_existing += 1
        return target

    def _stored_by_name(self, session: Session, item: SourceItem) -> tuple[str, Any] | None:
        """An annotation without its image file: the project's image of that file name."""
        if self._by_name is None:
            self._by_name = {}
            for iid, fname, w, h in session.execute(
                    select(Image.id, Image.filename, Image.width, Image.height)
                    .where(Image.project_id == self.project_id)):
                self._by_name.setdefault(fname.lower(), []).append((iid, w, h))
        base = PurePosixPath(item.image_ref.replace("\\", "/").split("?", 1)[0]).name
        for option in dict.fromkeys((base, _LS_UPLOAD_PREFIX.sub("", base))):
            found = self._by_name.get(option.lower(), [])
            if len(found) == 1:
                return self._stored(found[0])
            if len(found) > 1:
                self._note(problem(item.file, "ambiguous_image", f"{len(found)} images of the "
                                   f"project are named {option!r}", image=item.image_ref))
                return None
        self._note(problem(item.file, "image_missing", "the image is neither in the dataset "
                           "nor in the project (by file name)", image=item.image_ref))
        return None

    # -- labels ------------------------------------------------------------------------------

    def _map(self, item: SourceItem, name: str, obj: int | None) -> Any:
        """The project class for a source class, ``_DROP``, or None (reported)."""
        name = name.strip()
        target = self.options.mapping.get(name, name)
        if target is None:
            return _DROP
        target = target.strip()
        if target in self.classes:
            return target
        if not target or len(target) > 100:
            self._note(problem(item.file, "invalid_class_name", f"class name {target!r} must "
                               "have 1 to 100 characters", image=item.image_ref, obj=obj))
            return None
        if not self.options.create_classes:
            self._note(problem(item.file, "unknown_class", f"class {target!r} is not in the "
                               "project (create_classes is off)", image=item.image_ref,
                               obj=obj))
            return None
        if len(self.classes) >= MAX_CLASSES:
            self._note(problem(item.file, "too_many_classes", f"a project has at most "
                               f"{MAX_CLASSES} classes", image=item.image_ref, obj=obj))
            return None
        self.classes.add(target)
        return target

    def _label(self, item: SourceItem, target: tuple[str, Any], width: int,
               height: int) -> _Label | None:
        if self.task == "detection":
            return self._boxes(item, target, width, height)
        return self._tags(item)

    def _orientation(self, target: tuple[str, Any]) -> int:
        """The EXIF orientation of a new or stored image (read from its file header)."""
        kind, key = target
        if kind == "sha":
            return orientation(self.new_images[key].path)
        with self.sessions() as session:
            storage_key = session.scalar(select(Image.storage_key).where(Image.id == key))
        try:
            return orientation(self.blobs.path(storage_key)) if storage_key else 1
        except BlobMissing:
            return 1

    def _frame(self, item: SourceItem, target: tuple[str, Any], width: int,
               height: int) -> int | None:
        """1, or the EXIF orientation whose raw frame the file's boxes are in; None: skip.

        A declared size that is the displayed one turned by 90 degrees, on an image whose
        orientation turns it (5-8), means the labels were drawn on the stored pixels.
        """
        if not item.declared_size or item.declared_size == (width, height):
            return 1
        dw, dh = item.declared_size
        turned = (dh, dw) == (width, height)
        orient = self._orientation(target) if turned else 1
        if orient in SWAPPED:
            self._note(problem(item.file, "frame_corrected", f"the file says {dw}x{dh}, the "
                               f"stored pixel size of this image with EXIF orientation "
                               f"{orient}: its objects were moved into the displayed "
                               f"{width}x{height} frame", image=item.image_ref))
            return orient
        hint = " (EXIF-rotated? labels must be in the displayed frame)" if turned else ""
        self._note(problem(item.file, "size_mismatch", f"the file says {dw}x{dh}, the image "
                           f"is {width}x{height}{hint}", image=item.image_ref))
        self.report.labels_skipped += 1
        return None

    def _boxes(self, item: SourceItem, target: tuple[str, Any], width: int,
               height: int) -> _Label | None:
        if item.boxes is None:
            if item.tags:
                self._note(problem(item.file, "no_boxes", "image-level classes cannot label a "
                                   "detection project", image=item.image_ref))
                self.report.labels_skipped += 1
            return None
        frame = self._frame(item, target, width, height)
        if frame is None:
            return None
        raw_w, raw_h = (height, width) if frame in SWAPPED else (width, height)
        clean: list[dict[str, Any]] = []
        dropped = 0
        for box in item.boxes:
            label = self._map(item, box.label, box.index)
            if label is _DROP:
                dropped += 1
                continue
            if label is None:
                continue
            sx, sy = (raw_w, raw_h) if box.normalized else (1, 1)
            raw: dict[str, Any] = {"label": label, "x": box.x * sx, "y": box.y * sy,
                                   "width": box.width * sx, "height": box.height * sy}
            if box.polygon is not None:
                raw["polygon"] = [[px * sx, py * sy] for px, py in box.polygon]
            if frame != 1:
                raw = box_to_displayed(raw, frame, raw_w, raw_h)
            try:
                clean.extend(clean_boxes([raw], width=width, height=height, classes=(label,),
                                         max_boxes=1))
            except BoxRejected as exc:
                self._note(problem(item.file, exc.code, exc.reason, image=item.image_ref,
                                   obj=box.index))
        had_objects = bool(item.boxes) or any(p.get("object") is not None
                                              and p["code"] not in WARNINGS
                                              for p in item.problems)
        if had_objects and not clean and not dropped:
            self.report.labels_skipped += 1
            return None  # every object was rejected: not a label of an empty image
        if len(clean) > self.settings.max_boxes_per_image:
            self._note(problem(item.file, "too_many_boxes", f"{len(clean)} objects; at most "
                               f"{self.settings.max_boxes_per_image} per image",
                               image=item.image_ref))
            self.report.labels_skipped += 1
            return None
        return _Label(item.file, None, clean)

    def _tags(self, item: SourceItem) -> _Label | None:
        names = list(item.tags or []) + [b.label for b in item.boxes or []]
        if not names:  # an explicit empty tag list labels a multilabel image with no class
            empty = item.tags is not None and self.task == "multilabel"
            return _Label(item.file, [], None) if empty else None
        tags: list[str] = []
        for name in dict.fromkeys(n.strip() for n in names):
            tag = self._map(item, name, None)
            if tag is None:
                self.report.labels_skipped += 1
                return None
            if tag is not _DROP and tag not in tags:
                tags.append(tag)
        if not tags:
            return None
        if self.task == "multiclass" and len(tags) != 1:
            self._note(problem(item.file, "one_tag_required", f"a multiclass image takes one "
                               f"class; this one has {len(tags)}: {', '.join(tags)}",
                               image=item.image_ref))
            self.report.labels_skipped += 1
            return None
        return _Label(item.file, sorted(tags) if self.task == "multilabel" else tags, None)

    # -- phase 2 -----------------------------------------------------------------------------

    def _write(self, finish: Finish | None, begin: Begin | None) -> ImportResult:
        with self.sessions() as session:
            if begin is not None:
                begin(session)
            project = session.get(Project, self.project_id)
            if project is None:
                raise ImportFailed("not_found", f"project {self.project_id} not found", 404)
            known = self._create_classes(session)
            ids = self._insert_images(session)
            self._write_labels(session, project, known, ids)
            run = maybe_queue_run(session, project, self.settings) \
                if self.report.labels_created else None
            if finish is not None:
                finish(session, self.report)
            session.commit()
            return ImportResult(self.report, sorted(ids.values()),
                                run.id if run is not None else None)

    def _create_classes(self, session: Session) -> list[str]:
        known = list(session.scalars(select(ProjectClass.name).where(
            ProjectClass.project_id == self.project_id).order_by(ProjectClass.id)))
        used: dict[str, None] = {}
        for label in self.labels.values():
            for name in label.tags or [b["label"] for b in label.boxes or []]:
                used[name] = None
        for name in used:
            if name not in known:
                session.add(ProjectClass(project_id=self.project_id, name=name))
                known.append(name)
                self.report.classes_created.append(name)
        session.flush()
        return known

    def _insert_images(self, session: Session) -> dict[str, int]:
        """Rows for the new images (a concurrent upload of the same bytes is kept)."""
        ids: dict[str, int] = {}
        new = list(self.new_images.values())
        for start in range(0, len(new), _CHUNK):
            chunk = new[start:start + _CHUNK]
            now = utcnow()
            insert_ignore(session, Image, [
                {"project_id": self.project_id, "sha256": n.sha256,
                 "storage_key": image_key(n.sha256), "filename": n.filename,
                 "format": n.format, "size_bytes": n.size_bytes, "width": n.width,
                 "height": n.height, "labeled": False, "created_at": now} for n in chunk])
            rows = session.execute(select(Image.sha256, Image.id).where(
                Image.project_id == self.project_id,
                Image.sha256.in_([n.sha256 for n in chunk])))
            ids.update({sha: iid for sha, iid in rows})
        return ids

    def _write_labels(self, session: Session, project: Project, known: list[str],
                      ids: dict[str, int]) -> None:
        pending = [((ids[key] if kind == "sha" else key), label)
                   for (kind, key), label in self.labels.items()]
        for start in range(0, len(pending), _CHUNK):
            chunk = pending[start:start + _CHUNK]
            image_ids = [iid for iid, _ in chunk]
            images = {i.id: i for i in session.scalars(select(Image).where(
                Image.id.in_(image_ids)))}
            current = {a.image_id: a for a in session.scalars(select(Annotation).where(
                Annotation.image_id.in_(image_ids), Annotation.is_current.is_(True)))}
            for iid, label in chunk:
                self._write_label(session, project, known, images[iid], current.get(iid),
                                  label)

    def _write_label(self, session: Session, project: Project, known: list[str], image: Image,
                     current: Annotation | None, label: _Label) -> None:
        if current is not None:
            same = (sorted(current.tags or []) == sorted(label.tags or [])
                    if label.boxes is None else current.boxes == label.boxes)
            if same and (current.boxes is None) == (label.boxes is None):
                self.report.labels_unchanged += 1
                return
            if self.options.existing == "keep":
                self.report.labels_kept += 1
                return
        try:
            record_annotation(session, project, image, known, self.settings, tags=label.tags,
                              boxes=label.boxes, source="manual",
                              author_key_id=self.author_key_id, import_format=self.fmt)
        except APIError as exc:  # validation happens before anything is written
            self._note(problem(label.file, exc.code, exc.message))
            self.report.labels_skipped += 1
            return
        self.report.labels_created += 1
        self.report.objects_imported += len(label.boxes or [])
