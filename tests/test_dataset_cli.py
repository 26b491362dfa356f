"""``prelabel import`` from a server-side path and ``prelabel export`` to a file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from service.db import session_scope
from service.migrate import upgrade
from service.tables import Project
from tests.conftest import DATASETS, env_for, settings_values
from tests.test_datasets_api import BCCD_SUBSET


def cli(values: dict[str, object], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=env_for(values),
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_import_and_export(tmp_path: Path, cache_dir: Path, sqlite_url: str) -> None:
    values = settings_values(tmp_path, sqlite_url, cache_dir)
    upgrade(sqlite_url)
    with session_scope(sqlite_url) as session:
        project = Project(name="cli", task="detection")
        session.add(project)
        session.flush()
        pid = project.id
    voc = tmp_path / "voc"
    for sub, ext in (("Annotations", "xml"), ("JPEGImages", "jpg")):
        (voc / sub).mkdir(parents=True)
        for name in BCCD_SUBSET[:4]:
            shutil.copy(DATASETS / "bccd" / sub / f"{name}.{ext}", voc / sub)
    r = cli(values, "import", "--project", str(pid), "--format", "voc", str(voc),
            "--mapping", '{"Platelets": null}')
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["labels"]["created"] == 4 and "Platelets" not in report["classes_created"]
    assert [(p["file"], p["object"]) for p in report["problems"]] == [
        ("Annotations/BloodImage_00338.xml", 12), ("Annotations/BloodImage_00343.xml", 3)]
    out = tmp_path / "out.zip"
    r = cli(values, "export", "--project", str(pid), "--format", "yolo", "--split", "50,50,0",
            "--seed", "4", "-o", str(out))
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
    assert "data.yaml" in names and sum(n.endswith(".jpg") for n in names) == 4
    # the exported archive imports back into another project, by path
    with session_scope(sqlite_url) as session:
        other = Project(name="back", task="detection")
        session.add(other)
        session.flush()
        other_id = other.id
    r = cli(values, "import", "--project", str(other_id), "--format", "yolo", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["labels"]["created"] == 4
    r = cli(values, "import", "--project", "999", "--format", "voc", str(voc))
    assert r.returncode == 1 and "not found" in r.stderr
