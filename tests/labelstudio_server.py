"""A real Label Studio server for the ML backend tests, driven through its HTTP API only.

Label Studio is installed in its own virtual environment (``make labelstudio``: its pins
clash with ours) and found at ``$PRELABEL_TEST_LABEL_STUDIO`` or ``.lsvenv/bin/label-studio``.
It runs on a free port with its own SQLite data folder; the admin user and a legacy API token
are created at start (1.23 disables legacy tokens unless asked).
"""

from __future__ import annotations

import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx

from service.simulate.driver import free_port
from tests.conftest import DATASETS, stop_group

REPO = Path(__file__).resolve().parents[1]
USER, PASSWORD = "admin@example.com", "prelabel-test-pass"
TOKEN = "prelabel0test0legacy0token0000000000000"


def label_studio_bin() -> Path:
    """Where the Label Studio command is expected."""
    return Path(os.environ.get("PRELABEL_TEST_LABEL_STUDIO",
                               REPO / ".lsvenv" / "bin" / "label-studio"))


def _env(data_dir: Path) -> dict[str, str]:
    # Label Studio also reads bare names (USERNAME, PORT...): start from a clean slate
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "PRELABEL_"))
           and k not in ("USERNAME", "PASSWORD", "USER_TOKEN", "PORT", "HOST")}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "DJANGO_DB": "sqlite",
        # the ML backend runs on 127.0.0.1: Label Studio blocks local addresses by default
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",  # no call to pypi.org
        "PYTHONUNBUFFERED": "1",
    })
    return env


class LabelStudio:
    """A running Label Studio and an API client with its legacy token."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "label-studio.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [str(label_studio_bin()), "start", "--no-browser", "--data-dir", str(data_dir),
             "--internal-host", "127.0.0.1", "--port", str(self.port), "--host", self.url,
             "--username", USER, "--password", PASSWORD, "--user-token", TOKEN,
             "--enable-legacy-api-token"],
            env=_env(data_dir), stdout=self._fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        self.api = httpx.Client(base_url=self.url, timeout=120,
                                headers={"Authorization": f"Token {TOKEN}"})

    def wait_ready(self, timeout: float = 300) -> float:
        """Wait until /health answers (the first start migrates its database: ~1 min)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Label Studio exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Label Studio did not answer /health:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def call(self, method: str, path: str, expect: tuple[int, ...] = (200, 201, 204),
             **kw: Any) -> Any:
        """One API call; anything but ``expect`` fails with Label Studio's answer."""
        r = self.api.request(method, path, **kw)
        assert r.status_code in expect, (method, path, r.status_code, r.text[:800])
        return r.json() if r.content and "json" in r.headers.get("content-type", "") else None

    def create_project(self, title: str, label_config: str) -> int:
        return int(self.call("POST", "/api/projects",
                             json={"title": title, "label_config": label_config})["id"])

    def import_images(self, project: int, paths: list[Path]) -> list[dict[str, Any]]:
        """Upload image files as tasks; returns the tasks in upload order."""
        files = [(f"file{n}", (p.name, p.read_bytes(), "image/jpeg")) for n, p in enumerate(paths)]
        self.call("POST", f"/api/projects/{project}/import", files=files)
        tasks = self.call("GET", f"/api/tasks?project={project}&page_size=1000")["tasks"]
        by_name = {t["data"]["image"].rsplit("-", 1)[-1]: t for t in tasks}
        return [by_name[p.name] for p in paths]

    def connect_backend(self, project: int, url: str) -> dict[str, Any]:
        """Settings -> Model -> Connect model: Label Studio calls /health and /setup."""
        return dict(self.call("POST", "/api/ml", json={
            "url": url, "project": project, "title": "prelabel", "auth_method": "NONE",
            "is_interactive": False}))

    def annotate(self, task: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(self.call("POST", f"/api/tasks/{task}/annotations",
                              json={"result": result, "lead_time": 2.0}))

    def retrieve_predictions(self, project: int, task_ids: list[int] | None = None) -> Any:
        """The data manager's "Retrieve Predictions" action (all tasks, or these)."""
        selected = {"all": False, "included": task_ids} if task_ids else \
            {"all": True, "excluded": []}
        return self.call("POST", f"/api/dm/actions?id=retrieve_tasks_predictions"
                         f"&project={project}", json={"selectedItems": selected})

    def predictions(self, project: int) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/api/predictions?project={project}"))

    def personal_access_token(self) -> str:
        """Log in through the form and create the user's personal access token (a JWT
        refresh token; the API wants an access token made from it)."""
        with httpx.Client(base_url=self.url, timeout=60) as browser:
            browser.get("/user/login/").raise_for_status()
            r = browser.post("/user/login/", data={
                "csrfmiddlewaretoken": browser.cookies["csrftoken"], "email": USER,
                "password": PASSWORD}, headers={"Referer": f"{self.url}/user/login/"})
            assert r.status_code == 302, (r.status_code, r.text[:300])
            r = browser.post("/api/token/", headers={
                "X-CSRFToken": browser.cookies["csrftoken"], "Referer": f"{self.url}/"})
            assert r.status_code == 201, (r.status_code, r.text[:300])
            return str(r.json()["token"])

    def stop(self) -> None:
        self.api.close()
        stop_group(self.proc)
        self._fh.close()


def voc_result(image: Path, from_name: str, to_name: str) -> list[dict[str, Any]]:
    """A BCCD image's VOC boxes as Label Studio rectangles (zero-area ones dropped)."""
    root = ET.parse(DATASETS / "bccd" / "Annotations" / f"{image.stem}.xml").getroot()
    w, h = (float(root.findtext(f"size/{k}") or 0) for k in ("width", "height"))
    out = []
    for obj in root.iter("object"):
        x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}") or 0)
                          for k in ("xmin", "ymin", "xmax", "ymax"))
        if x1 > x0 and y1 > y0:
            out.append({"from_name": from_name, "to_name": to_name, "type": "rectanglelabels",
                        "original_width": int(w), "original_height": int(h),
                        "image_rotation": 0,
                        "value": {"x": 100 * x0 / w, "y": 100 * y0 / h,
                                  "width": 100 * (x1 - x0) / w, "height": 100 * (y1 - y0) / h,
                                  "rotation": 0, "rectanglelabels": [obj.findtext("name")]}})
    return out
