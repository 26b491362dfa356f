"""Projects, classes, statistics and API keys."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.auth import create_key
from service.deps import AdminKey, AnnotatorKey, CtxDep, PathId, SessionDep, visible_project
from service.errors import APIError, not_found
from service.schemas import (
    AcceptanceStats,
    ApiKeyCreate,
    ApiKeyOut,
    ClassCreate,
    ClassOut,
    ClassStats,
    ModelRef,
    ProjectCreate,
    ProjectOut,
    ProjectStats,
)
from service.tables import (
    Annotation,
    ApiKey,
    Embedding,
    Image,
    ModelVersion,
    Project,
    ProjectClass,
    Suggestion,
    TrainingRun,
)
from workers.policy import label_counts

router = APIRouter(prefix="/api/v1", tags=["projects"])


def class_names(session: Session, project_id: int) -> list[str]:
    """A project's classes in creation order."""
    return list(session.scalars(
        select(ProjectClass.name).where(ProjectClass.project_id == project_id)
        .order_by(ProjectClass.id)))


def promoted_model(session: Session, project_id: int) -> ModelVersion | None:
    """The version that serves suggestions, if any."""
    return session.scalar(select(ModelVersion).where(
        ModelVersion.project_id == project_id, ModelVersion.promoted.is_(True)))


def project_out(session: Session, project: Project) -> ProjectOut:
    counts = session.execute(
        select(func.count(), func.count().filter(Image.labeled.is_(True)))
        .where(Image.project_id == project.id)).one()
    model = promoted_model(session, project.id)
    return ProjectOut(
        id=project.id, name=project.name, task=project.task,  # type: ignore[arg-type]
        classes=class_names(session, project.id), created_at=project.created_at,
        image_count=counts[0], labeled_count=counts[1],
        promoted_model=ModelRef(id=model.id, version=model.version) if model else None,
    )


@router.post("/projects", status_code=201, response_model=ProjectOut)
def create_project(body: ProjectCreate, session: SessionDep, _: AdminKey) -> ProjectOut:
    """Create a project with its classes (admin)."""
    project = Project(name=body.name, task=body.task)
    session.add(project)
    session.flush()
    session.add_all(ProjectClass(project_id=project.id, name=n) for n in body.classes)
    session.commit()
    return project_out(session, project)


@router.get("/projects", response_model=list[ProjectOut])
def list_projects(session: SessionDep, key: AnnotatorKey) -> list[ProjectOut]:
    """Projects visible to the caller."""
    query = select(Project).order_by(Project.id)
    if key.project_id is not None:
        query = query.where(Project.id == key.project_id)
    return [project_out(session, p) for p in session.scalars(query)]


@router.get("/projects/{pid}", response_model=ProjectOut)
def get_project(pid: PathId, session: SessionDep, key: AnnotatorKey) -> ProjectOut:
    """One project."""
    return project_out(session, visible_project(session, key, pid))


@router.post("/projects/{pid}/classes", status_code=201, response_model=ClassOut)
def add_class(pid: PathId, body: ClassCreate, session: SessionDep, key: AdminKey) -> ClassOut:
    """Add a class; models trained before it do not predict it until the next run."""
    visible_project(session, key, pid)
    row = ProjectClass(project_id=pid, name=body.name)
    try:
        session.add(row)
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise APIError(409, "class_exists", f"class {body.name!r} already exists") from exc
    return ClassOut(id=row.id, name=row.name)


