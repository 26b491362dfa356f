"""Training runs and model versions."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select, update

from service.deps import AnnotatorKey, CtxDep, OperatorKey, PathId, SessionDep, visible_project
from service.errors import APIError, not_found
from service.schemas import ModelOut, TrainingRunOut
from service.tables import ApiKey, ModelVersion, Project, TrainingRun, utcnow
from workers.policy import create_run, queued_run

router = APIRouter(prefix="/api/v1", tags=["training"])


def run_out(row: TrainingRun) -> TrainingRunOut:
    return TrainingRunOut(
        id=row.id, project_id=row.project_id, status=row.status,  # type: ignore[arg-type]
        trigger=row.trigger, progress=round(row.progress, 4), stage=row.stage,
        device=row.device, attempt=row.attempt, max_attempts=row.max_attempts,
        error_code=row.error_code, error=row.error, labels_seen=row.labels_seen,
        model_id=row.model_id, created_at=row.created_at, started_at=row.started_at,
        finished_at=row.finished_at)


def model_out(row: ModelVersion) -> ModelOut:
    return ModelOut(id=row.id, project_id=row.project_id, run_id=row.run_id, version=row.version,
                    kind=row.kind, device=row.device, classes=list(row.classes),
                    thresholds=[float(t) for t in row.thresholds], promoted=row.promoted,
                    promotion_note=row.promotion_note,
                    metrics=row.metrics, created_at=row.created_at)


def _visible_run(session: SessionDep, key: ApiKey, rid: PathId) -> TrainingRun:
    row = session.get(TrainingRun, rid)
    if row is None or (key.project_id is not None and key.project_id != row.project_id):
        raise not_found("training run", rid)
    return row


@router.post("/projects/{pid}/training-runs", status_code=201, response_model=TrainingRunOut)
def start_run(pid: PathId, session: SessionDep, ctx: CtxDep, key: OperatorKey) -> TrainingRunOut:
    """Queue a training run now (operator). One queued run per project at most."""
    project: Project = visible_project(session, key, pid)
    run = create_run(session, project, "manual", ctx.settings)
    if run is None:
        existing = queued_run(session, pid)
        raise APIError(409, "run_already_queued", "a run is already queued for this project",
                       {"run_id": existing.id if existing else None})
    session.commit()
    ctx.queue.send_train(ctx.sessions, run.id)
    session.refresh(run)
    return run_out(run)


@router.get("/projects/{pid}/training-runs", response_model=list[TrainingRunOut])
def list_runs(pid: PathId, session: SessionDep, key: AnnotatorKey) -> list[TrainingRunOut]:
    """A project's runs, newest first."""
    visible_project(session, key, pid)
    rows = session.scalars(select(TrainingRun).where(TrainingRun.project_id == pid)
                           .order_by(TrainingRun.id.desc()).limit(200))
    return [run_out(r) for r in rows]


@router.get("/training-runs/{rid}", response_model=TrainingRunOut)
def get_run(rid: PathId, session: SessionDep, key: AnnotatorKey) -> TrainingRunOut:
    """One run with its status and progress."""
    return run_out(_visible_run(session, key, rid))


@router.post("/training-runs/{rid}/cancel", response_model=TrainingRunOut)
def cancel_run(rid: PathId, session: SessionDep, key: OperatorKey) -> TrainingRunOut:
    """Cancel a queued run at once, or ask a running one to stop at its next step."""
    row = _visible_run(session, key, rid)
    if row.status not in ("QUEUED", "RUNNING"):
        raise APIError(409, "run_finished", f"run {rid} already ended ({row.status})")
    # conditional update: the worker may be changing the status at the same moment
    session.execute(update(TrainingRun).where(TrainingRun.id == rid,
                                              TrainingRun.status == "QUEUED")
                    .values(status="CANCELLED", stage="cancelled", finished_at=utcnow()))
    session.execute(update(TrainingRun).where(TrainingRun.id == rid,
                                              TrainingRun.status == "RUNNING")
                    .values(cancel_requested=True))
    session.commit()
    session.refresh(row)
    return run_out(row)


@router.get("/projects/{pid}/models", response_model=list[ModelOut])
def list_models(pid: PathId, session: SessionDep, key: AnnotatorKey) -> list[ModelOut]:
    """Model versions with their validation metrics, newest first."""
    visible_project(session, key, pid)
    rows = session.scalars(select(ModelVersion).where(ModelVersion.project_id == pid)
                           .order_by(ModelVersion.version.desc()))
    return [model_out(r) for r in rows]


@router.post("/models/{mid}/promote", response_model=ModelOut)
def promote_model(mid: PathId, session: SessionDep, ctx: CtxDep, key: OperatorKey) -> ModelOut:
    """Serve this version (also the way to roll back)."""
    row = session.get(ModelVersion, mid)
    if row is None or (key.project_id is not None and key.project_id != row.project_id):
        raise not_found("model", mid)
    session.execute(update(ModelVersion).where(ModelVersion.project_id == row.project_id,
                                               ModelVersion.id != mid)
                    .values(promoted=False))
    row.promoted = True
    row.promotion_note = f"promoted by key {key.id}"
    session.commit()
    ctx.queue.send_score(row.project_id)
    return model_out(row)
