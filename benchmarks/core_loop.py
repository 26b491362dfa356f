"""Core-loop benchmark of prelabel against a real ``prelabel serve`` process.

One run measures, on this machine: label-to-suggestions time, suggestion latency for stored and
uploaded images, batch suggestions, embedding throughput (through the worker and in-process),
a PyTorch-eager one-image-per-call baseline, and the API's peak memory with a large project.
It prints a table and writes ``benchmarks/results/core_loop.{json,md}``; it never asserts on
timings. Every process it starts is stopped, also on Ctrl-C or error; data lives in a temp dir.

    .venv/bin/python benchmarks/core_loop.py [--pool 1000] [--big 10000] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import onnxruntime as ort
import torch
from PIL import Image as PILImage
from PIL import ImageEnhance, ImageOps
from sqlalchemy import insert, select
from torchvision import transforms

from models.backbone import EMBED_DIM, INPUT_SIZE, MEAN, STD, backbone_id, load_backbone
from models.views import PREDICTION_VIEWS
from service.db import sessionmaker_for
from service.settings import Settings
from service.simulate.driver import group_alive
from service.storage import LocalBlobStore, image_key, sha256_hex
from service.tables import Annotation, Embedding, Image
from tests.conftest import DATASETS
from tests.images import RANKS, Sample, card_crops
from workers.context import WorkerContext
from workers.embedding import embed_views

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BCCD = DATASETS / "bccd" / "JPEGImages"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
Json = dict[str, Any]


@dataclass(frozen=True)
class Config:
    """Sizes of one run (full or ``--quick``)."""

    quick: bool
    pool: int
    big: int
    stored_calls: int
    predict_calls: int
    batch_size: int
    bccd_images: int
    baseline_calls: int
    big_labels: int
    big_batch_images: int
    big_single_calls: int
    floor_calls: int
    batches: int = 3
    predict_warmup: int = 3
    labels_per_class: int = 5
    upload_batch: int = 64


def make_config(args: argparse.Namespace) -> Config:
    """Full sizes, or the small ones of ``--quick``; ``--pool``/``--big`` override either."""
    if args.quick:
        return Config(quick=True, pool=args.pool or 200, big=args.big or 1000, stored_calls=40,
                      predict_calls=10, batch_size=32, bccd_images=64, baseline_calls=15,
                      big_labels=300, big_batch_images=512, big_single_calls=40, floor_calls=20)
    return Config(quick=False, pool=args.pool or 1000, big=args.big or 10000, stored_calls=300,
                  predict_calls=50, batch_size=256, bccd_images=364, baseline_calls=50,
                  big_labels=300, big_batch_images=2000, big_single_calls=200,
                  floor_calls=50)


# ---------------------------------------------------------------- small helpers


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line with the elapsed time."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def stats_ms(samples: Sequence[float]) -> Json:
    """p50, p95, mean, min and max of latencies in ms."""
    a = np.asarray(samples, dtype=np.float64)
    return {"n": len(a), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


def wait_for(check: Callable[[], bool], timeout: float, interval: float, what: str) -> float:
    """Poll ``check`` until true; returns the seconds it took (TimeoutError after timeout)."""
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.perf_counter() - start


def call(client: httpx.Client, method: str, url: str, status: int = 200, **kw: Any) -> Any:
    """One request; raises with the body when the status is not the expected one."""
    r = client.request(method, url, **kw)
    if r.status_code != status:
        raise RuntimeError(f"{method} {url}: HTTP {r.status_code} {r.text[:500]}")
    return r.json() if r.content else None


def timed_ms(client: httpx.Client, method: str, url: str, **kw: Any) -> float:
    """Wall time of one successful request (body read included), in ms."""
    start = time.perf_counter()
    r = client.request(method, url, **kw)
    ms = (time.perf_counter() - start) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{method} {url}: HTTP {r.status_code} {r.text[:500]}")
    return ms


def parse_ts(value: str) -> datetime:
    """API timestamp -> naive UTC datetime (naive ones are already UTC)."""
    ts = datetime.fromisoformat(value)
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds between two API timestamps (None when one is missing)."""
    if start is None or end is None:
        return None
    return (parse_ts(end) - parse_ts(start)).total_seconds()


