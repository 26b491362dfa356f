"""The Label Studio ML backend routes (DESIGN section 3.1), under ``PRELABEL_LABELSTUDIO_PREFIX``.

Label Studio calls these with its own request shapes; they are accepted as sent (unknown
fields ignored) and answered in its shapes. Predictions come from the promoted model of the
prelabel project the Label Studio project is linked to; training is only ever queued.
"""

from __future__ import annotations

import base64
import logging
import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.api.projects import class_names, promoted_model
from service.api.suggestions import suggest
from service.context import AppContext
from service.deps import CtxDep, SessionDep
from service.errors import APIError
from service.labeling import record_annotation
from service.labelstudio.fetch import FetchError, ImageFetcher
from service.labelstudio.label_config import LabelMapping
from service.labelstudio.links import (
    ensure_link,
    find_link,
    project_key,
    task_images,
    webhook_project_key,
)
from service.labelstudio.results import label_from_result, ls_prediction
from service.schemas import MAX_ID
from service.tables import (
    Annotation,
    Image,
    LabelStudioLink,
    LabelStudioTask,
    ModelVersion,
    Project,
)
from workers.policy import create_run, maybe_queue_run

log = logging.getLogger(__name__)
NO_MODEL_VERSION = "untrained"
MAX_TASKS = 10_000


def model_version(row: ModelVersion | None) -> str:
    """The ``model_version`` Label Studio sees: changes with every promotion."""
    return f"v{row.version}" if row is not None else NO_MODEL_VERSION


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


async def check_basic_auth(request: Request) -> None:
    """HTTP Basic auth when a username and password are configured (Label Studio's
    "Basic Authentication" connection option). Read by hand: the OpenAPI schema does not
    declare it, since it is off unless configured."""
    settings = request.app.state.ctx.settings
    if not (settings.labelstudio_username and settings.labelstudio_password):
        return
    creds = _basic_credentials(request.headers.get("authorization", ""))
    ok = creds is not None and secrets.compare_digest(
        creds[0].encode(), settings.labelstudio_username.encode()) and \
        secrets.compare_digest(creds[1].encode(), settings.labelstudio_password.encode())
    if not ok:
        raise APIError(401, "unauthorized", "this ML backend needs HTTP Basic auth: set it in "
                       "Label Studio's model connection")


class LSBody(BaseModel):
    """Label Studio's bodies carry fields we do not use: accepted and ignored."""

    model_config = ConfigDict(extra="allow")


class SetupIn(LSBody):
    project: str | int
    schema_: str | None = Field(default=None, alias="schema")
    hostname: str | None = Field(default=None, max_length=500)
    access_token: str | None = None


class PredictIn(LSBody):
    tasks: list[Any] = Field(max_length=MAX_TASKS)
    project: str | int | None = None
    label_config: str | None = None


class WebhookIn(LSBody):
    action: str = ""
    project: dict[str, Any] | None = None
    annotation: dict[str, Any] | None = None
    annotations: list[Any] | None = None
    task: dict[str, Any] | None = None


def build_router(prefix: str) -> APIRouter:
    """The routes, under ``prefix`` (a setting: more than one prelabel may share a host)."""
    router = APIRouter(prefix=prefix.rstrip("/"), tags=["labelstudio"],
                       dependencies=[Depends(check_basic_auth)])
    router.add_api_route("/health", health, methods=["GET"])
    router.add_api_route("/", health, methods=["GET"], include_in_schema=False)
    router.add_api_route("/setup", setup, methods=["POST"])
    router.add_api_route("/predict", predict, methods=["POST"])
    handled = {200: {"description": "an action that is not ours: ignored"},
               502: {"description": "the task's image could not be fetched"}}
    router.add_api_route("/webhook", webhook, methods=["POST"], status_code=201,
                         responses=handled)
    router.add_api_route("/train", train, methods=["POST"], status_code=201, responses=handled)
    return router


async def health() -> dict[str, str]:
    """Label Studio's connection check (1 s timeout): nothing is touched."""
    return {"status": "UP", "model_class": "prelabel"}


def _fetcher(ctx: AppContext, link: LabelStudioLink) -> ImageFetcher:
    # The key is ours (PRELABEL_LABELSTUDIO_API_KEY): the access_token /setup carries is not
    # kept, and 1.23 sends a legacy token there that works only where those are enabled.
    return ImageFetcher(ctx.settings, base_url=link.hostname or "")


def setup(body: SetupIn, session: SessionDep) -> dict[str, str]:
    """Link the Label Studio project (created from its label config on first contact)."""
    key = project_key(body.project)
    link, _ = ensure_link(session, key, body.schema_, hostname=body.hostname)
    session.commit()
    return {"model_version": model_version(promoted_model(session, link.project_id))}


def predict(body: PredictIn, session: SessionDep, ctx: CtxDep) -> dict[str, Any]:
    """One prediction per task, in task order, from the promoted model (batched).

    Before a model exists every task gets an empty result. A task whose image cannot be
    fetched gets an empty result with an ``error`` (code, message); the others are answered.
    """
    if body.project is None:
        raise APIError(422, "invalid_project", "'project' is required")
    link, mapping = ensure_link(session, project_key(body.project), body.label_config)
    images, new_ids = task_images(session, ctx, link, mapping, _fetcher(ctx, link), body.tasks)
    session.commit()
    if new_ids and mapping.task != "detection":
        ctx.queue.send_embed(new_ids)  # their embeddings serve the next requests and training
    row = promoted_model(session, link.project_id)
    version = model_version(row)
    stored = [i for i in images if isinstance(i, Image)]
    payloads: dict[int, dict[str, Any]] = {}
    if row is not None and stored:
        unique = list({i.id: i for i in stored}.values())
        payloads = dict(zip([i.id for i in unique], suggest(session, ctx, unique, row),
                            strict=True))
    results = []
    for image in images:
        if isinstance(image, FetchError):
            log.warning("label studio project %s: %s", link.ls_project, image.message)
            results.append({"result": [], "score": 0.0, "model_version": version,
                            "error": {"code": image.code, "message": image.message}})
        elif row is None:
            results.append({"result": [], "score": 0.0, "model_version": version})
        else:
            results.append(ls_prediction(payloads[image.id], mapping, version))
    return {"results": results, "model_version": version}


