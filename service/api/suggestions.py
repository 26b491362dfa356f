"""Suggestions for stored images (single and batch) and ad-hoc prediction."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from models.constants import INPUT_SIZE
from service.adapters import suggestion_out, without_low
from service.api.images import read_upload_bytes
from service.api.projects import promoted_model
from service.context import AppContext
from service.db import insert_ignore
from service.deps import AnnotatorKey, CtxDep, PathId, SessionDep, visible_project
from service.errors import APIError, not_found
from service.imaging import ImageRejected, decode_upload
from service.inference import (
    LoadedModel,
    detect_image_bytes,
    detect_rgb,
    predict_embeddings,
    predict_images_bytes,
    predict_rgb,
    stored_views,
    to_prediction,
)
from service.prediction import Prediction
from service.schemas import SuggestionBatchIn, SuggestionBatchOut, SuggestionOut
from service.tables import Embedding, Image, ModelVersion, Suggestion, utcnow

router = APIRouter(prefix="/api/v1", tags=["suggestions"])
PIPELINE_BATCH = 16  # images per graph call for images that have no embedding yet


def no_model() -> APIError:
    """409 for a project that has no promoted model yet."""
    return APIError(409, "no_model", "this project has no trained model yet; label at least "
                    "the minimum per class or start a training run")


def require_model(session: Session, project_id: int) -> ModelVersion:
    """The promoted model or 409 ``no_model``."""
    row = promoted_model(session, project_id)
    if row is None:
        raise no_model()
    return row


def predictions(session: Session, ctx: AppContext, model: LoadedModel, row: ModelVersion,
                images: list[Image], vectors: dict[int, bytes]) -> dict[int, Prediction]:
    """Canonical predictions for stored images: from cached embeddings, averaged with those
    of the model's prediction views, where the worker has embedded the image."""
    out: dict[int, Prediction] = {}
    if model.task == "detection":  # the detector reads the full image
        for image in images:
            out[image.id] = detect_image_bytes(ctx.models, model,
                                               ctx.blobs.get(image.storage_key),
                                               ctx.settings.max_image_pixels)
        return out
    probs: dict[int, np.ndarray] = {}
    embedded = [i for i in images if i.id in vectors]
    if embedded:
        x = np.stack([np.frombuffer(vectors[i.id], np.float32) for i in embedded])
        views = stored_views(session, row.backbone, model.views, [i.id for i in embedded])
        probs.update(zip([i.id for i in embedded], predict_embeddings(model, x, views),
                         strict=True))
    # not embedded yet: the whole pipeline, on the image alone (its views would cost 4 more
    # backbone passes in the request: Label Studio's cold /predict waits on these)
    todo = [i for i in images if i.id not in probs]
    for start in range(0, len(todo), PIPELINE_BATCH):
        batch = todo[start:start + PIPELINE_BATCH]
        probs.update(zip([i.id for i in batch], predict_images_bytes(
            ctx.models, model, [ctx.blobs.get(i.storage_key) for i in batch],
            ctx.settings.max_image_pixels, with_views=False), strict=True))
    return {i.id: to_prediction(model, probs[i.id], i.width, i.height) for i in images}


def suggest(session: Session, ctx: AppContext, images: list[Image], row: ModelVersion,
            known: dict[int, Suggestion] | None = None,
            vectors: dict[int, bytes] | None = None) -> list[dict[str, Any]]:
    """Suggestion payloads for stored images, reusing the ones stored for this model.

    Stored ones were served before or precomputed by the worker (then they are stamped as
    served now). ``known`` (stored suggestions) and ``vectors`` (embeddings) skip their
    queries when the caller already has them.
    """
    if known is None:
        known = {s.image_id: s for s in session.scalars(select(Suggestion).where(
            Suggestion.model_id == row.id, Suggestion.image_id.in_([i.id for i in images])))}
    todo = [i for i in images if i.id not in known]
    served: dict[int, dict[str, Any]] = {}
    if todo:
        model = ctx.models.get(row)
        if vectors is None and model.task != "detection":
            vectors = dict(session.execute(select(Embedding.image_id, Embedding.vector).where(
                Embedding.backbone == row.backbone,
                Embedding.image_id.in_([i.id for i in todo]))).all())
        preds = predictions(session, ctx, model, row, todo, vectors or {})
        fresh = {iid: suggestion_out(p, model.model_id, model.version, uuid.uuid4().hex,
                                     iid).model_dump(mode="json")
                 for iid, p in preds.items()}
        # one statement; if another request served some of these first, theirs are returned
        now = utcnow()
        inserted = insert_ignore(session, Suggestion, [
            {"id": out["suggestion_id"], "project_id": row.project_id, "image_id": iid,
             "model_id": row.id, "payload": out, "created_at": now, "served_at": now}
            for iid, out in fresh.items()])
        session.commit()
        if inserted == len(fresh):
            served.update(fresh)
        else:
            known.update((s.image_id, s) for s in session.scalars(select(Suggestion).where(
                Suggestion.model_id == row.id, Suggestion.image_id.in_(list(fresh)))))
    mark_served(session, [s.id for s in known.values() if s.served_at is None])
    for iid, suggestion in known.items():
        served.setdefault(iid, suggestion.payload)
    return [served[i.id] for i in images]


