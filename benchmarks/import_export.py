"""Dataset import and export benchmark: a generated 10,000-image detection project.

Measures, on this machine (SQLite, the embedded default):
- full import (image files + COCO labels; every image decoded, hashed, stored): images/s;
- annotation-only import (a COCO JSON whose images the project already holds): images/s
  (target >= 200);
- export through a real ``prelabel serve`` process over HTTP (COCO with the images, streamed):
  images/s, MB/s and the API process's peak memory for two project sizes (target: peak memory
  independent of the project's size).
Each import runs in its own process (as the worker runs it) so its peak memory is its own. It
prints a table and writes ``benchmarks/results/import_export.{json,md}``; it never asserts.

    .venv/bin/python benchmarks/import_export.py [--images 10000] [--small 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from PIL import Image as PILImage

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLASSES = ["cell", "dot", "blob"]
Json = dict[str, Any]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- the dataset


def make_dataset(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` small JPEGs (distinct content) and one COCO JSON with 1-4 boxes each."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        w, h = 160, 120  # noise: ~12 KB as JPEG, so archives are big enough to matter
        img = PILImage.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75)
        name = f"img_{i:06d}.jpg"
        (root / "images" / name).write_bytes(buf.getvalue())
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for _ in range(rng.randint(1, 4)):
            bw, bh = rng.randint(4, 60), rng.randint(4, 50)
            x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": rng.randint(1, 3), "bbox": [x, y, bw, bh],
                                "area": bw * bh, "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def subset(src: Path, dest: Path, count: int) -> Path:
    """The first ``count`` images of a generated dataset, as a dataset of its own."""
    coco = json.loads((src / "annotations.json").read_text())
    keep = {img["id"] for img in coco["images"][:count]}
    (dest / "images").mkdir(parents=True)
    for img in coco["images"][:count]:
        os.link(src / "images" / img["file_name"], dest / "images" / img["file_name"])
    coco["images"] = coco["images"][:count]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    (dest / "annotations.json").write_text(json.dumps(coco))
    return dest


# ---------------------------------------------------------------- one import, in a process


def run_import_phase(args: argparse.Namespace) -> None:
    """Child process: one import as the worker (or the CLI) runs it; prints a JSON line."""
    from service.datasets.importer import ImportOptions
    from service.datasets.jobs import create_job, run_job
    from service.db import sessionmaker_for
    from service.settings import get_settings
    from service.storage import LocalBlobStore
    from service.tables import ImportJob

    settings = get_settings()
    sessions = sessionmaker_for(settings.db_url)
    blobs = LocalBlobStore(settings.blob_dir)
    with sessions.begin() as session:
        jid = create_job(session, args.project, args.format, ImportOptions(), origin="cli",
                         source_name="bench", status="RUNNING").id
    source = Path(args.source)
    annotation_file = Path(args.annotation_file) if args.annotation_file else None
    start = time.perf_counter()
    status = run_job(sessions, blobs, settings, None, jid, source, annotation_file)
    seconds = time.perf_counter() - start
    with sessions() as session:
        job = session.get(ImportJob, jid)
        assert job is not None
        report = job.report or {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"status": status, "seconds": seconds, "peak_rss_mib": peak,
                      "images": report.get("images"), "labels": report.get("labels"),
                      "objects": report.get("objects"),
                      "problems": report.get("problems_total")}))


def run_export_phase(args: argparse.Namespace) -> None:
    """Child process: the API's export code in-process under tracemalloc (Python heap peak)."""
    import tracemalloc

    from service.datasets.exporter import ExportOptions, parse_split, stream_export
    from service.db import sessionmaker_for
    from service.settings import get_settings
    from service.storage import LocalBlobStore

    settings = get_settings()
    sessions = sessionmaker_for(settings.db_url)
    options = ExportOptions("coco", split=parse_split("80,10,10"), seed=1)
    tracemalloc.start()
    size = 0
    start = time.perf_counter()
    for chunk in stream_export(sessions, LocalBlobStore(settings.blob_dir), args.project,
                               options):
        size += len(chunk)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    print(json.dumps({"seconds": seconds, "archive_mib": size / 2**20,
                      "traced_peak_mib": peak / 2**20}))


