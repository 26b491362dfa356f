"""Label Studio projects mapped to prelabel projects, and tasks to stored images."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.api.images import store_image
from service.context import AppContext
from service.errors import APIError
from service.imaging import ImageRejected, inspect_image
from service.labelstudio.fetch import FetchError, ImageFetcher
from service.labelstudio.label_config import LabelMapping, UnsupportedConfig, parse_label_config
from service.schemas import MAX_ID
from service.tables import Image, LabelStudioLink, LabelStudioTask, Project, ProjectClass

PROJECT_KEY = re.compile(r"^\d{1,18}(\.\d{1,18})?$")
FETCH_THREADS = 8  # images are fetched concurrently; rows are written by the request thread


def project_key(value: object) -> str:
    """Check Label Studio's ``"<id>.<created timestamp>"`` project key."""
    key = str(value) if isinstance(value, int | str) else ""
    if not PROJECT_KEY.match(key):
        raise APIError(422, "invalid_project", "'project' must be Label Studio's project key "
                       "'<id>.<created timestamp>'", {"project": str(value)[:80]})
    return key


def webhook_project_key(project: Mapping[str, Any]) -> str:
    """The key Label Studio uses in /setup and /predict, rebuilt from a webhook's project."""
    pid = project.get("id")
    created = project.get("created_at")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 1 <= pid <= MAX_ID:
        raise APIError(422, "invalid_project", "the webhook's project has no id")
    if isinstance(created, str):
        try:
            return f"{pid}.{int(datetime.fromisoformat(created).timestamp())}"
        except ValueError:
            pass
    return str(pid)


def find_link(session: Session, key: str) -> LabelStudioLink | None:
    """The link for a project key. A bare id (a webhook without the project's creation time)
    matches the one link of that id; a full key only itself (two Label Studio servers may
    both have a project 9)."""
    link = session.scalar(select(LabelStudioLink).where(LabelStudioLink.ls_project == key))
    if link is not None or "." in key:
        return link
    pid = key
    found = list(session.scalars(select(LabelStudioLink).where(
        (LabelStudioLink.ls_project == pid) | LabelStudioLink.ls_project.startswith(pid + "."))))
    return found[0] if len(found) == 1 else None


def ensure_link(session: Session, key: str, label_config: str | None,
                hostname: str | None = None) -> tuple[LabelStudioLink, LabelMapping]:
    """The link for ``key``, created (with its prelabel project) or updated from the config.

    A config that adds labels adds classes; one that changes the task (choices to boxes) is
    refused, since the labels so far would not fit it. The caller commits.
    """
    link = find_link(session, key)
    if not label_config:
        if link is None:
            raise APIError(404, "unknown_project",
                           f"Label Studio project {key} is not connected: it must call /setup "
                           "or send its label_config")
        return link, LabelMapping.from_dict(link.mapping)
    try:
        mapping = parse_label_config(label_config)
    except UnsupportedConfig as exc:
        raise APIError(422, exc.code, exc.message) from exc
    if link is None:
        try:
            with session.begin_nested():
                project = Project(name=f"Label Studio project {key.split('.', 1)[0]}",
                                  task=mapping.task)
                session.add(project)
                session.flush()
                session.add_all(ProjectClass(project_id=project.id, name=n)
                                for n in mapping.labels)
                link = LabelStudioLink(ls_project=key, project_id=project.id,
                                       mapping=mapping.to_dict(), hostname=hostname)
                session.add(link)
                session.flush()
        except IntegrityError:  # a concurrent request linked it first
            link = find_link(session, key)
            if link is None:
                raise
        return link, mapping
    project = session.get(Project, link.project_id)
    assert project is not None
    if project.task != mapping.task:
        raise APIError(409, "label_config_changed",
                       f"this Label Studio project was connected as a {project.task} project; "
                       f"its label config now asks for {mapping.task}. Connect a new Label "
                       "Studio project for the new task")
    known = set(session.scalars(select(ProjectClass.name).where(
        ProjectClass.project_id == project.id)))
    session.add_all(ProjectClass(project_id=project.id, name=n)
                    for n in mapping.labels if n not in known)
    if link.mapping != mapping.to_dict():
        link.mapping = mapping.to_dict()
    if hostname and link.hostname != hostname:
        link.hostname = hostname
    session.flush()
    return link, mapping


