"""Dataset import (an uploaded archive becomes a job) and export (a streamed zip archive)."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from service.datasets.archive import ArchiveLimits, check_archive
from service.datasets.exporter import ExportOptions, check_options, parse_split, stream_export
from service.datasets.importer import ImportOptions
from service.datasets.items import ImportFailed
from service.datasets.jobs import create_job
from service.deps import AnnotatorKey, CtxDep, OperatorKey, PathId, SessionDep, visible_project
from service.errors import APIError, not_found
from service.schemas import ExportFormat, ImportFormat, ImportJobOut
from service.tables import ImportJob

router = APIRouter(prefix="/api/v1", tags=["datasets"])
IMPORT_PATH = r"/api/v1/projects/[0-9]+/imports"  # has its own body limit (max_import_bytes)


def job_out(row: ImportJob, with_report: bool = True) -> ImportJobOut:
    return ImportJobOut(
        id=row.id, project_id=row.project_id, format=row.format,  # type: ignore[arg-type]
        origin=row.origin, source_name=row.source_name,
        status=row.status,  # type: ignore[arg-type]
        stage=row.stage, progress=round(row.progress, 4), counts=row.counts or {},
        report=row.report if with_report else None, error_code=row.error_code,
        error=row.error, attempt=row.attempt, created_at=row.created_at,
        started_at=row.started_at, finished_at=row.finished_at)


def _failed(exc: ImportFailed) -> APIError:
    return APIError(exc.status, exc.code, exc.message)


def _mapping(text: str | None) -> dict[str, str | None]:
    if not text:
        return {}
    try:
        value: Any = json.loads(text)
    except ValueError as exc:
        raise APIError(422, "invalid_mapping", "mapping must be a JSON object") from exc
    if not (isinstance(value, dict) and all(isinstance(v, str | None) for v in value.values())):
        raise APIError(422, "invalid_mapping", "mapping is a JSON object of source class -> "
                       "project class (a name, or null to leave the class out)")
    return value


@router.post("/projects/{pid}/imports", status_code=202, response_model=ImportJobOut)
def start_import(
    pid: PathId, session: SessionDep, ctx: CtxDep, key: OperatorKey,
    file: Annotated[UploadFile, Form(description="a zip or tar (.tar, .tar.gz, .tar.bz2, "
                                                 ".tar.xz) archive of the dataset")],
    format: Annotated[ImportFormat, Form()],
    mapping: Annotated[str | None, Form(description="JSON: {source class: project class or "
                                                    "null to leave it out}")] = None,
    create_classes: Annotated[bool, Form(description="add classes the project lacks")] = True,
    existing: Annotated[Literal["replace", "keep"], Form(
        description="an image's current label: replace it (kept in the history) or keep "
                    "it")] = "replace",
) -> ImportJobOut:
    """Import a dataset archive (operator). Checked at once, imported by a worker: poll
    ``GET /imports/{id}`` for progress and the report."""
    visible_project(session, key, pid)
    options = ImportOptions(mapping=_mapping(mapping), create_classes=create_classes,
                            existing=existing)
    try:
        check_archive(file.file, ArchiveLimits.from_settings(ctx.settings))
    except ImportFailed as exc:
        raise _failed(exc) from exc
    archive_key = f"imports/{uuid.uuid4().hex}/archive"
    try:
        ctx.blobs.put_file(archive_key, file.file, ctx.settings.max_import_bytes)
    except ValueError as exc:
        raise APIError(413, "payload_too_large", "the archive exceeds the import limit",
                       {"limit_bytes": ctx.settings.max_import_bytes}) from exc
    try:
        job = create_job(session, pid, format, options, origin="upload",
                         source_name=file.filename or "archive", archive_key=archive_key,
                         author_key_id=key.id)
        session.commit()
    except BaseException:
        ctx.blobs.delete(archive_key)
        raise
    ctx.queue.send_import(ctx.sessions, job.id)  # after commit; the reconciler re-sends
    session.refresh(job)
    return job_out(job)


@router.get("/projects/{pid}/imports", response_model=list[ImportJobOut])
def list_imports(pid: PathId, session: SessionDep, key: AnnotatorKey) -> list[ImportJobOut]:
    """A project's imports, newest first (without their reports)."""
    visible_project(session, key, pid)
    rows = session.scalars(select(ImportJob).where(ImportJob.project_id == pid)
                           .order_by(ImportJob.id.desc()).limit(200))
    return [job_out(r, with_report=False) for r in rows]


@router.get("/imports/{jid}", response_model=ImportJobOut)
def get_import(jid: PathId, session: SessionDep, key: AnnotatorKey) -> ImportJobOut:
    """One import: status, progress and, once done, its report."""
    row = session.get(ImportJob, jid)
    if row is None or (key.project_id is not None and key.project_id != row.project_id):
        raise not_found("import", jid)
    return job_out(row)


@router.get("/projects/{pid}/export", response_class=StreamingResponse,
            responses={200: {"content": {"application/zip": {}},
                             "description": "the archive, streamed"}})
def export_project(
    pid: PathId, session: SessionDep, ctx: CtxDep, key: AnnotatorKey,
    format: ExportFormat,
    labels: Annotated[Literal["manual", "with_suggestions"], Query(
        description="manual: human labels (manual, accepted, corrected); with_suggestions: "
                    "also the promoted model's stored suggestions for unlabeled images, "
                    "flagged as such")] = "manual",
    min_confidence: Annotated[float | None, Query(
        ge=0, le=1, description="suggestions: keep classes/boxes at or above this "
                                "confidence (default: the model's own thresholds)")] = None,
    images: Annotated[Literal["include", "reference"], Query(
        description="include the image files, or only refer to them")] = "include",
    split: Annotated[str | None, Query(
        max_length=60, description="train,val,test proportions, e.g. 80,10,10")] = None,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> StreamingResponse:
    """Export the project's labels as a zip archive, streamed as it is written."""
    project = visible_project(session, key, pid)
    try:
        fractions = parse_split(split)
    except ValueError as exc:
        raise APIError(422, "invalid_split", "split is three non-negative numbers (train, val, "
                       "test), e.g. 80,10,10") from exc
    options = ExportOptions(format=format, labels=labels, min_confidence=min_confidence,
                            images=images, split=fractions, seed=seed)
    try:
        check_options(project.task, options)
    except ImportFailed as exc:
        raise _failed(exc) from exc
    name = f"prelabel-project-{pid}-{format}.zip"
    return StreamingResponse(stream_export(ctx.sessions, ctx.blobs, pid, options),
                             media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})
