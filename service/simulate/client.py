"""The native API calls the simulated annotator makes (HTTP only, like a labeling UI)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx

ACTIVE = ("QUEUED", "RUNNING")


class SimulationError(RuntimeError):
    """The server answered something the simulation cannot go on from."""


class Client:
    """An admin-key client of one prelabel server."""

    def __init__(self, url: str, key: str, timeout: float = 120) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/") + "/api/v1", timeout=timeout,
                                 headers={"Authorization": f"Bearer {key}"})

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, expect: tuple[int, ...] = (200, 201),
             **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code not in expect:
            raise SimulationError(f"{method} {path}: {r.status_code} {r.text[:400]}")
        return r.json() if r.headers.get("content-type", "").startswith("application/json") \
            else r.content

    def create_project(self, name: str, task: str, classes: list[str]) -> int:
        return int(self.call("POST", "/projects", json={"name": name, "task": task,
                                                       "classes": classes})["id"])

    def import_archive(self, pid: int, archive: bytes, fmt: str, timeout: float) -> dict[str, Any]:
        """Upload a dataset archive and wait for the import job; returns its report."""
        job = self.call("POST", f"/projects/{pid}/imports", expect=(202,),
                        files={"file": ("dataset.zip", archive, "application/zip")},
                        data={"format": fmt, "create_classes": "true"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.call("GET", f"/imports/{job['id']}")
            if job["status"] == "SUCCEEDED":
                return dict(job["report"])
            if job["status"] == "FAILED":
                raise SimulationError(f"import failed: {job['error_code']}: {job['error']}")
            time.sleep(0.5)
        raise SimulationError("the import did not finish in time")

    def images(self, pid: int, status: str | None = None,
               order: str = "created") -> Iterator[dict[str, Any]]:
        """Every image of a project (paged)."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500, "order": order}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = self.call("GET", f"/projects/{pid}/images", params=params)
            yield from page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def next_listed(self, pid: int, order: str) -> dict[str, Any] | None:
        """The first unlabeled image of the project's listing in ``order`` (``uncertainty``:
        the one the promoted model is least sure of, upload order before a model)."""
        page = self.call("GET", f"/projects/{pid}/images",
                         params={"status": "unlabeled", "order": order, "limit": 1})
        return page["items"][0] if page["items"] else None

    def label(self, iid: int) -> dict[str, Any] | None:
        latest = self.call("GET", f"/images/{iid}/annotations")["latest"]
        return dict(latest) if latest else None

    def suggestion(self, iid: int) -> dict[str, Any] | None:
        """The promoted model's suggestion, or None before a model exists."""
        r = self.http.get(f"/images/{iid}/suggestions")
        if r.status_code == 409:
            return None
        if r.status_code != 200:
            raise SimulationError(f"suggestions for image {iid}: {r.status_code} {r.text[:300]}")
        return dict(r.json())

    def suggestions(self, pid: int, ids: list[int]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for start in range(0, len(ids), 256):
            out += self.call("POST", f"/projects/{pid}/suggestions",
                             json={"image_ids": ids[start:start + 256]})["items"]
        return out

    def annotate(self, iid: int, body: dict[str, Any]) -> None:
        self.call("POST", f"/images/{iid}/annotations", json=body)

    def upload(self, pid: int, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        """Upload images in one request; returns their rows in order."""
        result = self.call("POST", f"/projects/{pid}/images",
                           files=[("files", (n, d, "application/octet-stream"))
                                  for n, d in files])
        if result["errors"]:
            raise SimulationError(f"upload: {result['errors'][0]}")
        return list(result["images"])

    def wait_embedded(self, pid: int, timeout: float) -> float:
        """Wait until the worker has embedded every image of a project (uncertainty and
        suggestions of classification models read the embeddings); returns the seconds."""
        start = time.monotonic()
        while True:
            stats = self.call("GET", f"/projects/{pid}/stats")
            if stats["embedded"] >= stats["images"]:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise SimulationError(f"{stats['images'] - stats['embedded']} images were not "
                                      f"embedded in {timeout:.0f} s")
            time.sleep(0.5)

    def image_file(self, iid: int) -> bytes:
        return bytes(self.call("GET", f"/images/{iid}/file"))

    def runs(self, pid: int) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/projects/{pid}/training-runs"))

    def wait_training(self, pid: int, timeout: float) -> float:
        """Wait while a run is queued or running; returns the seconds waited."""
        start = time.monotonic()
        while any(r["status"] in ACTIVE for r in self.runs(pid)):
            if time.monotonic() - start > timeout:
                raise SimulationError(f"training did not finish in {timeout:.0f} s")
            time.sleep(0.5)
        return time.monotonic() - start

    def wait_scored(self, pid: int, timeout: float) -> float:
        """Wait until the promoted model has scored every unlabeled image (a detector scores
        them after its run ends); returns the seconds waited."""
        start = time.monotonic()
        while self.promoted_version(pid) is not None:
            stats = self.call("GET", f"/projects/{pid}/stats")
            if stats["scored"] >= stats["unlabeled"]:
                break
            if time.monotonic() - start > timeout:
                raise SimulationError(f"{stats['unlabeled'] - stats['scored']} images were not "
                                      f"scored in {timeout:.0f} s")
            time.sleep(0.5)
        return time.monotonic() - start

    def promoted_version(self, pid: int) -> int | None:
        model = self.call("GET", f"/projects/{pid}")["promoted_model"]
        return int(model["version"]) if model else None
