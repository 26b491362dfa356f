"""prelabel as the ML backend of a real Label Studio server (1.23), through Label Studio's API.

Label Studio is connected to a real ``prelabel serve`` (API + Celery worker); projects, tasks,
annotations, training and prediction retrieval all go through Label Studio, and the tests read
back what Label Studio stored. prelabel fetches the task images from Label Studio with its
legacy token, as a deployment would (DESIGN section 3.1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.labelstudio.fetch import FetchError, ImageFetcher
from service.settings import Settings
from service.simulate.driver import free_port
from tests.conftest import DATASETS, backend_values, env_for, stop_group
from tests.labelstudio_server import TOKEN, LabelStudio, label_studio_bin, voc_result

pytestmark = pytest.mark.slow

CHOICES = ('<View><Image name="image" value="$image"/><Choices name="kind" toName="image">'
           '<Choice value="cards"/><Choice value="blood"/></Choices></View>')
BOXES = ('<View><Image name="photo" value="$image"/><RectangleLabels name="cells" '
         'toName="photo"><Label value="RBC"/><Label value="WBC"/><Label value="Platelets"/>'
         '</RectangleLabels></View>')
BCCD = sorted((DATASETS / "bccd" / "JPEGImages").glob("*.jpg"))
CARDS = sorted(p for p in (DATASETS / "cards" / "train").iterdir() if p.suffix == ".JPG")
ADMIN = "prelabel-admin-key-for-the-label-studio-test"


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    if not label_studio_bin().exists():
        if os.environ.get("CI"):
            pytest.fail(f"Label Studio is required in CI: {label_studio_bin()} is missing")
        pytest.skip("Label Studio is not installed: run `make labelstudio`")
    server = LabelStudio(tmp_path_factory.mktemp("label-studio"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class Prelabel:
    """``prelabel serve`` (API and worker) as a user runs it, and its native API."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(values["data_dir"]) / "serve.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
            env=env_for(values), stdout=self._fh, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.api = httpx.Client(base_url=self.url, timeout=60,
                                headers={"Authorization": f"Bearer {ADMIN}"})
        wait(lambda: self._ready(), 180, "prelabel serve", self.tail)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prelabel serve exited:\n{self.tail()}")
        try:
            ok = self.api.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False
        return ok and " ready." in self.log.read_text(errors="replace")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def project(self) -> dict[str, Any]:
        [project] = self.api.get("/api/v1/projects").json()
        return dict(project)

    def wait_version(self, version: int, timeout: float) -> dict[str, Any]:
        """Wait until the linked project's promoted model is ``version``."""
        def promoted() -> bool:
            model = self.project()["promoted_model"]
            return model is not None and model["version"] >= version

        wait(promoted, timeout, f"model v{version}", self.tail)
        return self.project()

    def stop(self) -> None:
        self.api.close()
        stop_group(self.proc, timeout=40)
        self._fh.close()