def webhook(body: WebhookIn, session: SessionDep, ctx: CtxDep) -> JSONResponse:
    """Annotations become prelabel labels; training requests queue a run. 201 when handled,
    200 for actions that are not ours."""
    action = body.action
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        out = _annotation_saved(body, session, ctx)
    elif action in ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED"):
        out = _annotations_deleted(body, session)
    elif action in ("START_TRAINING", "PROJECT_UPDATED"):
        out = _queue_training(body, session, ctx)
    else:
        return JSONResponse({"status": "ignored", "action": action[:80]}, status_code=200)
    return JSONResponse({"status": "ok", **out}, status_code=201)


def train(body: WebhookIn, session: SessionDep, ctx: CtxDep) -> JSONResponse:
    """Older Label Studio servers ask for training here: a run is queued, never run inline."""
    return JSONResponse({"status": "ok", **_queue_training(body, session, ctx)}, status_code=201)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


def _link_of(body: WebhookIn, session: Session) -> tuple[LabelStudioLink, LabelMapping]:
    project = body.project or {}
    config = project.get("label_config")
    return ensure_link(session, webhook_project_key(project),
                       config if isinstance(config, str) else None)


def _annotation_saved(body: WebhookIn, session: Session, ctx: AppContext) -> dict[str, Any]:
    annotation, task = body.annotation or {}, body.task or {}
    if not annotation or not task:
        raise APIError(422, "invalid_webhook", f"{body.action} needs 'annotation' and 'task'")
    link, mapping = _link_of(body, session)
    project = session.get(Project, link.project_id)
    assert project is not None
    if annotation.get("was_cancelled"):
        return {"recorded": False, "reason": "the annotation was skipped (cancelled)"}
    [image], _ = task_images(session, ctx, link, mapping, _fetcher(ctx, link), [task])
    if isinstance(image, FetchError):
        raise APIError(image.status, image.code, image.message)
    result = annotation.get("result")
    if not isinstance(result, list):
        raise APIError(422, "invalid_labelstudio_result", "annotation.result must be a list")
    tags, boxes = label_from_result(result, mapping, image.width, image.height)
    if tags is not None and not tags:
        session.commit()  # the image is stored all the same
        return {"recorded": False, "reason": f"no choice of {mapping.from_name!r} in the "
                "annotation: nothing to learn"}
    row = record_annotation(session, project, image, class_names(session, project.id),
                            ctx.settings, tags=tags, boxes=boxes)
    ann_id = annotation.get("id")
    session.execute(update(LabelStudioTask).where(
        LabelStudioTask.link_id == link.id, LabelStudioTask.image_id == image.id)
        .values(annotation_id=ann_id if _is_id(ann_id) else None))
    run = maybe_queue_run(session, project, ctx.settings)
    session.commit()
    if run is not None:  # after the commit: a rolled-back label enqueues nothing
        ctx.queue.send_train(ctx.sessions, run.id)
    return {"recorded": True, "annotation_id": row.id, "image_id": image.id,
            "training_run_id": run.id if run is not None else None}


def _annotations_deleted(body: WebhookIn, session: Session) -> dict[str, Any]:
    """A deleted Label Studio annotation that gave an image its current label unlabels the
    image; its rows stay in the history."""
    link = find_link(session, webhook_project_key(body.project or {}))
    if link is None:
        raise APIError(404, "unknown_project", "the webhook's project is not connected")
    deleted = [a for a in (body.annotations or [body.annotation or {}]) if isinstance(a, dict)]
    ids = [a["id"] for a in deleted if _is_id(a.get("id"))]
    rows = list(session.scalars(select(LabelStudioTask).where(
        LabelStudioTask.link_id == link.id, LabelStudioTask.annotation_id.in_(ids))))
    for row in rows:
        session.execute(update(Annotation).where(Annotation.image_id == row.image_id,
                                                 Annotation.is_current.is_(True))
                        .values(is_current=False))
        session.execute(update(Image).where(Image.id == row.image_id).values(labeled=False))
        row.annotation_id = None
    session.commit()
    return {"unlabeled_images": sorted(r.image_id for r in rows)}


def _queue_training(body: WebhookIn, session: Session, ctx: AppContext) -> dict[str, Any]:
    link, _ = _link_of(body, session)
    project = session.get(Project, link.project_id)
    assert project is not None
    labeled = session.scalar(select(Image.id).where(Image.project_id == project.id,
                                                    Image.labeled.is_(True)).limit(1))
    if labeled is None:
        session.commit()
        return {"training_run_id": None, "reason": "no labeled images yet"}
    run = create_run(session, project, "manual", ctx.settings)
    session.commit()
    if run is None:
        return {"training_run_id": None, "reason": "a run is already queued"}
    ctx.queue.send_train(ctx.sessions, run.id)
    return {"training_run_id": run.id}
