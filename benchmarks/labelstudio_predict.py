"""Label Studio ML backend benchmark: ``POST /labelstudio/predict`` with 100 and 1,000 tasks.

A real ``prelabel serve`` (API + embedded worker) answers; a local HTTP server stands where
Label Studio serves task images (``/data/upload/...``, token checked). Projects are linked
with ``/setup`` and labeled through ``/webhook`` like Label Studio does, the worker trains,
then batches of tasks are predicted:

- cold: tasks new to prelabel (each image fetched, checked, stored, then predicted);
- warm: the same tasks again (stored images; stored suggestions are reused).

Classification: cards photos vs BCCD smears (``<Choices>``); detection: BCCD cells
(``<RectangleLabels>``). Every image is distinct (bytes after the JPEG end marker vary the
sha256, so nothing is deduplicated). Prints a table and writes
``benchmarks/results/labelstudio_predict.{json,md}``; it never asserts on timings.

    .venv/bin/python benchmarks/labelstudio_predict.py [--sizes 100,1000] [--train-seconds 300]
        [--skip-detection]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from benchmarks.core_loop import (
    RESULTS,
    log,
    machine_info,
    running_server,
    wait_for,
    wait_ready,
)
from tests.conftest import DATASETS
from tests.labelstudio_host import TOKEN, ImageHost, image_host
from tests.labelstudio_server import voc_result

Json = dict[str, Any]
CHOICES = ('<View><Image name="image" value="$image"/><Choices name="kind" toName="image">'
           '<Choice value="cards"/><Choice value="blood"/></Choices></View>')
BOXES = ('<View><Image name="image" value="$image"/><RectangleLabels name="cells" '
         'toName="image"><Label value="RBC"/><Label value="WBC"/><Label value="Platelets"/>'
         '</RectangleLabels></View>')
BCCD = sorted((DATASETS / "bccd" / "JPEGImages").glob("*.jpg"))
CARDS = sorted(p for p in (DATASETS / "cards" / "train").iterdir()
               if p.suffix.lower() == ".jpg")


def has_every_class(image: Path) -> bool:
    """Whether a BCCD image shows every cell type (so 15 such images meet the policy)."""
    labels = {b["value"]["rectanglelabels"][0] for b in voc_result(image, "cells", "image")}
    return labels == {"RBC", "WBC", "Platelets"}


class Backend:
    """The Label Studio side of the conversation, for one linked project."""

    def __init__(self, client: httpx.Client, key: str, config: str) -> None:
        self.client, self.key, self.config = client, key, config
        self.project = {"id": int(key.split(".")[0]), "label_config": config,
                        "created_at": datetime.fromtimestamp(int(key.split(".")[1]),
                                                             UTC).isoformat()}

    def setup(self) -> Json:
        r = self.client.post("/labelstudio/setup", json={"project": self.key,
                                                         "schema": self.config})
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def annotate(self, task: Json, result: list[Json], ann_id: int) -> Json:
        r = self.client.post("/labelstudio/webhook", json={
            "action": "ANNOTATION_CREATED", "project": self.project, "task": task,
            "annotation": {"id": ann_id, "task": task["id"], "result": result}})
        if r.status_code != 201:
            raise RuntimeError(f"webhook: {r.status_code} {r.text[:300]}")
        return r.json()  # type: ignore[no-any-return]

    def predict(self, tasks: list[Json]) -> tuple[float, list[Json]]:
        start = time.perf_counter()
        r = self.client.post("/labelstudio/predict", json={
            "tasks": tasks, "project": self.key, "label_config": self.config,
            "params": {"login": None, "password": None, "context": None}}, timeout=600)
        seconds = time.perf_counter() - start
        r.raise_for_status()
        results = r.json()["results"]
        assert len(results) == len(tasks), "one result per task"
        return seconds, results


def variant_tasks(host: ImageHost, images: list[Path], n: int, first_id: int,
                  tag: str) -> list[Json]:
    """``n`` tasks over distinct image bytes (the pool repeated with a varying suffix)."""
    tasks = []
    for k in range(n):
        path = images[k % len(images)]
        rel = f"{tag}/{k}/{path.name}"
        host.files[rel] = path.read_bytes() + bytes(k // len(images))
        tasks.append({"id": first_id + k, "data": {"image": f"/data/upload/{rel}"}})
    return tasks


def wait_model(client: httpx.Client, admin: str, name_hint: str, timeout: float) -> Json:
    """The prelabel project's promoted model, once there is one."""
    headers = {"Authorization": f"Bearer {admin}"}
    found: Json = {}

    def promoted() -> bool:
        for p in client.get("/api/v1/projects", headers=headers).json():
            if p["name"].endswith(name_hint) and p["promoted_model"]:
                found.update(p)
                return True
        return False

    found["wait_s"] = wait_for(promoted, timeout, 1.0, f"a model for {name_hint}")
    models = client.get(f"/api/v1/projects/{found['id']}/models", headers=headers).json()
    found["model"] = {k: models[0][k] for k in ("version", "kind", "thresholds", "metrics")}
    return found


