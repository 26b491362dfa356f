"""The ground truth, read the way prelabel reads it: the dataset is imported (over HTTP) into a
project of its own, and each image's label and bytes are read back. Every import format works,
and boxes are in the same displayed frame as the suggestions."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from service.simulate.client import ACTIVE, Client, SimulationError
from service.simulate.run import Truth

ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2")


def dataset_archive(path: Path) -> tuple[str, bytes]:
    """An archive as is, or a folder zipped in memory (stored, not compressed: images are)."""
    if path.is_file():
        if not path.name.lower().endswith(ARCHIVES):
            raise SimulationError(f"{path} is neither a folder nor a zip/tar archive")
        return path.name, path.read_bytes()
    if not path.is_dir():
        raise SimulationError(f"{path} does not exist")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            archive.write(file, file.relative_to(path).as_posix())
    return f"{path.name}.zip", buf.getvalue()


def load_truth(client: Client, path: Path, fmt: str, task: str,
               timeout: float = 1800) -> tuple[list[str], list[Truth], dict[str, object]]:
    """(classes, labeled images, the import report) of a dataset folder or archive; the
    training run the import queued is cancelled (counted in the report)."""
    _, archive = dataset_archive(path)
    pid = client.create_project(f"ground truth: {path.name}"[:200], task, [])
    report = client.import_archive(pid, archive, fmt, timeout)
    # The import queued a training run: nobody asks this project for suggestions, and
    # that run would take a worker slot and a core from the sessions' own time-budgeted runs.
    cancelled = 0
    for run in client.runs(pid):
        if run["status"] in ACTIVE:
            client.call("POST", f"/training-runs/{run['id']}/cancel", expect=(200, 409))
            cancelled += 1
    report = {**report, "ground_truth_runs_cancelled": cancelled}
    classes = list(client.call("GET", f"/projects/{pid}")["classes"])
    truth = []
    for image in client.images(pid, status="labeled"):
        label = client.label(image["id"])
        if label is None:
            continue
        boxes = None
        if task == "detection":
            boxes = tuple({k: b[k] for k in ("label", "x", "y", "width", "height")}
                          for b in label["boxes"] or [])
        truth.append(Truth(name=image["filename"], data=client.image_file(image["id"]),
                           tags=tuple(label["tags"]), boxes=boxes))
    if not truth:
        raise SimulationError(f"no labeled images in {path} ({fmt})")
    return classes, truth, report