def child_export(env: dict[str, str], project: int) -> Json:
    cmd = [sys.executable, __file__, "--phase", "export", "--project", str(project)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"export failed:\n{out.stderr[-3000:]}")
    result: Json = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def child_import(env: dict[str, str], project: int, fmt: str, source: Path,
                 annotation_file: Path | None = None) -> Json:
    cmd = [sys.executable, __file__, "--phase", "import", "--project", str(project),
           "--format", fmt, "--source", str(source)]
    if annotation_file is not None:
        cmd += ["--annotation-file", str(annotation_file)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"import failed:\n{out.stderr[-3000:]}")
    result: Json = json.loads(out.stdout.strip().splitlines()[-1])
    if result["status"] != "SUCCEEDED":
        raise RuntimeError(f"import {result}")
    return result


# ---------------------------------------------------------------- export through the API


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    return 0


def export_over_http(env: dict[str, str], key: str, project: int, images: int,
                     log_path: Path) -> Json:
    """Start ``prelabel serve``, stream one export, measure its time and the API's memory."""
    port = free_port()
    with log_path.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--no-embedded-worker", "--port",
             str(port)], env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        headers = {"Authorization": f"Bearer {key}"}
        httpx.get(f"{url}/api/v1/projects/{project}", headers=headers).raise_for_status()

        def one_export() -> tuple[float, int]:
            start = time.perf_counter()
            size = 0
            with httpx.stream("GET", f"{url}/api/v1/projects/{project}/export",
                              headers=headers, timeout=600,
                              params={"format": "coco", "split": "80,10,10", "seed": 1}) as r:
                r.raise_for_status()
                for chunk in r.iter_raw(1 << 16):
                    size += len(chunk)
            return time.perf_counter() - start, size

        before = vm_kib(proc.pid, "VmRSS")
        seconds, size = one_export()
        peak = vm_kib(proc.pid, "VmHWM")
        # the same export again, with the high-water mark reset: the steady state
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        before2 = vm_kib(proc.pid, "VmRSS")
        seconds2, _ = one_export()
        peak2 = vm_kib(proc.pid, "VmHWM")
        return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
                "archive_mib": size / 2**20, "mib_per_s": size / 2**20 / seconds,
                "api_rss_before_mib": before / 1024, "api_peak_rss_mib": peak / 1024,
                "growth_mib": (peak - before) / 1024, "second_seconds": seconds2,
                "second_growth_mib": (peak2 - before2) / 1024}
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    parser.add_argument("--phase", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--project", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--annotation-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "import":
        run_import_phase(args)
        return
    if args.phase == "export":
        run_export_phase(args)
        return

    from service.auth import create_key
    from service.db import session_scope
    from service.migrate import upgrade
    from service.tables import Project

    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="prelabel-bench-io-"))
    data = tmp / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRELABEL_")}
    admin = "pl_bench_" + secrets.token_hex(16)
    env.update(PRELABEL_DATA_DIR=str(data), PRELABEL_ADMIN_KEY=admin,
               PYTHONPATH=str(REPO), PRELABEL_DEVICE="cpu")
    db_url = f"sqlite:///{data / 'prelabel.db'}"
    results: Json = {"images": args.images, "small": args.small}
    try:
        log(f"generating {args.images} images + COCO labels in {tmp}")
        t0 = time.perf_counter()
        big = tmp / "big"
        make_dataset(big, args.images)
        small = subset(big, tmp / "small", args.small)
        labels_only = tmp / "labels_only"
        labels_only.mkdir()
        shutil.copy(big / "annotations.json", labels_only / "annotations.json")
        log(f"generated in {time.perf_counter() - t0:.1f} s")
        upgrade(db_url)
        with session_scope(db_url) as session:
            projects = [Project(name=n, task="detection") for n in ("full", "labels", "small")]
            session.add_all(projects)
            session.flush()
            full, labels_pid, small_pid = (p.id for p in projects)
            _, key = create_key(session, "bench", "admin")

        log(f"full import: {args.images} image files + labels (COCO)")
        r = child_import(env, full, "coco", big)
        results["full_import"] = {**r, "images_per_s": args.images / r["seconds"]}
        log(f"  {args.images / r['seconds']:.0f} images/s, peak {r['peak_rss_mib']:.0f} MiB")

        log("annotation-only import: images first (YOLO without label files: unlabeled), "
            "then the COCO JSON alone")
        (big / "images" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        r = child_import(env, labels_pid, "yolo", big / "images")
        results["images_only_import"] = {**r, "images_per_s": args.images / r["seconds"]}
        r = child_import(env, labels_pid, "coco", labels_only,
                         labels_only / "annotations.json")
        results["annotation_only_import"] = {**r, "images_per_s": args.images / r["seconds"]}
        log(f"  {args.images / r['seconds']:.0f} images/s, peak {r['peak_rss_mib']:.0f} MiB")
        r = child_import(env, labels_pid, "coco", labels_only,
                         labels_only / "annotations.json")
        results["reimport_unchanged"] = {**r, "images_per_s": args.images / r["seconds"]}

        r = child_import(env, small_pid, "coco", small)
        results["small_import"] = {**r, "images_per_s": args.small / r["seconds"]}

        server_log = tmp / "server.log"
        results["export"] = []
        for pid, n in ((small_pid, args.small), (full, args.images)):
            log(f"export over HTTP (COCO + images, 80/10/10): {n} images")
            r = export_over_http(env, key, pid, n, server_log)
            r["traced_peak_mib"] = child_export(env, pid)["traced_peak_mib"]
            results["export"].append(r)
            log(f"  {r['images_per_s']:.0f} images/s, {r['mib_per_s']:.1f} MiB/s, API peak "
                f"{r['api_peak_rss_mib']:.0f} MiB (+{r['growth_mib']:.1f} MiB during export); "
                f"Python heap peak of the export code {r['traced_peak_mib']:.2f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(), "load_at_start": load,
                          "database": "sqlite (embedded default)",
                          "when": datetime.now(UTC).isoformat(timespec="seconds")}
    write_results(results)


def write_results(results: Json) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "import_export.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# Import / export benchmark", "",
        f"{results['images']:,} generated 160x120 JPEGs (noise, ~12 KB) with 1-4 boxes each; "
        f"SQLite; {m['cpus']} CPUs; load at start {m['load_at_start'][0]:.2f}; {m['when']}.", "",
        "| what | images | seconds | images/s | peak RSS (MiB) | target |",
        "|---|---:|---:|---:|---:|---|"]
    for key, what, target in (
            ("full_import", "import: image files + COCO labels", ""),
            ("images_only_import", "import: image files only (no labels)", ""),
            ("annotation_only_import", "import: COCO labels for stored images", ">= 200/s"),
            ("reimport_unchanged", "re-import of the same labels (no change)", ""),
            ("small_import", "import: image files + labels (small project)", "")):
        r = results[key]
        n = results["small"] if key == "small_import" else results["images"]
        lines.append(f"| {what} | {n:,} | {r['seconds']:.1f} | {r['images_per_s']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {target} |")
    lines += ["", "Export over HTTP from a real `prelabel serve` (COCO with the images, split "
              "80/10/10, streamed):", "",
              "| images | seconds | images/s | archive MiB | MiB/s | API RSS before | "
              "API peak RSS | growth, 1st export | growth, 2nd export | Python heap peak |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["export"]:
        lines.append(f"| {r['images']:,} | {r['seconds']:.1f} | {r['images_per_s']:.0f} | "
                     f"{r['archive_mib']:.1f} | {r['mib_per_s']:.1f} | "
                     f"{r['api_rss_before_mib']:.0f} | {r['api_peak_rss_mib']:.0f} | "
                     f"{r['growth_mib']:+.1f} | {r['second_growth_mib']:+.1f} | "
                     f"{r['traced_peak_mib']:.2f} |")
    lines += ["", "Memory in MiB. RSS is the whole API process, a fresh one per size; growth = its "
              "peak during an export minus its RSS just before. The first export of a process "
              "also pays one-time costs (imports, caches, thread arenas); the second, the same "
              "export with the peak reset (`/proc/PID/clear_refs`), is the steady state. The "
              "last column is the peak of Python allocations while the same export code runs in "
              "a process of its own (tracemalloc)."]
    (RESULTS / "import_export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
