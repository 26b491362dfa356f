"""Image upload, listing and download."""

from __future__ import annotations

import base64
import json
from typing import Literal

from fastapi import APIRouter, Query, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.context import AppContext
from service.deps import AnnotatorKey, CtxDep, PathId, SessionDep, visible_image, visible_project
from service.diverse_listing import diverse_page
from service.errors import APIError
from service.imaging import ImageInfo, ImageRejected, inspect_image
from service.schemas import ImageOut, ImagePage, UploadedImage, UploadError, UploadResult
from service.storage import image_key, sha256_hex
from service.tables import Image

router = APIRouter(prefix="/api/v1", tags=["images"])


def image_out(row: Image) -> ImageOut:
    return ImageOut(id=row.id, project_id=row.project_id, filename=row.filename,
                    sha256=row.sha256, format=row.format, size_bytes=row.size_bytes,
                    width=row.width, height=row.height, labeled=row.labeled,
                    uncertainty=row.uncertainty, created_at=row.created_at)


def read_upload_bytes(upload: UploadFile, ctx: AppContext) -> bytes:
    """The bytes of one uploaded file, within the upload limit (raises ImageRejected)."""
    data = upload.file.read(ctx.settings.max_upload_bytes + 1)
    if len(data) > ctx.settings.max_upload_bytes:
        raise ImageRejected("payload_too_large", "file exceeds the upload limit", 413)
    return data


def read_upload(upload: UploadFile, ctx: AppContext) -> tuple[bytes, ImageInfo]:
    """Read and validate one uploaded file (raises ImageRejected)."""
    data = read_upload_bytes(upload, ctx)
    return data, inspect_image(data, max_pixels=ctx.settings.max_image_pixels)


def store_image(session: Session, ctx: AppContext, pid: PathId, filename: str, data: bytes,
                info: ImageInfo) -> tuple[Image, bool]:
    """Store the blob (first) and the row; returns (row, duplicate)."""
    digest = sha256_hex(data)
    existing = session.scalar(select(Image).where(Image.project_id == pid,
                                                  Image.sha256 == digest))
    if existing is not None:
        return existing, True
    key = image_key(digest)
    if not ctx.blobs.exists(key):
        ctx.blobs.put(key, data)
    row = Image(project_id=pid, sha256=digest, storage_key=key, filename=filename[:255],
                format=info.format, size_bytes=len(data), width=info.width, height=info.height)
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:  # the same bytes uploaded concurrently
        existing = session.scalar(select(Image).where(Image.project_id == pid,
                                                      Image.sha256 == digest))
        if existing is None:
            raise
        return existing, True
    return row, False


@router.post("/projects/{pid}/images", status_code=201, response_model=UploadResult)
def upload_images(pid: PathId, files: list[UploadFile], session: SessionDep, ctx: CtxDep,
                  key: AnnotatorKey) -> UploadResult:
    """Upload images (multipart field ``files``, many); bad files are reported per file."""
    visible_project(session, key, pid)
    if len(files) > ctx.settings.max_files_per_upload:
        raise APIError(422, "too_many_files",
                       f"at most {ctx.settings.max_files_per_upload} files per request")
    stored: list[UploadedImage] = []
    errors: list[UploadError] = []
    new_ids: list[int] = []
    for upload in files:
        name = upload.filename or "unnamed"
        try:
            data, info = read_upload(upload, ctx)
        except ImageRejected as exc:
            errors.append(UploadError(filename=name, code=exc.code, message=exc.message))
            continue
        row, duplicate = store_image(session, ctx, pid, name, data, info)
        if not duplicate:
            new_ids.append(row.id)
        stored.append(UploadedImage(id=row.id, filename=name, sha256=row.sha256, width=row.width,
                                    height=row.height, duplicate=duplicate))
    session.commit()
    if new_ids:
        ctx.queue.send_embed(new_ids)  # after commit; the reconciler re-sends on failure
    return UploadResult(images=stored, errors=errors)


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        offset = int(json.loads(base64.urlsafe_b64decode(cursor.encode()))["o"])
    except (ValueError, KeyError, TypeError) as exc:
        raise APIError(422, "invalid_cursor", "cursor is not one this API returned") from exc
    if offset < 0:
        raise APIError(422, "invalid_cursor", "cursor is not one this API returned")
    return offset


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode()


@router.get("/projects/{pid}/images", response_model=ImagePage)
def list_images(
    pid: PathId, session: SessionDep, key: AnnotatorKey,
    status: Literal["unlabeled", "labeled"] | None = None,
    order: Literal["created", "uncertainty", "diverse"] = "created",
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = None,
) -> ImagePage:
    """List images; ``order=uncertainty`` puts those the current model is least sure of first;
    ``order=diverse`` (unlabeled only) reranks them so that near-copies of labeled images and of
    each other drop back."""
    visible_project(session, key, pid)
    query = select(Image).where(Image.project_id == pid)
    if status is not None:
        query = query.where(Image.labeled.is_(status == "labeled"))
    offset = _decode_cursor(cursor)
    if order == "diverse":
        if status != "unlabeled":
            raise APIError(422, "order_needs_unlabeled",
                           "order=diverse ranks unlabeled images: add status=unlabeled")
        rows = diverse_page(session, pid, query, offset, limit + 1)
    else:
        query = query.order_by(Image.uncertainty.desc().nulls_last(), Image.id) \
            if order == "uncertainty" else query.order_by(Image.id)
        rows = list(session.scalars(query.offset(offset).limit(limit + 1)))
    more = len(rows) > limit
    return ImagePage(items=[image_out(r) for r in rows[:limit]],
                     next_cursor=_encode_cursor(offset + limit) if more else None)


@router.get("/images/{iid}", response_model=ImageOut)
def get_image(iid: PathId, session: SessionDep, key: AnnotatorKey) -> ImageOut:
    """One image's metadata."""
    return image_out(visible_image(session, key, iid))


_MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "bmp": "image/bmp",
         "tiff": "image/tiff", "gif": "image/gif"}


@router.get("/images/{iid}/file", response_class=FileResponse)
def get_image_file(iid: PathId, session: SessionDep, ctx: CtxDep,
                   key: AnnotatorKey) -> FileResponse:
    """The original bytes as uploaded (EXIF orientation left for the viewer)."""
    row = visible_image(session, key, iid)
    return FileResponse(ctx.blobs.path(row.storage_key),
                        media_type=_MIME.get(row.format, "application/octet-stream"),
                        headers={"X-Content-Type-Options": "nosniff"})