def jpeg_bytes(img: PILImage.Image, quality: int = 90) -> bytes:
    """Encode an image as JPEG."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------- the server process


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vm_kib(pid: int, name: str) -> int | None:
    """A ``Vm*`` field of /proc/<pid>/status in KiB (None if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (from /proc/*/stat)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def mem_mib(pid: int) -> Json:
    """Peak (VmHWM) and current (VmRSS) resident memory of one process, in MiB."""
    hwm, rss = vm_kib(pid, "VmHWM"), vm_kib(pid, "VmRSS")
    return {"pid": pid, "peak_mib": hwm / 1024 if hwm else None,
            "rss_mib": rss / 1024 if rss else None}


@dataclass
class Server:
    """A running ``python -m service.cli serve`` process group."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def tail(self, n: int = 6000) -> str:
        """The end of the combined API + worker log."""
        return self.log_path.read_text(errors="replace")[-n:]

    def memory(self) -> Json:
        """Peak/current RSS of the API process, the worker and the worker's pool processes."""
        workers = child_pids(self.proc.pid)
        return {"api": mem_mib(self.proc.pid),
                "worker": [mem_mib(w) for w in workers],
                "worker_pool": [mem_mib(c) for w in workers for c in child_pids(w)]}

    def stop(self) -> None:
        """SIGTERM ``serve``, then its worker (``serve`` may leave it), then SIGKILL the rest."""
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        workers = child_pids(self.proc.pid)
        with suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=45)
        for pid in workers:  # orphaned when ``serve`` died before stopping it
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with suppress(TimeoutError):
            wait_for(lambda: not group_alive(pgid), 30, 0.2, "worker processes to exit")
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def server_env(data_dir: Path, admin_key: str,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without PRELABEL_*, plus the benchmark's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRELABEL_")}
    env.update(PRELABEL_DATA_DIR=str(data_dir), PRELABEL_ADMIN_KEY=admin_key,
               PRELABEL_DEVICE="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


@contextmanager
def running_server(data_dir: Path, admin_key: str,
                   extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start ``serve`` (API + embedded worker) the way a user does; always stop it."""
    port = free_port()
    log_path = data_dir.parent / "server.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=REPO,
            env=server_env(data_dir, admin_key, extra_env), stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        yield server
    except Exception:
        print(f"--- server log (tail) ---\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()


def wait_ready(server: Server, client: httpx.Client, timeout: float = 240) -> float:
    """Wait for /readyz 200 and the worker's ' ready.' log line; returns seconds."""
    def ready() -> bool:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}")
        try:
            ok = client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False
        return ok and " ready." in server.tail(200_000)

    return wait_for(ready, timeout, 0.2, "the API (/readyz) and the worker")


# ---------------------------------------------------------------- data


VARIANTS: tuple[tuple[str, Callable[[PILImage.Image], PILImage.Image]], ...] = (
    ("mirror", ImageOps.mirror),
    ("rot+3", lambda im: im.rotate(3, PILImage.Resampling.BILINEAR)),
    ("rot-3", lambda im: im.rotate(-3, PILImage.Resampling.BILINEAR)),
    ("bright115", lambda im: ImageEnhance.Brightness(im).enhance(1.15)),
    ("bright85", lambda im: ImageEnhance.Brightness(im).enhance(0.85)),
    ("mirror-rot+6", lambda im: ImageOps.mirror(im).rotate(6, PILImage.Resampling.BILINEAR)),
)


@dataclass
class Cards:
    """Card crops: the 5-per-class labeling set, the other crops, and the test crops."""

    labeled: list[Sample]
    others: list[Sample]
    test: list[Sample]


def load_cards(per_class: int) -> Cards:
    """All train+test crops; the first ``per_class`` train crops of each rank get labeled."""
    train, test = card_crops("train"), card_crops("test")
    groups = {rank: [s for s in train if s.labels[0] == rank][:per_class] for rank in RANKS}
    # round robin over ranks: every rank reaches the minimum only with the very last label
    labeled = [groups[rank][k] for k in range(per_class) for rank in RANKS]
    chosen = {s.name for s in labeled}
    others = [s for s in train if s.name not in chosen]
    return Cards(labeled=labeled, others=others + test, test=test)


def build_pool(cards: Cards, n: int) -> list[Sample]:
    """``n`` distinct JPEGs: labeling crops first, the other crops, then variants of crops."""
    pool: list[Sample] = []
    seen: set[str] = set()

    def add(sample: Sample) -> None:
        digest = sha256_hex(sample.data)
        if digest not in seen and len(pool) < n:
            seen.add(digest)
            pool.append(sample)

    for s in cards.labeled + cards.others:
        add(s)
    base = cards.labeled + cards.others
    for tag, fn in VARIANTS:
        for s in base:
            if len(pool) >= n:
                return pool
            img = PILImage.open(io.BytesIO(s.data)).convert("RGB")
            add(Sample(f"{Path(s.name).stem}_{tag}.jpg", jpeg_bytes(fn(img)), s.labels))
    if len(pool) < n:
        raise ValueError(f"--pool {n} is more than the {len(pool)} distinct images available")
    return pool


def bccd_files(limit: int | None = None) -> list[Sample]:
    """The 640x480 BCCD JPEGs, in a stable order."""
    return [Sample(p.name, p.read_bytes(), ()) for p in sorted(BCCD.glob("*.jpg"))[:limit]]


# ---------------------------------------------------------------- API steps


def create_project(client: httpx.Client, name: str, classes: Sequence[str]) -> int:
    """A multiclass project; returns its id."""
    body = call(client, "POST", "/api/v1/projects", 201,
                json={"name": name, "task": "multiclass", "classes": list(classes)})
    return int(body["id"])


def upload(client: httpx.Client, pid: int, samples: Sequence[Sample], batch: int) -> list[int]:
    """Upload in multipart batches; returns the new image ids in order."""
    ids: list[int] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        files = [("files", (s.name, s.data, "image/jpeg")) for s in chunk]
        body = call(client, "POST", f"/api/v1/projects/{pid}/images", 201, files=files)
        if body["errors"] or any(i["duplicate"] for i in body["images"]):
            raise RuntimeError(f"upload problems: {body['errors'] or 'duplicates'}")
        ids += [int(i["id"]) for i in body["images"]]
    return ids


def upload_and_embed(client: httpx.Client, pid: int, samples: Sequence[Sample],
                     cfg: Config) -> tuple[list[int], Json]:
    """Upload, then wait until the worker embedded every image (stats ``embedded``)."""
    start = time.perf_counter()
    ids = upload(client, pid, samples, cfg.upload_batch)
    uploaded = time.perf_counter() - start

    def embedded() -> bool:
        stats = call(client, "GET", f"/api/v1/projects/{pid}/stats")
        return bool(stats["embedded"] == stats["images"] == len(ids))

    wait_for(embedded, 1800, 0.1, f"{len(ids)} embeddings")
    total = time.perf_counter() - start
    return ids, {"images": len(ids), "upload_s": uploaded, "upload_to_embedded_s": total,
                 "images_per_s": len(ids) / total}


def label_to_suggestions(client: httpx.Client, pid: int, labels: Sequence[tuple[int, str]],
                         probe: int) -> Json:
    """Label every image; time from the last label's response to the first suggestion."""
    for iid, rank in labels:
        call(client, "POST", f"/api/v1/images/{iid}/annotations", 201, json={"tags": [rank]})

    def served() -> bool:
        r = client.get(f"/api/v1/images/{probe}/suggestions")
        if r.status_code not in (200, 409):
            raise RuntimeError(f"suggestions: HTTP {r.status_code} {r.text[:300]}")
        return r.status_code == 200

    # the clock starts right after the last label's response has returned
    elapsed = wait_for(served, 600, 0.05, "the first suggestion (did the labels queue a run?)")
    run = wait_run(client, pid)
    return {"labels": len(labels), "seconds": elapsed, "model": model_summary(client, pid),
            "run_status": run["status"], "run_trigger": run["trigger"],
            "run_labels_seen": run["labels_seen"],
            "run_created_to_finished_s": seconds_between(run["created_at"], run["finished_at"]),
            "run_queue_wait_s": seconds_between(run["created_at"], run["started_at"]),
            "run_started_to_finished_s": seconds_between(run["started_at"],
                                                         run["finished_at"])}


def wait_run(client: httpx.Client, pid: int, timeout: float = 1800) -> Json:
    """The project's newest run once it has ended."""
    runs: list[Json] = []

    def ended() -> bool:
        nonlocal runs
        runs = call(client, "GET", f"/api/v1/projects/{pid}/training-runs")
        return bool(runs) and runs[0]["status"] in TERMINAL

    wait_for(ended, timeout, 0.2, "the training run")
    if runs[0]["status"] != "SUCCEEDED":
        raise RuntimeError(f"training run did not succeed: {runs[0]}")
    return runs[0]


def http_floor(client: httpx.Client, iid: int, calls: int) -> Json:
    """Per-request floor: /healthz (no auth, no DB) and an authenticated image GET."""
    return {"healthz_ms": stats_ms([timed_ms(client, "GET", "/healthz") for _ in range(calls)]),
            "image_get_ms": stats_ms([timed_ms(client, "GET", f"/api/v1/images/{iid}")
                                      for _ in range(calls)])}


def stored_latency(client: httpx.Client, ids: Sequence[int]) -> Json:
    """GET suggestions per image: first call (computed, stored), then a repeated call."""
    first = [timed_ms(client, "GET", f"/api/v1/images/{i}/suggestions") for i in ids]
    again = [timed_ms(client, "GET", f"/api/v1/images/{i}/suggestions") for i in ids]
    return {"first_ms": stats_ms(first), "repeat_ms": stats_ms(again)}


def predict_latency(client: httpx.Client, pid: int, samples: Sequence[Sample],
                    cfg: Config, views: bool = False) -> Json:
    """POST predict with uploaded files, cycling through ``samples`` after warm-up calls
    (``views``: averaged over the model's prediction views)."""
    url = f"/api/v1/projects/{pid}/predict" + ("?views=true" if views else "")

    def one(s: Sample) -> float:
        return timed_ms(client, "POST", url, files={"file": (s.name, s.data, "image/jpeg")})

    for s in samples[:cfg.predict_warmup]:
        one(s)
    times = [one(samples[n % len(samples)]) for n in range(cfg.predict_calls)]
    return {"files": min(len(samples), cfg.predict_calls), "ms": stats_ms(times)}


def batch_throughput(client: httpx.Client, pid: int, ids: Sequence[int], size: int,
                     batches: int) -> Json:
    """Batch suggestions over fresh ids in ``batches`` chunks of up to ``size``; images/s."""
    rates, sizes = [], []
    for n in range(batches):
        chunk = list(ids[n * size:(n + 1) * size])
        if not chunk:
            break
        ms = timed_ms(client, "POST", f"/api/v1/projects/{pid}/suggestions",
                      json={"image_ids": chunk})
        rates.append(len(chunk) / (ms / 1000))
        sizes.append(len(chunk))
    return {"batch_sizes": sizes, "images_per_s": rates,
            "median_images_per_s": statistics.median(rates) if rates else None}


# ---------------------------------------------------------------- in-process measurements


def make_settings(data_dir: Path) -> Settings:
    """Settings matching the server's (explicit values win over the environment)."""
    return Settings(data_dir=data_dir, database_url="", broker_url="", storage_dir=None,
                    cache_dir=None, device="cpu")


def worker_ctx(settings: Settings) -> WorkerContext:
    """A worker context on the benchmark's data dir (like ``worker_context()``)."""
    return WorkerContext(settings=settings, sessions=sessionmaker_for(settings.db_url),
                         blobs=LocalBlobStore(settings.blob_dir))


def project_images(settings: Settings, pid: int) -> list[Image]:
    """A project's Image rows, read from the server's database."""
    with sessionmaker_for(settings.db_url)() as session:
        return list(session.scalars(select(Image).where(Image.project_id == pid)
                                    .order_by(Image.id)))


def embed_in_process(settings: Settings, images: Sequence[Image], slots: int,
                     views: Sequence[str] = ()) -> Json:
    """Time ``embed_views`` (each image, and its ``views`` from the same decode) in ``slots``
    worker contexts at once (threads), after warm-up; images/s counts images, not passes.

    Each context sizes its ONNX threads like a worker process does (cores / concurrency), so
    ``slots = worker_concurrency`` is the worker's whole-machine layout and 1 is one slot.
    """
    contexts = [worker_ctx(settings) for _ in range(slots)]
    jobs = [(im, (None, *views)) for im in images]
    parts = [jobs[n::slots] for n in range(slots)]
    for ctx, part in zip(contexts, parts, strict=True):
        embed_views(ctx, part[:32])
    start = time.perf_counter()
    with ThreadPoolExecutor(slots) as pool:
        done = sum(len(v) for v in pool.map(embed_views, contexts, parts))
    seconds = time.perf_counter() - start
    if done != len(images) * (1 + len(views)):
        raise RuntimeError(f"embedded {done} of {len(images)} images x {1 + len(views)}")
    return {"images": len(images), "slots": slots, "seconds": seconds,
            "images_per_s": len(images) / seconds}


def torch_eager_baseline(samples: Sequence[Sample]) -> Json:
    """One image per call: PIL decode, torchvision resize/normalize, timm backbone, head."""
    backbone, head = load_backbone(), torch.nn.Linear(EMBED_DIM, len(RANKS)).eval()
    prep = transforms.Compose([transforms.Resize((INPUT_SIZE, INPUT_SIZE)),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def once(data: bytes) -> np.ndarray:
        img = PILImage.open(io.BytesIO(data)).convert("RGB")
        with torch.inference_mode():
            probs = torch.softmax(head(backbone(prep(img).unsqueeze(0))), dim=1)
        return probs.numpy()

    for s in samples[:3]:
        once(s.data)
    times = []
    for s in samples:
        start = time.perf_counter()
        once(s.data)
        times.append((time.perf_counter() - start) * 1000)
    return {"ms": stats_ms(times), "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------- big project


def tiny_jpegs(n: int, rng: np.random.Generator) -> list[bytes]:
    """``n`` distinct small noise JPEGs."""
    out, seen = [], set()
    while len(out) < n:
        data = jpeg_bytes(PILImage.fromarray(rng.integers(0, 256, (24, 32, 3), np.uint8)))
        if (digest := sha256_hex(data)) not in seen:
            seen.add(digest)
            out.append(data)
    return out


def big_label_tags(n_labels: int, few: int = 10) -> list[str]:
    """Labels for the big project: the last rank gets only ``few``, the others share the rest.

    The rarest class stays below the fine-tuning minimum (15 per class), so the run takes the
    frozen-backbone path and the step measures the API, not CPU fine-tuning.
    """
    few = min(few, n_labels // len(RANKS))
    rest = [RANKS[i % (len(RANKS) - 1)] for i in range(n_labels - few)]
    return rest + [RANKS[-1]] * few


def insert_big_project(settings: Settings, pid: int, n: int, n_labels: int) -> Json:
    """Insert images (+ blobs), random embeddings and labels directly into the server's DB."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    blobs, jpegs = LocalBlobStore(settings.blob_dir), tiny_jpegs(n, rng)
    shas = [sha256_hex(d) for d in jpegs]

    def put(sha: str, data: bytes) -> None:
        blobs.put(image_key(sha), data)

    with ThreadPoolExecutor(8) as pool:  # each put fsyncs: overlap them
        list(pool.map(put, shas, jpegs))
    with sessionmaker_for(settings.db_url)() as session:
        session.execute(insert(Image), [
            {"project_id": pid, "sha256": sha, "storage_key": image_key(sha),
             "filename": f"big_{i:06d}.jpg", "format": "jpeg", "size_bytes": len(data),
             "width": 32, "height": 24, "labeled": i < n_labels}
            for i, (sha, data) in enumerate(zip(shas, jpegs, strict=True))])
        ids = dict(session.execute(select(Image.sha256, Image.id)
                                   .where(Image.project_id == pid)).all())
        bid = backbone_id()
        session.execute(insert(Embedding), [
            {"image_id": ids[sha], "backbone": bid,
             "vector": rng.standard_normal(EMBED_DIM, dtype=np.float32).tobytes()}
            for sha in shas])
        session.execute(insert(Annotation), [
            {"project_id": pid, "image_id": ids[sha], "tags": [tag], "source": "manual",
             "is_current": True}
            for sha, tag in zip(shas, big_label_tags(n_labels), strict=False)])
        session.commit()
    return {"images": n, "labeled": n_labels, "seconds": time.perf_counter() - start,
            "how": "rows inserted directly with SQLAlchemy into the server's SQLite DB "
                   "(small JPEG blobs, random float32 embeddings, labels skewed so that one "
                   "class has 10 and the run skips fine-tuning), not uploaded"}


def model_summary(client: httpx.Client, pid: int) -> Json:
    """Kind, promotion and fine-tuning report of the project's newest model."""
    newest = call(client, "GET", f"/api/v1/projects/{pid}/models")[0]
    return {"version": newest["version"], "kind": newest["kind"], "promoted": newest["promoted"],
            "finetune": newest["metrics"].get("finetune")}


def list_all_pages(client: httpx.Client, pid: int) -> Json:
    """Every page of ``order=uncertainty`` (limit 500)."""
    times, count, cursor = [], 0, None
    while True:
        params: dict[str, Any] = {"order": "uncertainty", "limit": 500}
        if cursor:
            params["cursor"] = cursor
        start = time.perf_counter()
        page = call(client, "GET", f"/api/v1/projects/{pid}/images", params=params)
        times.append((time.perf_counter() - start) * 1000)
        count += len(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return {"pages": len(times), "items": count, "total_s": sum(times) / 1000,
                    "page_ms": stats_ms(times)}


def scored(client: httpx.Client, pid: int) -> bool:
    """Whether the worker stored uncertainties (first item of the uncertainty order)."""
    page = call(client, "GET", f"/api/v1/projects/{pid}/images",
                params={"order": "uncertainty", "status": "unlabeled", "limit": 1})
    return bool(page["items"]) and page["items"][0]["uncertainty"] is not None


def big_project(client: httpx.Client, server: Server, settings: Settings, cfg: Config) -> Json:
    """Train on a large inserted project, exercise the API on it; memory before and after."""
    pid = create_project(client, "big", RANKS)
    n_labels = min(cfg.big_labels, cfg.big // 2)
    out: Json = {"insert": insert_big_project(settings, pid, cfg.big, n_labels)}
    log(f"big: inserted {cfg.big} rows directly into the DB")
    out["memory_before"] = server.memory()
    call(client, "POST", f"/api/v1/projects/{pid}/training-runs", 201)
    run = wait_run(client, pid)
    out["run_started_to_finished_s"] = seconds_between(run["started_at"], run["finished_at"])
    out["model"] = model_summary(client, pid)
    out["scored_wait_s"] = wait_for(lambda: scored(client, pid), 600, 0.2, "uncertainty scores")
    log("big: trained and scored; exercising the API")
    out["list_uncertainty"] = list_all_pages(client, pid)
    unlabeled = unlabeled_ids(settings, pid)
    n_batch = min(cfg.big_batch_images, len(unlabeled) - cfg.big_single_calls)
    batch = batch_throughput(client, pid, unlabeled[:n_batch], 256, math.ceil(n_batch / 256))
    out["batch_suggestions"] = batch | {"images": n_batch}
    out["stats_ms"] = timed_ms(client, "GET", f"/api/v1/projects/{pid}/stats")
    singles = unlabeled[n_batch:n_batch + cfg.big_single_calls]
    out["single_suggestions_ms"] = stats_ms(
        [timed_ms(client, "GET", f"/api/v1/images/{i}/suggestions") for i in singles])
    out["memory_after"] = server.memory()
    return out


def unlabeled_ids(settings: Settings, pid: int) -> list[int]:
    """A project's unlabeled image ids (read from the DB: the API pages would do too)."""
    with sessionmaker_for(settings.db_url)() as session:
        return list(session.scalars(select(Image.id).where(
            Image.project_id == pid, Image.labeled.is_(False)).order_by(Image.id)))


# ---------------------------------------------------------------- report


@dataclass
class Report:
    """Results, notes and the summary rows."""

    results: Json = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def row(self, metric: str, value: float | None, unit: str, target: str = "",
            met: bool | None = None) -> None:
        """Add a summary row (value formatted, target shown next to it)."""
        shown = "n/a" if value is None else f"{value:,.2f} {unit}".strip()
        verdict = "" if met is None else ("yes" if met else "NO")
        self.rows.append((metric, shown, target, verdict))


def summarize(rep: Report) -> None:
    """Fill the summary rows from the results, with the targets."""
    r = rep.results
    stored = r["stored_suggestions"]
    up, crop = r["predict_uploaded_bccd"]["ms"], r["predict_uploaded_crop"]["ms"]
    emb, l2s, base = r["embedding_in_process"], r["label_to_suggestions"], r["baseline"]["ms"]
    big = r["big_project"]
    api_peak = big["memory_after"]["api"]["peak_mib"]
    sp_stored, sp_crop = base["p50"] / stored["first_ms"]["p50"], base["p50"] / crop["p50"]
    r["speedup"] = {"baseline_p50_over_stored_first_p50": sp_stored,
                    "baseline_p50_over_uploaded_crop_p50": sp_crop}
    rep.row("label-to-suggestions (30th label -> first 200)", l2s["seconds"], "s", "<= 10 s",
            l2s["seconds"] <= 10)
    rep.row("  training run (created -> finished)", l2s["run_created_to_finished_s"], "s")
    rep.row("  of which queued (created -> started)", l2s["run_queue_wait_s"], "s")
    floor = r["http_floor"]
    rep.row("HTTP floor: GET /healthz p50 (no auth, no DB)", floor["healthz_ms"]["p50"], "ms")
    rep.row("HTTP floor: GET /images/{id} p50 (auth + 1 query)", floor["image_get_ms"]["p50"],
            "ms")
    rep.row("stored suggestion, first call p50", stored["first_ms"]["p50"], "ms", "<= 10 ms",
            stored["first_ms"]["p50"] <= 10)
    rep.row("stored suggestion, first call p95", stored["first_ms"]["p95"], "ms")
    rep.row("stored suggestion, repeated call p50", stored["repeat_ms"]["p50"], "ms")
    rep.row("stored suggestion, repeated call p95", stored["repeat_ms"]["p95"], "ms")
    rep.row("uploaded 640x480 JPEG p50", up["p50"], "ms", "<= 40 ms", up["p50"] <= 40)
    rep.row("uploaded 640x480 JPEG p95", up["p95"], "ms")
    rep.row("uploaded card crop p50", crop["p50"], "ms", "<= 40 ms", crop["p50"] <= 40)
    rep.row("uploaded card crop, views=true, p50",
            r["predict_uploaded_crop_views"]["ms"]["p50"], "ms")
    rep.row("batch suggestions (median)", r["batch_suggestions"]["median_images_per_s"],
            "img/s")
    rep.row(f"embedding 640x480, in-process embed_arrays, {emb['slots']} worker slots",
            emb["images_per_s"], "img/s", ">= 80 img/s", emb["images_per_s"] >= 80)
    rep.row("embedding 640x480, in-process embed_arrays, 1 worker slot",
            r["embedding_in_process_one_slot"]["images_per_s"], "img/s")
    rep.row("embedding 640x480 + its 4 prediction views (5 passes), "
            f"{r['embedding_in_process_views']['slots']} worker slots",
            r["embedding_in_process_views"]["images_per_s"], "img/s")
    rep.row("embedding 640x480 (+ 4 prediction views), through the worker",
            r["worker_embed_bccd"]["images_per_s"], "img/s")
    rep.row("embedding pool crops (+ 4 prediction views), through the worker",
            r["worker_embed_pool"]["images_per_s"], "img/s")
    rep.row("PyTorch eager baseline p50 (1 crop/call)", base["p50"], "ms")
    rep.row("speedup vs eager: stored first call", sp_stored, "x", ">= 3x", sp_stored >= 3)
    rep.row("speedup vs eager: uploaded crop", sp_crop, "x", ">= 3x", sp_crop >= 3)
    rep.row("API peak RSS (VmHWM) when ready, idle", r["memory_idle"]["api"]["peak_mib"], "MiB")
    rep.row("API peak RSS (VmHWM) before the big project",
            big["memory_before"]["api"]["peak_mib"], "MiB")
    rep.row(f"API peak RSS (VmHWM) after {big['insert']['images']:,}-image project",
            api_peak, "MiB", "<= 1024 MiB", api_peak is not None and api_peak <= 1024)
    worker_peaks = [p["peak_mib"] or 0 for p in big["memory_after"]["worker"]
                    + big["memory_after"]["worker_pool"]]
    rep.row("worker peak RSS (largest of main + pool)", max(worker_peaks, default=None),
            "MiB")


def markdown(rep: Report) -> str:
    """The summary as a Markdown document."""
    meta = rep.results["meta"]
    lines = [f"# prelabel core-loop benchmark{' (QUICK smoke run)' if meta['quick'] else ''}",
             "", f"{meta['timestamp']} · {meta['machine']['cpu_model']} · "
             f"{meta['machine']['cpu_count']} CPUs · torch {meta['machine']['torch']} · "
             f"onnxruntime {meta['machine']['onnxruntime']} · pool {meta['config']['pool']}, "
             f"big {meta['config']['big']}", "",
             f"Load average at start {_loads(meta['machine']['loadavg_at_start'])}, at end "
             f"{_loads(meta.get('loadavg_at_end'))}; CPU steal during the run "
             f"{meta.get('cpu_steal_s_during_run', 0):.1f} s; wall {meta.get('wall_s', 0):.0f} s.",
             "",
             "| Metric | Value | Target | Met |", "|---|---:|---|---|"]
    lines += [f"| {m} | {v} | {t} | {ok} |" for m, v, t, ok in rep.rows]
    lines += ["", *[f"- {n}" for n in rep.notes], ""]
    return "\n".join(lines)


def _loads(values: Sequence[float] | None) -> str:
    return "n/a" if values is None else " / ".join(f"{v:.2f}" for v in values)


def write_outputs(rep: Report) -> None:
    """Write the JSON and Markdown results atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    rep.results["summary"] = [dict(zip(("metric", "value", "target", "met"), r, strict=True))
                              for r in rep.rows]
    rep.results["notes"] = rep.notes
    for name, text in (("core_loop.json", json.dumps(rep.results, indent=2, default=str)),
                       ("core_loop.md", markdown(rep))):
        tmp = RESULTS / f"{name}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, RESULTS / name)


def cpu_steal_s() -> float:
    """CPU time stolen by the hypervisor since boot, all CPUs (a noise indicator)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def machine_info() -> Json:
    """CPU, memory and library versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")), platform.processor())
    mem_kib = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                    if ln.startswith("MemTotal:")), 0)
    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu_model": model, "mem_total_gib": mem_kib / 2**20, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
            "ort_providers": ort.get_available_providers(), "loadavg_at_start": os.getloadavg()}


# ---------------------------------------------------------------- the run


def measure(cfg: Config, data_dir: Path, rep: Report) -> None:
    """Every step against one server; results go into ``rep``."""
    r = rep.results
    log("loading card crops and BCCD photos")
    cards = load_cards(cfg.labels_per_class)
    pool, bccd = build_pool(cards, cfg.pool), bccd_files()
    settings = make_settings(data_dir)
    start = time.perf_counter()
    worker_ctx(settings).backbone_path()
    r["backbone_export_s"] = time.perf_counter() - start
    rep.notes.append(f"The one-off backbone ONNX export ({r['backbone_export_s']:.1f} s) ran "
                     "before the server started and is excluded from every other figure.")
    key = "pl_bench_" + secrets.token_urlsafe(32)
    with running_server(data_dir, key) as server, httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(600)) as client:
        r["server_start_s"] = wait_ready(server, client)
        r["memory_idle"] = server.memory()
        log(f"server ready in {r['server_start_s']:.1f}s at {server.url}")
        measure_server(cfg, client, server, settings, pool, cards, bccd, rep)


def measure_server(cfg: Config, client: httpx.Client, server: Server, settings: Settings,
                   pool: list[Sample], cards: Cards, bccd: list[Sample],
                   rep: Report) -> None:
    """Everything measured against the running server, in order."""
    r = rep.results
    pid = create_project(client, "cards", RANKS)
    ids, r["worker_embed_pool"] = upload_and_embed(client, pid, pool, cfg)
    log(f"pool: {len(ids)} images, embedded after "
        f"{r['worker_embed_pool']['upload_to_embedded_s']:.1f}s")
    by_sha = {sha256_hex(s.data): i for s, i in zip(pool, ids, strict=True)}
    labels = [(by_sha[sha256_hex(s.data)], s.labels[0]) for s in cards.labeled]
    labeled_ids = {i for i, _ in labels}
    unlabeled = [i for i in ids if i not in labeled_ids]
    random.Random(0).shuffle(unlabeled)
    probe, unlabeled = unlabeled[0], unlabeled[1:]
    r["label_to_suggestions"] = label_to_suggestions(client, pid, labels, probe)
    log(f"label-to-suggestions: {r['label_to_suggestions']['seconds']:.2f}s")

    bccd_pid = create_project(client, "bccd", ["cell"])
    _, r["worker_embed_bccd"] = upload_and_embed(client, bccd_pid, bccd[:cfg.bccd_images], cfg)
    log(f"bccd: {r['worker_embed_bccd']['images_per_s']:.1f} img/s through the worker")

    r["http_floor"] = http_floor(client, probe, cfg.floor_calls)
    stored, rest = unlabeled[:cfg.stored_calls], unlabeled[cfg.stored_calls:]
    r["stored_suggestions"] = stored_latency(client, stored)
    log("stored-image suggestions measured")
    r["predict_uploaded_bccd"] = predict_latency(client, pid, bccd[:50], cfg)
    r["predict_uploaded_crop"] = predict_latency(client, pid, cards.test[:50], cfg)
    r["predict_uploaded_crop_views"] = predict_latency(client, pid, cards.test[:50], cfg,
                                                       views=True)
    log("uploaded-image predictions measured")
    r["batch_suggestions"] = batch_throughput(client, pid, rest, cfg.batch_size, cfg.batches)
    if sum(r["batch_suggestions"]["batch_sizes"]) < cfg.batch_size * cfg.batches:
        rep.notes.append(f"Batch suggestions: only {len(rest)} unsuggested pool images were "
                         f"left, batch sizes {r['batch_suggestions']['batch_sizes']}.")
    images = project_images(settings, bccd_pid)
    r["embedding_in_process"] = embed_in_process(settings, images,
                                                 settings.worker_concurrency)
    r["embedding_in_process_one_slot"] = embed_in_process(settings, images, 1)
    r["embedding_in_process_views"] = embed_in_process(
        settings, images, settings.worker_concurrency, PREDICTION_VIEWS)
    log(f"in-process embedding: {r['embedding_in_process']['images_per_s']:.1f} img/s")
    r["baseline"] = torch_eager_baseline(cards.test[:cfg.baseline_calls])
    log(f"PyTorch eager baseline p50: {r['baseline']['ms']['p50']:.1f} ms")
    r["big_project"] = big_project(client, server, settings, cfg)
    rep.notes.append(f"Big project: {r['big_project']['insert']['how']}.")
    log("big project measured")


def main() -> int:
    """Parse arguments, run every step, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, help="images in the labeling pool (default 1000)")
    parser.add_argument("--big", type=int, help="images in the large project (default 10000)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    cfg = make_config(parser.parse_args())
    if cfg.pool < 64:
        parser.error("--pool must be at least 64 (30 labels, a probe and images to measure)")
    if cfg.big < 2 * cfg.big_single_calls + 2 * len(RANKS):
        parser.error(f"--big must be at least {2 * cfg.big_single_calls + 2 * len(RANKS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup on SIGTERM too
    rep = Report()
    rep.results["meta"] = {"timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
                           "quick": cfg.quick, "config": asdict(cfg),
                           "machine": machine_info()}
    steal = cpu_steal_s()
    tmp = Path(tempfile.mkdtemp(prefix="prelabel-bench-"))
    try:
        measure(cfg, tmp / "data", rep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rep.results["meta"].update(cpu_steal_s_during_run=cpu_steal_s() - steal,
                               loadavg_at_end=os.getloadavg(),
                               wall_s=time.perf_counter() - _T0)
    summarize(rep)
    write_outputs(rep)
    print("\n" + markdown(rep))
    print(f"results: {RESULTS / 'core_loop.json'} and {RESULTS / 'core_loop.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