def wait(check: Callable[[], bool], timeout: float, what: str, tail: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{tail()}")


def prelabel_for(request: pytest.FixtureRequest, backend: str, tmp_path: Path, cache_dir: Path,
                 ls: LabelStudio, **extra: Any) -> Prelabel:
    values = backend_values(request, backend, tmp_path, cache_dir, admin_key=ADMIN,
                            labelstudio_url=ls.url, labelstudio_api_key=TOKEN, **extra)
    return Prelabel(values)


def choice(kind: str) -> list[dict[str, Any]]:
    return [{"from_name": "kind", "to_name": "image", "type": "choices",
             "value": {"choices": [kind]}}]


def latest_by_task(ls: LabelStudio, project: int) -> dict[int, dict[str, Any]]:
    """Each task's newest stored prediction."""
    out: dict[int, dict[str, Any]] = {}
    for p in sorted(ls.predictions(project), key=lambda p: p["id"]):
        out[p["task"]] = p
    return out


def test_classification_project_end_to_end(request: pytest.FixtureRequest, tmp_path: Path,
                                          cache_dir: Path, label_studio: LabelStudio) -> None:
    """Choices: connect, label 5 per class in Label Studio, the policy trains, Label Studio
    retrieves predictions; more labels and "Start training" give v2, retrieved again."""
    ls = label_studio
    prelabel = prelabel_for(request, "redis", tmp_path, cache_dir, ls)
    try:
        pid = ls.create_project("cards or blood", CHOICES)
        images = [p for pair in zip(CARDS[:9], BCCD[:9], strict=True) for p in pair]
        tasks = ls.import_images(pid, images)
        kind = {t["id"]: ("cards" if p in CARDS else "blood") for t, p in zip(tasks, images,
                                                                              strict=True)}
        backend = ls.connect_backend(pid, f"{prelabel.url}/labelstudio")
        project = prelabel.project()  # linked on /setup, from the label config
        assert (project["task"], project["classes"]) == ("multiclass", ["cards", "blood"])
        assert project["promoted_model"] is None

        # before a model: retrieving stores nothing and fails nothing
        ls.retrieve_predictions(pid)
        assert [p for p in ls.predictions(pid) if p["result"]] == []

        labeled, rest = tasks[:10], tasks[10:]
        for task in labeled:  # Label Studio sends each to /webhook: the policy queues a run
            ls.annotate(task["id"], choice(kind[task["id"]]))
        assert prelabel.project()["labeled_count"] == 10
        prelabel.wait_version(1, 600)

        ls.retrieve_predictions(pid, [t["id"] for t in rest])
        stored = latest_by_task(ls, pid)
        for task in rest:
            p = stored[task["id"]]
            assert p["model_version"] == "v1", p
            [item] = p["result"]
            assert (item["from_name"], item["to_name"], item["type"]) == ("kind", "image",
                                                                          "choices")
            assert item["value"]["choices"] == [kind[task["id"]]], (task, p)
            assert 0.5 < item["score"] <= 1 and p["score"] == pytest.approx(item["score"])

        # a correction and "Start Training" in Label Studio: v2, and predictions of v2
        for task in rest[:4]:
            ls.annotate(task["id"], choice(kind[task["id"]]))
        ls.call("POST", f"/api/ml/{backend['id']}/train", json={})
        prelabel.wait_version(2, 600)
        ls.retrieve_predictions(pid, [t["id"] for t in rest[4:]])
        stored = latest_by_task(ls, pid)
        for task in rest[4:]:
            p = stored[task["id"]]
            assert p["model_version"] == "v2", p
            assert p["result"][0]["value"]["choices"] == [kind[task["id"]]]
        runs = prelabel.api.get(f"/api/v1/projects/{project['id']}/training-runs").json()
        assert [r["trigger"] for r in runs] == ["manual", "auto"]
    finally:
        prelabel.stop()


LABELED = 16  # smears annotated in the detection test (each shows all three cell types)


def test_detection_project_end_to_end(request: pytest.FixtureRequest, tmp_path: Path,
                                      cache_dir: Path, label_studio: LabelStudio) -> None:
    """RectangleLabels: boxes drawn in Label Studio train a detector; the boxes Label Studio
    stores come back in percent, with the right names, labels and sizes."""
    ls = label_studio
    # a short epoch cap (no time budget: a slow machine trains the same detector, later) and a
    # lower bar per class keep the test to a few minutes, as in tests/test_detection_end_to_end.py
    # (45 s of training on a busy machine gave no box over threshold). 16 labeled smears, not 12:
    # with 10 to train on and 2 held out, the detector's held-out mAP@.5 stayed 0 until early
    # stopping in 3 runs of 3 on 2026-12-07 (it had passed before; the cause was not traced),
    # so no class passed its threshold
    prelabel = prelabel_for(request, "embedded", tmp_path, cache_dir, ls,
                            detection_train_seconds=0, detection_max_epochs=20,
                            min_labels_per_class_detection=LABELED)
    try:
        pid = ls.create_project("cells", BOXES)
        every = [p for p in BCCD if {b["value"]["rectanglelabels"][0]
                                     for b in voc_result(p, "cells", "photo")}
                 == {"RBC", "WBC", "Platelets"}]
        images = every[:LABELED + 4]
        tasks = ls.import_images(pid, images)
        ls.connect_backend(pid, f"{prelabel.url}/labelstudio")
        assert prelabel.project()["task"] == "detection"
        for task, image in zip(tasks[:LABELED], images[:LABELED], strict=True):
            ls.annotate(task["id"], voc_result(image, "cells", "photo"))
        prelabel.wait_version(1, 900)
        rest = tasks[LABELED:]
        ls.retrieve_predictions(pid, [t["id"] for t in rest])
        stored = latest_by_task(ls, pid)
        boxes = 0
        for task in rest:
            p = stored[task["id"]]
            assert p["model_version"] == "v1"
            for item in p["result"]:
                assert (item["from_name"], item["to_name"], item["type"]) == (
                    "cells", "photo", "rectanglelabels")
                assert (item["original_width"], item["original_height"]) == (640, 480)
                v = item["value"]
                assert v["rectanglelabels"][0] in ("RBC", "WBC", "Platelets")
                assert v["x"] >= 0 and v["x"] + v["width"] <= 100.01
                assert v["y"] >= 0 and v["y"] + v["height"] <= 100.01
                assert v["width"] > 0 and v["height"] > 0 and v["rotation"] == 0
                assert 0 < item["score"] <= 1
                boxes += 1
            if p["result"]:
                assert p["score"] == pytest.approx(min(i["score"] for i in p["result"]))
        assert boxes >= len(rest) * 3  # a smear holds many cells: the detector finds some
    finally:
        prelabel.stop()


def test_images_fetched_with_a_personal_access_token(tmp_path: Path,
                                                     label_studio: LabelStudio) -> None:
    """The other kind of key 1.23 offers: prelabel renews an access token from it."""
    ls = label_studio
    pid = ls.create_project("token", CHOICES)
    [task] = ls.import_images(pid, [BCCD[0]])
    pat = ls.personal_access_token()
    settings = Settings(data_dir=tmp_path, labelstudio_url=ls.url, labelstudio_api_key=pat)
    fetcher = ImageFetcher(settings)
    with httpx.Client() as client:
        data = fetcher.fetch(client, fetcher.resolve(task["data"]["image"]))
        assert data == BCCD[0].read_bytes()
        wrong_key = ImageFetcher(Settings(data_dir=tmp_path, labelstudio_url=ls.url,
                                            labelstudio_api_key="not-a-key"))
        with pytest.raises(FetchError) as refused:
            wrong_key.fetch(client, fetcher.resolve(task["data"]["image"]))
        assert refused.value.code == "image_fetch_unauthorized"
