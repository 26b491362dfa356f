"""Annotations (history kept) and the training policy hook."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select, update

from service.api.projects import class_names
from service.deps import AnnotatorKey, CtxDep, PathId, SessionDep, visible_image
from service.errors import APIError
from service.schemas import AnnotationCreate, AnnotationHistory, AnnotationOut
from service.tables import Annotation, Project, Suggestion
from workers.policy import maybe_queue_run

router = APIRouter(prefix="/api/v1", tags=["annotations"])


def annotation_out(row: Annotation) -> AnnotationOut:
    return AnnotationOut(id=row.id, image_id=row.image_id, tags=list(row.tags or []),
                         boxes=row.boxes, source=row.source,  # type: ignore[arg-type]
                         suggestion_id=row.suggestion_id, author_key_id=row.author_key_id,
                         is_current=row.is_current, created_at=row.created_at)


def validate_tags(task: str, tags: list[str] | None, known: list[str]) -> list[str]:
    """Check tags against the project's task and classes (422 with the reason)."""
    if tags is None:
        raise APIError(422, "tags_required", f"a {task} project is labeled with 'tags'")
    unknown = [t for t in tags if t not in known]
    if unknown:
        raise APIError(422, "unknown_class", f"unknown class {unknown[0]!r}",
                       {"unknown": unknown, "classes": known})
    if len(set(tags)) != len(tags):
        raise APIError(422, "duplicate_tag", "a tag is listed twice")
    if task == "multiclass" and len(tags) != 1:
        raise APIError(422, "one_tag_required",
                       f"a multiclass image takes exactly one tag, got {len(tags)}")
    return tags


@router.post("/images/{iid}/annotations", status_code=201, response_model=AnnotationOut)
def create_annotation(iid: PathId, body: AnnotationCreate, session: SessionDep, ctx: CtxDep,
                      key: AnnotatorKey) -> AnnotationOut:
    """Label an image. The previous label stays in the history."""
    image = visible_image(session, key, iid)
    project = session.get(Project, image.project_id)
    assert project is not None
    if body.boxes is not None:
        raise APIError(422, "boxes_not_supported",
                       f"a {project.task} project takes 'tags', not 'boxes'")
    tags = validate_tags(project.task, body.tags, class_names(session, project.id))
    if body.source != "manual" and body.suggestion_id is None:
        raise APIError(422, "suggestion_required",
                       f"source {body.source!r} needs the suggestion_id it answers")
    if body.suggestion_id is not None:
        suggestion = session.get(Suggestion, body.suggestion_id)
        if suggestion is None or suggestion.image_id != image.id:
            raise APIError(422, "invalid_suggestion",
                           "suggestion_id does not name a suggestion served for this image")
    session.execute(update(Annotation).where(Annotation.image_id == image.id,
                                             Annotation.is_current.is_(True))
                    .values(is_current=False))
    row = Annotation(project_id=project.id, image_id=image.id, tags=tags, source=body.source,
                     suggestion_id=body.suggestion_id, author_key_id=key.id, is_current=True)
    session.add(row)
    image.labeled = True
    session.flush()
    run = maybe_queue_run(session, project, ctx.settings)
    session.commit()
    if run is not None:  # only after the commit: a rolled-back label enqueues nothing
        ctx.queue.send_train(ctx.sessions, run.id)
    return annotation_out(row)


@router.get("/images/{iid}/annotations", response_model=AnnotationHistory)
def list_annotations(iid: PathId, session: SessionDep, key: AnnotatorKey) -> AnnotationHistory:
    """The current label and the full history, newest first."""
    image = visible_image(session, key, iid)
    rows = list(session.scalars(select(Annotation).where(Annotation.image_id == image.id)
                                .order_by(Annotation.id.desc())))
    latest = next((r for r in rows if r.is_current), None)
    return AnnotationHistory(latest=annotation_out(latest) if latest else None,
                             history=[annotation_out(r) for r in rows])
