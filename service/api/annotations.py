"""Annotations (history kept) and the training policy hook."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from service.api.projects import class_names
from service.deps import AnnotatorKey, CtxDep, PathId, SessionDep, visible_image
from service.labeling import record_annotation
from service.schemas import AnnotationCreate, AnnotationHistory, AnnotationOut
from service.tables import Annotation, Project
from workers.policy import maybe_queue_run

router = APIRouter(prefix="/api/v1", tags=["annotations"])


def annotation_out(row: Annotation) -> AnnotationOut:
    return AnnotationOut(id=row.id, image_id=row.image_id, tags=list(row.tags or []),
                         boxes=row.boxes, source=row.source,  # type: ignore[arg-type]
                         suggestion_id=row.suggestion_id, author_key_id=row.author_key_id,
                         is_current=row.is_current, created_at=row.created_at,
                         import_format=row.import_format)


@router.post("/images/{iid}/annotations", status_code=201, response_model=AnnotationOut)
def create_annotation(iid: PathId, body: AnnotationCreate, session: SessionDep, ctx: CtxDep,
                      key: AnnotatorKey) -> AnnotationOut:
    """Label an image. The previous label stays in the history."""
    image = visible_image(session, key, iid)
    project = session.get(Project, image.project_id)
    assert project is not None
    boxes = None if body.boxes is None else [b.model_dump(exclude_none=True) for b in body.boxes]
    row = record_annotation(session, project, image, class_names(session, project.id),
                            ctx.settings, tags=body.tags, boxes=boxes, source=body.source,
                            suggestion_id=body.suggestion_id, author_key_id=key.id)
    run = maybe_queue_run(session, project, ctx.settings)
    session.commit()
    if run is not None:  # only after the commit: a rolled-back label enqueues nothing
        ctx.queue.send_train(ctx.sessions, run.id)
    elif project.task != "detection" and ctx.settings.head_views:
        # the worker embeds the head's training views of the image before a run needs them
        ctx.queue.send_embed([image.id])
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
