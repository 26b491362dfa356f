"""Embedding images with the pretrained backbone, and scoring them with a promoted model."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.backbone import INPUT_SIZE
from models.preprocess import to_model_input
from models.uncertainty import uncertainty
from models.views import PREDICTION_VIEWS, VIEWS, view_key
from service.adapters import suggestion_out
from service.db import insert_ignore
from service.imaging import ImageRejected, load_rgb
from service.inference import LoadedModel, predict_embeddings, stored_views, to_prediction
from service.prediction import Prediction
from service.storage import BlobMissing
from service.tables import Embedding, Image, ModelVersion, Project, Suggestion, utcnow
from workers.context import BackboneRef, WorkerContext

log = logging.getLogger(__name__)
BATCH = 32


def _load(ctx: WorkerContext, image: Image) -> PILImage.Image | None:
    """A stored image, decoded reduced to the model's input size (None, logged, when it
    cannot be read)."""
    try:
        data = ctx.blobs.get(image.storage_key)
        return load_rgb(data, max_pixels=ctx.settings.max_image_pixels, draft_size=INPUT_SIZE)
    except (BlobMissing, ImageRejected) as exc:
        log.warning("image %s cannot be embedded: %s", image.id, exc)
        return None


def _view_input(img: PILImage.Image, view: str | None) -> np.ndarray:
    return to_model_input(VIEWS[view](img) if view else img)


def decode_image(ctx: WorkerContext, image: Image, view: str | None = None) -> np.ndarray | None:
    """A stored image (or a view of it, ``models.views``) as a model input (None, logged, when
    it cannot be read)."""
    img = _load(ctx, image)
    return None if img is None else _view_input(img, view)


Job = tuple[Image, Sequence[str | None]]  # an image and its views to embed (None: itself)


def embed_views(ctx: WorkerContext, jobs: Sequence[Job], ref: BackboneRef | None = None
                ) -> dict[tuple[int, str | None], np.ndarray]:
    """Embeddings of views of images, keyed (image id, view). Each image is decoded once for
    all its views, and the next batch is decoded while the model runs on this one."""
    out: dict[tuple[int, str | None], np.ndarray] = {}
    batches = [jobs[i:i + BATCH] for i in range(0, len(jobs), BATCH)]

    def decode(batch: Sequence[Job]) -> list[tuple[tuple[int, str | None], np.ndarray]]:
        arrays = []
        for image, views in batch:
            img = _load(ctx, image)
            if img is not None:
                arrays.extend(((image.id, v), _view_input(img, v)) for v in views)
        return arrays

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(decode, batches[0]) if batches else None
        for n in range(len(batches)):
            assert future is not None
            arrays = future.result()
            if n + 1 < len(batches):
                future = pool.submit(decode, batches[n + 1])
            for start in range(0, len(arrays), BATCH):
                chunk = arrays[start:start + BATCH]
                vectors = ctx.embedder(ref).run(np.stack([a for _, a in chunk]))
                out.update((key, v.astype(np.float32))
                           for (key, _), v in zip(chunk, vectors, strict=True))
    return out


def embed_arrays(ctx: WorkerContext, images: Sequence[Image], ref: BackboneRef | None = None,
                 view: str | None = None) -> dict[int, np.ndarray]:
    """Embeddings for images (or one view of them), keyed by image id."""
    return {image_id: v for (image_id, _), v in
            embed_views(ctx, [(im, (view,)) for im in images], ref).items()}


def model_backbone(row: ModelVersion) -> BackboneRef:
    """The embedding a model version's head reads."""
    return BackboneRef(row.backbone, row.backbone_key, row.backbone_sha256)


def ensure_embeddings(ctx: WorkerContext, session: Session, image_ids: Sequence[int],
                      ref: BackboneRef | None = None, view: str | None = None) -> int:
    """Embed the given images (or a view of them) that lack an embedding; returns how many
    were added."""
    return ensure_views(ctx, session, image_ids, (view,), ref)


def ensure_views(ctx: WorkerContext, session: Session, image_ids: Sequence[int],
                 views: Sequence[str | None], ref: BackboneRef | None = None) -> int:
    """Embed the missing ``views`` (None: the image itself) of the given images, decoding
    each image once; returns how many embeddings were added."""
    if not views or not image_ids:
        return 0
    backbone = ref.id if ref else ctx.backbone
    keys = {v: view_key(backbone, v) if v else backbone for v in views}
    have = set(session.execute(select(Embedding.image_id, Embedding.backbone).where(
        Embedding.backbone.in_(set(keys.values())), Embedding.image_id.in_(image_ids))).all())
    missing = {i: [v for v in views if (i, keys[v]) not in have] for i in set(image_ids)}
    todo = list(session.scalars(select(Image).where(Image.id.in_(
        [i for i, vs in missing.items() if vs])).order_by(Image.id)))
    if not todo:
        return 0
    vectors = embed_views(ctx, [(im, missing[im.id]) for im in todo], ref)
    # idempotent: a redelivered job or another worker may have written some already
    added = insert_ignore(session, Embedding, [
        {"image_id": image_id, "backbone": keys[v], "vector": vec.tobytes(),
         "created_at": utcnow()} for (image_id, v), vec in vectors.items()])
    session.commit()
    return added