def _task_id(task: Mapping[str, Any]) -> int:
    tid = task.get("id")
    if not isinstance(tid, int) or isinstance(tid, bool) or not 1 <= tid <= MAX_ID:
        raise FetchError("invalid_task", "the task has no integer 'id'")
    return tid


def _image_value(task: Mapping[str, Any], mapping: LabelMapping) -> object:
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise FetchError("invalid_task", "the task has no 'data' object")
    return data.get(mapping.data_key)


def task_images(session: Session, ctx: AppContext, link: LabelStudioLink, mapping: LabelMapping,
                fetcher: ImageFetcher, tasks: Sequence[Mapping[str, Any]]
                ) -> tuple[list[Image | FetchError], list[int]]:
    """Each task's stored image (or why it has none), and the ids of images new to prelabel.

    Known tasks whose image URL has not changed are not fetched again; the rest are fetched
    concurrently and stored by sha256 (the same bytes are stored once per project). The
    caller commits.
    """
    out: list[Image | FetchError | None] = [None] * len(tasks)
    wanted: dict[int, tuple[int, object]] = {}  # index -> (task id, image field)
    for n, task in enumerate(tasks):
        try:
            if not isinstance(task, Mapping):
                raise FetchError("invalid_task", "a task must be an object")
            wanted[n] = (_task_id(task), _image_value(task, mapping))
        except FetchError as exc:
            out[n] = exc
    known = {r.task_id: r for r in session.scalars(select(LabelStudioTask).where(
        LabelStudioTask.link_id == link.id,
        LabelStudioTask.task_id.in_([t for t, _ in wanted.values()])))}
    images = {i.id: i for i in session.scalars(select(Image).where(
        Image.id.in_([r.image_id for r in known.values()])))}
    todo: dict[int, str] = {}
    for n, (tid, value) in wanted.items():
        row = known.get(tid)
        if row is not None and row.url == value and row.image_id in images:
            out[n] = images[row.image_id]
            continue
        try:
            todo[n] = fetcher.resolve(value)
        except FetchError as exc:
            out[n] = exc
    fetched = _fetch_all(fetcher, todo)
    new_ids: list[int] = []
    for n, got in fetched.items():
        tid, value = wanted[n]
        if isinstance(got, FetchError):
            out[n] = got
            continue
        try:
            info = inspect_image(got, max_pixels=ctx.settings.max_image_pixels)
        except ImageRejected as exc:
            out[n] = FetchError(exc.code, f"the task's image was refused: {exc.message}",
                                exc.status)
            continue
        name = todo[n].rsplit("/", 1)[-1].split("?", 1)[0] or f"task-{tid}"
        image, duplicate = store_image(session, ctx, link.project_id, name, got, info)
        if not duplicate:
            new_ids.append(image.id)
        row = known.get(tid)
        if row is None:
            row = LabelStudioTask(link_id=link.id, task_id=tid, url=str(value),
                                  image_id=image.id)
            session.add(row)
            known[tid] = row
        else:
            row.url, row.image_id = str(value), image.id
        out[n] = image
    session.flush()
    return [o if o is not None else FetchError("invalid_task", "no image") for o in out], new_ids


def _fetch_all(fetcher: ImageFetcher, urls: dict[int, str]) -> dict[int, bytes | FetchError]:
    def one(client: httpx.Client, url: str) -> bytes | FetchError:
        try:
            return fetcher.fetch(client, url)
        except FetchError as exc:
            return exc

    if not urls:
        return {}
    with httpx.Client() as client:
        if len(urls) == 1:
            return {n: one(client, u) for n, u in urls.items()}
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            results = pool.map(lambda u: one(client, u), urls.values())
            return dict(zip(urls, results, strict=True))
