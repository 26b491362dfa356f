"""Recording a label on an image: validation against the project, history, policy hook."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.boxes import BoxRejected, clean_boxes
from service.errors import APIError
from service.settings import Settings
from service.tables import Annotation, Image, Project, Suggestion


def validate_tags(task: str, tags: Sequence[str] | None, known: Sequence[str]) -> list[str]:
    """Check tags against the project's task and classes (422 with the reason)."""
    if tags is None:
        raise APIError(422, "tags_required", f"a {task} project is labeled with 'tags'")
    unknown = [t for t in tags if t not in known]
    if unknown:
        raise APIError(422, "unknown_class", f"unknown class {unknown[0]!r}",
                       {"unknown": unknown, "classes": list(known)})
    if len(set(tags)) != len(tags):
        raise APIError(422, "duplicate_tag", "a tag is listed twice")
    if task == "multiclass" and len(tags) != 1:
        raise APIError(422, "one_tag_required",
                       f"a multiclass image takes exactly one tag, got {len(tags)}")
    return list(tags)


def validate_boxes(image: Image, boxes: Sequence[Mapping[str, Any]] | None,
                   known: Sequence[str], settings: Settings) -> list[dict[str, Any]]:
    """Check and clip boxes against the image and classes (422 ``invalid_box`` per object)."""
    if boxes is None:
        raise APIError(422, "boxes_required", "a detection project is labeled with 'boxes' "
                       "(an empty list means: nothing to detect in this image)")
    try:
        return clean_boxes(boxes, width=image.width, height=image.height, classes=known,
                           max_boxes=settings.max_boxes_per_image)
    except BoxRejected as exc:
        details: dict[str, Any] = {"index": exc.index, "reason": exc.code}
        if exc.code == "unknown_class":
            details["classes"] = list(known)
        raise APIError(422, "invalid_box", str(exc), details) from exc


def record_annotation(session: Session, project: Project, image: Image, known: Sequence[str],
                      settings: Settings, *, tags: Sequence[str] | None = None,
                      boxes: Sequence[Mapping[str, Any]] | None = None, source: str = "manual",
                      suggestion_id: str | None = None, author_key_id: int | None = None,
                      import_format: str | None = None) -> Annotation:
    """Validate and add the image's new current label (the previous one stays in history).

    Detection labels also store the set of classes present as ``tags``, so per-class counts
    and the training policy read one column for every task. ``import_format`` marks a label
    written by a dataset import (source ``manual``). The caller commits.
    """
    if project.task == "detection":
        if tags is not None:
            raise APIError(422, "boxes_required",
                           "a detection project takes 'boxes', not 'tags'")
        clean = validate_boxes(image, boxes, known, settings)
        stored_tags: list[str] = sorted({b["label"] for b in clean})
        stored_boxes: list[dict[str, Any]] | None = clean
    else:
        if boxes is not None:
            raise APIError(422, "boxes_not_supported",
                           f"a {project.task} project takes 'tags', not 'boxes'")
        stored_tags, stored_boxes = validate_tags(project.task, tags, known), None
    if source != "manual" and suggestion_id is None:
        raise APIError(422, "suggestion_required",
                       f"source {source!r} needs the suggestion_id it answers")
    if suggestion_id is not None:
        suggestion = session.get(Suggestion, suggestion_id)
        if suggestion is None or suggestion.image_id != image.id or suggestion.served_at is None:
            raise APIError(422, "invalid_suggestion",
                           "suggestion_id does not name a suggestion served for this image")
    session.execute(update(Annotation).where(Annotation.image_id == image.id,
                                             Annotation.is_current.is_(True))
                    .values(is_current=False))
    row = Annotation(project_id=project.id, image_id=image.id, tags=stored_tags,
                     boxes=stored_boxes, source=source, suggestion_id=suggestion_id,
                     author_key_id=author_key_id, is_current=True,
                     import_format=import_format)
    session.add(row)
    image.labeled = True
    session.flush()
    return row
