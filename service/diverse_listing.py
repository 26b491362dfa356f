"""``order=diverse`` for image listings: the most uncertain unlabeled images, reranked so that
near-copies of labeled (or earlier listed) images drop back (``models.diversity``)."""

from __future__ import annotations

import numpy as np
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from models.diversity import diverse_order
from service.tables import Embedding, Image

# Reranked head of the uncertainty order; past it the listing is plain uncertainty order.
# Diversity among the most uncertain only (as Cluster-Margin does): with 256 candidates, most
# of a small pool, cards classification (one seed) picked far-off outliers first, and its
# first model came 18 labels later than in upload order (55 against 37).
CANDIDATES = 64
# the newest labeled images (by id) stand for what is covered (bounds the request's memory:
# 2000 x 1280 float32 = 10 MB)
MAX_CENTERS = 2000


def diverse_page(session: Session, pid: int, unlabeled: Select[tuple[Image]], offset: int,
                 limit: int) -> list[Image]:
    """``limit`` rows from ``offset`` of the diverse order of ``unlabeled`` (a query over the
    project's unlabeled images, not yet ordered)."""
    by_uncertainty = unlabeled.order_by(Image.uncertainty.desc().nulls_last(), Image.id)
    head = list(session.scalars(by_uncertainty.limit(CANDIDATES)))
    if offset >= len(head):
        return list(session.scalars(by_uncertainty.offset(offset).limit(limit)))
    ids = [r.id for r in head]
    # the embedding most candidates have: the pretrained backbone's, which every image gets
    backbone = session.scalar(
        select(Embedding.backbone).where(Embedding.image_id.in_(ids))
        .group_by(Embedding.backbone).order_by(func.count().desc(), Embedding.backbone).limit(1))
    ranked = head
    if backbone is not None:
        have = {iid: np.frombuffer(vec, dtype="<f4") for iid, vec in session.execute(
            select(Embedding.image_id, Embedding.vector).where(
                Embedding.backbone == backbone, Embedding.image_id.in_(ids)))}
        dim = next(iter(have.values())).shape[0]
        centers = [np.frombuffer(v, dtype="<f4") for v in session.scalars(
            select(Embedding.vector).join(Image, Image.id == Embedding.image_id)
            .where(Image.project_id == pid, Image.labeled.is_(True),
                   Embedding.backbone == backbone)
            .order_by(Image.id.desc()).limit(MAX_CENTERS))]
        # an image not embedded yet counts as unlike everything (a zero vector)
        cand = np.stack([have.get(i, np.zeros(dim, np.float32)) for i in ids])
        weights = np.array([np.nan if r.uncertainty is None else r.uncertainty for r in head])
        order = diverse_order(weights, cand, np.stack(centers) if centers else None)
        ranked = [head[i] for i in order]
    rows = ranked[offset:offset + limit]
    if len(rows) < limit:
        rows += list(session.scalars(by_uncertainty.offset(len(head)).limit(limit - len(rows))))
    return rows