@router.get("/projects/{pid}/stats", response_model=ProjectStats)
def project_stats(pid: PathId, session: SessionDep, key: AnnotatorKey) -> ProjectStats:
    """Counts by status and class, and suggestion acceptance per model version."""
    visible_project(session, key, pid)
    images, labeled = session.execute(
        select(func.count(), func.count().filter(Image.labeled.is_(True)))
        .where(Image.project_id == pid)).one()
    embedded = session.scalar(
        select(func.count(func.distinct(Embedding.image_id))).join(
            Image, Image.id == Embedding.image_id).where(Image.project_id == pid)) or 0
    # unlabeled images the promoted model has scored (uncertainty order, stored suggestion)
    scored = session.scalar(
        select(func.count()).select_from(Image).join(
            ModelVersion, ModelVersion.id == Image.uncertainty_model_id).where(
            Image.project_id == pid, Image.labeled.is_(False),
            ModelVersion.promoted.is_(True))) or 0
    _, per_class = label_counts(session, pid)
    by_source = Counter(dict(session.execute(
        select(Annotation.source, func.count()).where(Annotation.project_id == pid)
        .group_by(Annotation.source)).all()))
    runs = dict(session.execute(
        select(TrainingRun.status, func.count()).where(TrainingRun.project_id == pid)
        .group_by(TrainingRun.status)).all())
    return ProjectStats(
        images=images, labeled=labeled, unlabeled=images - labeled, embedded=embedded,
        scored=scored,
        classes=[ClassStats(name=n, labeled_images=per_class[n])
                 for n in class_names(session, pid)],
        annotations_by_source=dict(by_source), acceptance=acceptance(session, pid),
        runs_by_status=runs,
    )


def acceptance(session: Session, pid: PathId) -> list[AcceptanceStats]:
    """Per model version: suggestions served and how annotators answered them."""
    served = dict(session.execute(
        select(Suggestion.model_id, func.count()).where(Suggestion.project_id == pid,
                                                        Suggestion.served_at.is_not(None))
        .group_by(Suggestion.model_id)).all())
    answered = session.execute(
        select(Suggestion.model_id, Annotation.source, func.count())
        .join(Suggestion, Suggestion.id == Annotation.suggestion_id)
        .where(Annotation.project_id == pid)
        .group_by(Suggestion.model_id, Annotation.source)).all()
    versions = dict(session.execute(
        select(ModelVersion.id, ModelVersion.version).where(ModelVersion.project_id == pid)
    ).all())
    out = []
    for model_id, version in sorted(versions.items(), key=lambda kv: kv[1]):
        acc = sum(n for m, s, n in answered if m == model_id and s == "suggestion_accepted")
        cor = sum(n for m, s, n in answered if m == model_id and s == "suggestion_corrected")
        out.append(AcceptanceStats(
            model_version=version, model_id=model_id, suggestions_served=served.get(model_id, 0),
            reviewed=acc + cor, accepted=acc, corrected=cor,
            acceptance_rate=acc / (acc + cor) if acc + cor else None))
    return out


def key_out(row: ApiKey, plain: str | None = None) -> ApiKeyOut:
    return ApiKeyOut(id=row.id, name=row.name, role=row.role, prefix=row.prefix,
                     project_id=row.project_id, created_at=row.created_at, key=plain)


@router.post("/keys", status_code=201, response_model=ApiKeyOut, tags=["keys"])
def create_api_key(body: ApiKeyCreate, session: SessionDep, key: AdminKey) -> ApiKeyOut:
    """Create an API key; the plain key is in this response only."""
    if key.project_id is not None and body.project_id != key.project_id:
        raise APIError(403, "forbidden", "a project-scoped admin key can only create keys "
                       "for its own project")
    if body.project_id is not None:
        visible_project(session, key, body.project_id)
    row, plain = create_key(session, body.name, body.role, body.project_id)
    session.commit()
    return key_out(row, plain)


@router.get("/keys", response_model=list[ApiKeyOut], tags=["keys"])
def list_api_keys(session: SessionDep, key: AdminKey) -> list[ApiKeyOut]:
    """Active keys (without their secret)."""
    query = select(ApiKey).where(ApiKey.revoked.is_(False)).order_by(ApiKey.id)
    if key.project_id is not None:
        query = query.where(ApiKey.project_id == key.project_id)
    return [key_out(r) for r in session.scalars(query)]


@router.delete("/keys/{kid}", status_code=204, tags=["keys"])
def revoke_api_key(kid: PathId, session: SessionDep, ctx: CtxDep, key: AdminKey) -> None:
    """Revoke a key."""
    row = session.get(ApiKey, kid)
    if row is None or row.revoked or (
            key.project_id is not None and row.project_id != key.project_id):
        raise not_found("key", kid)
    row.revoked = True
    session.commit()
    ctx.keys.clear()