def embed_images(ctx: WorkerContext, image_ids: Sequence[int]) -> int:
    """Task body: embed images and, for classification, their views (``models.views``), then
    score them with their project's promoted model; returns how many embeddings were added."""
    with ctx.sessions() as session:
        # classification images get their views embedded with them (one decode each): the
        # prediction views of every image, for its suggestions, and the training views of a
        # labeled one ahead of the run that will train on them (embedding the views of 30
        # labeled crops in the run took ~2 s of the first model's time, benchmarks/core_loop.py)
        classified = dict(session.execute(select(Image.id, Image.labeled).join(
            Project, Project.id == Image.project_id).where(
            Image.id.in_(image_ids), Project.task != "detection")).all())
        settings = ctx.settings
        predict = list(PREDICTION_VIEWS) if settings.prediction_views else []
        train = list(VIEWS) if settings.head_views else []
        added = ensure_views(ctx, session, [i for i in image_ids if i not in classified], [None])
        added += ensure_views(ctx, session, [i for i, done in classified.items() if not done],
                              [None, *predict])
        added += ensure_views(ctx, session, [i for i, done in classified.items() if done],
                              [None, *dict.fromkeys([*predict, *train])])
        projects = set(session.scalars(select(Image.project_id).where(Image.id.in_(image_ids))))
        for project_id in projects:
            row = promoted(session, project_id)
            if row is not None and row.backbone_key is not None:  # fine-tuned: its own embedding
                ensure_embeddings(ctx, session, image_ids, model_backbone(row))
            score_images(ctx, session, project_id, image_ids)
        session.commit()
    return added


def promoted(session: Session, project_id: int) -> ModelVersion | None:
    """The promoted version of a project."""
    return session.scalar(select(ModelVersion).where(
        ModelVersion.project_id == project_id, ModelVersion.promoted.is_(True)))


def suggestion_row(row: ModelVersion, image_id: int, pred: Prediction) -> dict[str, Any]:
    """A precomputed (not yet served) suggestion of a promoted model, as a table row."""
    out = suggestion_out(pred, row.id, row.version, uuid.uuid4().hex, image_id)
    return {"id": out.suggestion_id, "project_id": row.project_id, "image_id": image_id,
            "model_id": row.id, "payload": out.model_dump(mode="json"), "created_at": utcnow(),
            "served_at": None}


def score_images(ctx: WorkerContext, session: Session, project_id: int,
                 image_ids: Sequence[int] | None = None) -> int:
    """Store the promoted model's uncertainty (for order=uncertainty) and suggestion on
    unlabeled images."""
    row = promoted(session, project_id)
    if row is None:
        return 0
    if row.task == "detection":  # boxes need the full image: precomputed suggestions
        from workers.detection import score_detection

        return score_detection(ctx, session, row, image_ids)
    assert row.head_key is not None and row.head_sha256 is not None
    head = ctx.head(row.id, row.head_key, row.head_sha256)
    query = (select(Embedding.image_id, Embedding.vector, Image.width, Image.height)
             .join(Image, Image.id == Embedding.image_id)
             .where(Image.project_id == project_id, Image.labeled.is_(False),
                    Embedding.backbone == row.backbone))
    stored = select(Suggestion.image_id).where(Suggestion.model_id == row.id)
    if image_ids is not None:
        query = query.where(Image.id.in_(image_ids))
        stored = stored.where(Suggestion.image_id.in_(image_ids))
    rows = session.execute(query).all()
    have = set(session.scalars(stored))
    model = LoadedModel.from_row(row, head)
    # a no-op where uploads embedded them; images from before the views existed get them now
    ensure_views(ctx, session, [r[0] for r in rows], model.views)
    for start in range(0, len(rows), 2048):
        chunk = rows[start:start + 2048]
        probs = predict_embeddings(  # averaged over the views it serves with, where embedded
            model, np.stack([np.frombuffer(r[1], np.float32) for r in chunk]),
            stored_views(session, row.backbone, model.views, [r[0] for r in chunk]))
        u = uncertainty(row.task, probs, model.thresholds)  # type: ignore[arg-type]
        session.execute(update(Image), [
            {"id": r[0], "uncertainty": float(val), "uncertainty_model_id": row.id}
            for r, val in zip(chunk, u, strict=True)])
        # the suggestion too, stored unserved: exports and the first request read it
        insert_ignore(session, Suggestion, [
            suggestion_row(row, r[0], to_prediction(model, p, r[2], r[3]))
            for r, p in zip(chunk, probs, strict=True) if r[0] not in have])
    return len(rows)