def mark_served(session: Session, ids: list[str]) -> None:
    """Stamp precomputed suggestions as sent (acceptance statistics count served ones)."""
    if ids:
        session.execute(update(Suggestion).where(Suggestion.id.in_(ids),
                                                 Suggestion.served_at.is_(None))
                        .values(served_at=utcnow()))
        session.commit()


def shown(payload: dict[str, Any], include_low: bool) -> dict[str, Any]:
    """A stored payload as answered: tags and boxes not suggested only when asked for."""
    return payload if include_low else without_low(payload)


IncludeLow = Annotated[bool, Query(description="also return what is not suggested, flagged "
                                   "`below_threshold`: boxes under their class threshold or "
                                   "naming an object a higher box names; a multiclass top "
                                   "class under the model's suggestion floor")]


@router.get("/images/{iid}/suggestions", response_model=SuggestionOut)
def image_suggestions(iid: PathId, session: SessionDep, ctx: CtxDep, key: AnnotatorKey,
                      include_low: IncludeLow = False) -> JSONResponse:
    """Suggested tags or boxes for a stored image from the promoted model (409 ``no_model``
    before one exists)."""
    # the hot path: image, promoted model and an already stored suggestion in one query
    found = session.execute(
        select(Image, ModelVersion, Suggestion, Embedding.vector)
        .outerjoin(ModelVersion, and_(ModelVersion.project_id == Image.project_id,
                                      ModelVersion.promoted.is_(True)))
        .outerjoin(Suggestion, and_(Suggestion.image_id == Image.id,
                                    Suggestion.model_id == ModelVersion.id))
        .outerjoin(Embedding, and_(Embedding.image_id == Image.id,
                                   Embedding.backbone == ModelVersion.backbone))
        .where(Image.id == iid)).first()
    if found is None or (key.project_id is not None and key.project_id != found[0].project_id):
        raise not_found("image", iid)
    image, row, stored, vector = found
    if row is None:
        raise no_model()
    if stored is not None:  # stored from a validated SuggestionOut: send it as it is
        if stored.served_at is None:
            mark_served(session, [stored.id])
        return JSONResponse(shown(stored.payload, include_low))
    payload = suggest(session, ctx, [image], row, known={},
                      vectors={image.id: vector} if vector is not None else None)[0]
    return JSONResponse(shown(payload, include_low))


@router.post("/projects/{pid}/suggestions", response_model=SuggestionBatchOut)
def batch_suggestions(pid: PathId, body: SuggestionBatchIn, session: SessionDep, ctx: CtxDep,
                      key: AnnotatorKey, include_low: IncludeLow = False) -> JSONResponse:
    """Suggestions for many stored images of one project, in the order asked."""
    visible_project(session, key, pid)
    limit = ctx.settings.max_batch_suggestions
    if len(body.image_ids) > limit:
        raise APIError(422, "too_many_images", f"at most {limit} image ids per request")
    row = require_model(session, pid)
    found = {i.id: i for i in session.scalars(select(Image).where(
        Image.project_id == pid, Image.id.in_(body.image_ids)))}
    for iid in body.image_ids:
        if iid not in found:
            raise not_found("image", iid)
    unique = list(dict.fromkeys(body.image_ids))
    served = dict(zip(unique, suggest(session, ctx, [found[i] for i in unique], row),
                      strict=True))
    return JSONResponse({"items": [shown(served[i], include_low) for i in body.image_ids]})


WithViews = Annotated[bool, Query(description="classification: average over the image and the "
                                  "model's prediction views, as stored suggestions are (about "
                                  "5x the model time); by default the image alone")]


@router.post("/projects/{pid}/predict", response_model=SuggestionOut)
def predict(pid: PathId, file: UploadFile, session: SessionDep, ctx: CtxDep,
            key: AnnotatorKey, include_low: IncludeLow = False,
            views: WithViews = False) -> JSONResponse:
    """Suggestions for an uploaded image (multipart ``file``); nothing is stored."""
    visible_project(session, key, pid)
    row = require_model(session, pid)
    detection = row.task == "detection"
    try:
        # one decode validates and feeds the model (classification: reduced JPEG decode)
        info, img = decode_upload(read_upload_bytes(file, ctx),
                                  draft_size=None if detection else INPUT_SIZE,
                                  max_pixels=ctx.settings.max_image_pixels)
    except ImageRejected as exc:
        raise APIError(exc.status, exc.code, exc.message) from exc
    model = ctx.models.get(row)
    if detection:
        pred = detect_rgb(ctx.models, model, img)
    else:
        # by default the image alone: one backbone pass instead of 1 + len(model.views)
        probs = predict_rgb(ctx.models, model, img, with_views=views)
        pred = to_prediction(model, probs, info.width, info.height)
    return JSONResponse(shown(suggestion_out(pred, model.model_id, model.version, None, None)
                              .model_dump(mode="json"), include_low))
