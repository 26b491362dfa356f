"""A project's labeled images as arrays: embeddings, targets and (for fine-tuning) pixels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.heads import HeadParams, predict_proba
from models.views import average_over_views, view_key
from service.tables import Annotation, Embedding, Image, Project
from workers.context import WorkerContext
from workers.embedding import decode_image, ensure_views


class RunFailed(Exception):
    """Training cannot produce a model; the run ends FAILED with this code and reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class LabeledSet:
    """Labeled images of a project with their pretrained embeddings and targets."""

    image_ids: list[int]
    sha256: list[str]
    x: np.ndarray  # [N, D]
    y: np.ndarray  # [N] class index (multiclass) or [N, C] {0, 1} (multilabel)
    views: np.ndarray | None = None  # [V, N, D] embeddings of label-preserving views (heads)
    # [P, N, D] embeddings of the views a frozen head's predictions are averaged over
    predict_views: np.ndarray | None = None
    predict_view_names: tuple[str, ...] = ()

    def counts(self, num_classes: int) -> np.ndarray:
        """Labeled images per class."""
        if self.y.ndim == 1:
            return np.bincount(self.y, minlength=num_classes)
        return self.y.sum(axis=0).astype(np.int64)

    def head_rows(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and targets a frozen head trains on for labeled ``rows`` (all by
        default): each image, then each of its views."""
        rows = np.arange(len(self.image_ids)) if rows is None else rows
        if self.views is None:
            return self.x[rows], self.y[rows]
        x = np.concatenate([self.x[rows], *self.views[:, rows]])
        return x, np.concatenate([self.y[rows]] * (1 + len(self.views)))

    def predict(self, params: HeadParams, rows: np.ndarray) -> np.ndarray:
        """A frozen head's probabilities for labeled ``rows``, averaged over each image and its
        prediction views as the service serves them."""
        return self.average(lambda x: predict_proba(params, x), rows, self.predict_view_names)

    def average(self, run: Callable[[np.ndarray], np.ndarray], rows: np.ndarray,
                names: Sequence[str]) -> np.ndarray:
        """``run``'s probabilities for ``rows`` averaged over each image and those of its
        loaded prediction views that are named in ``names``."""
        views = [] if self.predict_views is None else [
            (np.arange(len(rows)), v[rows])
            for name, v in zip(self.predict_view_names, self.predict_views, strict=True)
            if name in names]
        return average_over_views(run, self.x[rows], views)


def load_labeled(ctx: WorkerContext, session: Session, project: Project,
                 classes: list[str], views: Sequence[str] = (),
                 predict_views: Sequence[str] = ()) -> LabeledSet:
    """Current labels with their embeddings, and those of ``views`` (the head trains on) and
    ``predict_views`` (its predictions average over) of each image (embedding any that are
    missing; a view is embedded once per image and kept)."""
    rows = session.execute(
        select(Annotation.image_id, Annotation.tags, Image.sha256)
        .join(Image, Image.id == Annotation.image_id)
        .where(Annotation.project_id == project.id, Annotation.is_current.is_(True))
        .order_by(Annotation.image_id)).all()
    if not rows:
        raise RunFailed("no_labels", "the project has no labeled images")
    # one decode per image for the image and all its views
    ensure_views(ctx, session, [r[0] for r in rows],
                 [None, *dict.fromkeys([*views, *predict_views])])
    vectors = dict(session.execute(select(Embedding.image_id, Embedding.vector).where(
        Embedding.backbone == ctx.backbone,
        Embedding.image_id.in_([r[0] for r in rows]))).all())
    index = {c: i for i, c in enumerate(classes)}
    ids, shas, xs, ys = [], [], [], []
    for image_id, tags, sha in rows:
        if image_id not in vectors:
            continue  # unreadable blob: logged by the embedder
        known = [index[t] for t in (tags or []) if t in index]
        if project.task == "multiclass":
            if len(known) != 1:
                continue
            ys.append(known[0])
        else:
            target = np.zeros(len(classes), np.float32)
            target[known] = 1
            ys.append(target)
        ids.append(image_id)
        shas.append(sha)
        xs.append(np.frombuffer(vectors[image_id], np.float32))
    if not ids:
        raise RunFailed("no_labels", "no labeled image could be used")
    x = np.stack(xs)

    # each view read once: the prediction views are among the training views
    loaded = {v: view_vectors(session, ctx.backbone, ids, v, x)
              for v in dict.fromkeys([*views, *predict_views])}

    def stacked(names: Sequence[str]) -> np.ndarray | None:
        return np.stack([loaded[v] for v in names]) if names else None

    return LabeledSet(ids, shas, x, np.asarray(ys), stacked(views), stacked(predict_views),
                      tuple(predict_views))


def view_vectors(session: Session, backbone: str, image_ids: list[int], view: str,
                 plain: np.ndarray) -> np.ndarray:
    """[N, D] stored embeddings of a view of the images (embedded by ``ensure_views``; an
    image whose view could not be made keeps its plain embedding ``plain``)."""
    vectors = dict(session.execute(select(Embedding.image_id, Embedding.vector).where(
        Embedding.backbone == view_key(backbone, view),
        Embedding.image_id.in_(image_ids))).all())
    out = plain.copy()
    for n, image_id in enumerate(image_ids):
        if image_id in vectors:
            out[n] = np.frombuffer(vectors[image_id], np.float32)
    return out


def model_inputs(ctx: WorkerContext, session: Session, image_ids: Sequence[int]) -> np.ndarray:
    """uint8 [N, 224, 224, 3] model inputs of images, in the given order."""
    images = {i.id: i for i in session.scalars(select(Image).where(Image.id.in_(image_ids)))}
    arrays = [decode_image(ctx, images[i]) for i in image_ids]
    if any(a is None for a in arrays):
        raise RunFailed("unreadable_image", "a labeled image can no longer be read")
    return np.stack(arrays)  # type: ignore[arg-type]
