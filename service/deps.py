"""FastAPI dependencies as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.auth import role_allows
from service.context import AppContext
from service.errors import APIError, not_found
from service.schemas import MAX_ID
from service.tables import ApiKey, Image, Project

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


# Dependencies that do no blocking I/O are ``async``: FastAPI runs sync dependencies in the
# thread pool, and each hop costs about a millisecond on a small machine.


async def get_ctx(request: Request) -> AppContext:
    """The application context."""
    return request.app.state.ctx  # type: ignore[no-any-return]


PathId = Annotated[int, Path(ge=1, le=MAX_ID, description="numeric id")]
CtxDep = Annotated[AppContext, Depends(get_ctx)]


async def get_session(ctx: CtxDep) -> AsyncIterator[Session]:
    """A request-scoped session (connects lazily, in the handler's thread); handlers commit."""
    session = ctx.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def current_key(
    session: SessionDep,
    ctx: CtxDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The caller's API key (401 without a valid one)."""
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise APIError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    key = ctx.keys.cached(creds.credentials)
    if key is None:  # a database query: off the event loop
        key = await run_in_threadpool(ctx.keys.lookup, session, creds.credentials)
    if key is None:
        raise APIError(401, "unauthorized", "invalid or revoked API key")
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]


def require(role: str):  # type: ignore[no-untyped-def]
    """Dependency factory: the caller's key must have at least ``role``."""

    async def check(key: CurrentKey) -> ApiKey:
        if not role_allows(key.role, role):
            raise APIError(403, "forbidden", f"this action needs the {role} role; key has "
                           f"{key.role}")
        return key

    return check


AnnotatorKey = Annotated[ApiKey, Depends(require("annotator"))]
OperatorKey = Annotated[ApiKey, Depends(require("operator"))]
AdminKey = Annotated[ApiKey, Depends(require("admin"))]


def visible_project(session: Session, key: ApiKey, pid: int) -> Project:
    """The project if it exists and the key may see it, else 404 (never 403: no probing)."""
    project = session.get(Project, pid)
    if project is None or (key.project_id is not None and key.project_id != pid):
        raise not_found("project", pid)
    return project


def visible_image(session: Session, key: ApiKey, iid: int) -> Image:
    """The image if it exists and the key may see its project, else 404."""
    image = session.get(Image, iid)
    if image is None or (key.project_id is not None and key.project_id != image.project_id):
        raise not_found("image", iid)
    return image