def measure(backend: Backend, host: ImageHost, sizes: list[int], images: list[Path],
            tag: str) -> list[Json]:
    rows = []
    next_id = 100_000
    for size in sizes:
        tasks = variant_tasks(host, images, size, next_id, f"{tag}{size}")
        next_id += size
        cold, results = backend.predict(tasks)
        warm, again = backend.predict(tasks)
        shown = sum(len(r["result"]) for r in results)
        errors = sum("error" in r for r in results)
        versions = sorted({r["model_version"] for r in again})
        row = {"task": tag, "tasks": size, "cold_s": round(cold, 2), "warm_s": round(warm, 2),
               "cold_ms_per_task": round(1000 * cold / size, 1),
               "warm_ms_per_task": round(1000 * warm / size, 1), "result_items": shown,
               "errors": errors, "model_version": versions}
        log(json.dumps(row))
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> Json:
    sizes = [int(s) for s in args.sizes.split(",")]
    admin = "bench-" + secrets.token_hex(16)
    out: Json = {"machine": machine_info(), "sizes": sizes,
                 "train_seconds": args.train_seconds, "rows": []}
    with tempfile.TemporaryDirectory(prefix="prelabel-ls-") as tmp, image_host() as host:
        env = {"PRELABEL_LABELSTUDIO_URL": host.url, "PRELABEL_LABELSTUDIO_API_KEY": TOKEN,
               "PRELABEL_DETECTION_TRAIN_SECONDS": str(args.train_seconds)}
        with running_server(Path(tmp) / "data", admin, env) as server, \
                httpx.Client(base_url=server.url, timeout=120) as client:
            out["ready_s"] = wait_ready(server, client)
            # classification: 5 + 5 labels, the policy queues the first run
            cls = Backend(client, "1.1764300000", CHOICES)
            cls.setup()
            for n, path in enumerate(CARDS[:args.labels] + BCCD[:args.labels]):
                host.files[f"label/{path.name}"] = path.read_bytes()
                task = {"id": n + 1, "data": {"image": f"/data/upload/label/{path.name}"}}
                kind = "cards" if path in CARDS else "blood"
                cls.annotate(task, [{"from_name": "kind", "to_name": "image", "type": "choices",
                                     "value": {"choices": [kind]}}], n + 1)
            model = wait_model(client, admin, "project 1", 900)
            out["classification_model_wait_s"] = round(model["wait_s"], 1)
            out["classification_model"] = model["model"]
            pool = [p for pair in zip(CARDS[args.labels:], BCCD[args.labels:], strict=False)
                    for p in pair]
            out["rows"] += measure(cls, host, sizes, pool, "classification")
            if args.skip_detection:
                out["server_memory"] = server.memory()
                return out
            # detection: BCCD cells, 20 labeled smears showing every cell type
            det = Backend(client, "2.1764300000", BOXES)
            det.setup()
            labeled = [p for p in BCCD if has_every_class(p)][:args.detection_labels]
            for n, path in enumerate(labeled):
                task = {"id": n + 1, "data": {"image": f"/data/upload/bccd/JPEGImages/{path.name}"}}
                det.annotate(task, voc_result(path, "cells", "image"), n + 1)
            model = wait_model(client, admin, "project 2", 1800)
            out["detection_model_wait_s"] = round(model["wait_s"], 1)
            out["detection_model"] = model["model"]
            out["rows"] += measure(det, host, sizes, [p for p in BCCD if p not in labeled],
                                   "detection")
            out["server_memory"] = server.memory()
    return out


def write(results: Json) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "labelstudio_predict.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# Label Studio `/predict` (prelabel serve, CPU)", "",
        f"{m['cpus_usable']} CPUs ({m['cpu_model']}), torch {m['torch']}; "
        f"a local HTTP server stands for Label Studio's image host. Cold: tasks new to "
        f"prelabel (fetch, check, store, predict). Warm: the same tasks again.", "",
        f"Model ready after the labels: classification {results['classification_model_wait_s']} s,"
        f" detection {results.get('detection_model_wait_s', '-')} s "
        f"(budget {results['train_seconds']} s).", "",
        "| task | tasks | cold s | cold ms/task | warm s | warm ms/task | result items | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['task']} | {r['tasks']} | {r['cold_s']} | {r['cold_ms_per_task']} | "
                     f"{r['warm_s']} | {r['warm_ms_per_task']} | {r['result_items']} | "
                     f"{r['errors']} |")
    (RESULTS / "labelstudio_predict.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--labels", type=int, default=5, help="labels per class (classification)")
    parser.add_argument("--detection-labels", type=int, default=20)
    parser.add_argument("--train-seconds", type=float, default=300)
    parser.add_argument("--skip-detection", action="store_true")
    write(run(parser.parse_args()))


if __name__ == "__main__":
    main()
