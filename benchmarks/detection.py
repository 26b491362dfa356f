"""Detection benchmark (issue 3): accuracy against labels, training time, serving latency, a peer.

1. The learning curve: FCOS on the pretrained EfficientNet-Lite0 (``models/detector.py``, the
   DetectorConfig defaults of the moment) trained with ``train_detector`` on 25 / 50 / 100 / all
   labeled training images of ``bccd`` and ``cards`` under one fixed time budget per run, early
   stopping on a validation split (bccd: ``val.txt``; cards: every 7th train image), per-class
   score thresholds chosen on that validation split, COCO mAP@.5 and mAP@[.5:.95] on the TEST
   split with ``detection_metrics`` (pycocotools).
2. Serving latency on the CPU through a real ``prelabel serve`` over HTTP: the bccd detector of
   step 1 is exported to ONNX and inserted as a promoted ModelVersion row + artifact blob into the
   server's DB and blob store (the way core_loop's big-project step inserts rows); then
   ``POST /predict`` with uploaded 640x480 JPEGs, ``GET /images/{id}/suggestions`` for stored
   images computed in the request and precomputed by the worker, against PyTorch eager
   (``load_detector`` + ``predict_detections``, one image per call).
3. With ``--peer``: Ultralytics YOLO11n from its YAML (no downloaded weights) on the same labels
   and budget, in a separate Python (``--peer-python``), evaluated by the same COCO evaluator.

It prints a table and writes ``benchmarks/results/<name>.{json,md}``; it never asserts on
timings. Every process it starts is stopped, also on Ctrl-C or error; data lives in a temp dir.

    .venv/bin/python benchmarks/detection.py [--budget 300] [--datasets bccd,cards]
        [--sizes 25,50,100,all] [--device cpu|cuda] [--no-latency] [--quick]
        [--peer --peer-python /tmp/peer-venv/bin/python]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import torch
from PIL import Image as PILImage
from sqlalchemy import func, select

from benchmarks.core_loop import (
    call,
    cpu_steal_s,
    log,
    machine_info,
    make_settings,
    running_server,
    stats_ms,
    timed_ms,
    wait_for,
    wait_ready,
    worker_ctx,
)
from models.backbone import backbone_id
from models.box_classifier import (
    BoxClassifier,
    crop_stage_reserve,
    fit_box_classifier,
    rescore_detections,
)
from models.detection_data import load_voc_samples
from models.detection_eval import choose_score_thresholds, detection_metrics
from models.detection_export import export_detector_onnx
from models.detection_train import DetectorTrainResult, TrainConfig, train_detector
from models.detection_types import Detections, DetectionSample
from models.detector import DetectorConfig, config_for, load_detector, predict_detections
from models.runtime import OnnxDetector
from service.db import sessionmaker_for
from service.settings import Settings
from service.storage import LocalBlobStore, model_key, sha256_hex
from service.tables import ModelVersion, Suggestion, TrainingRun, utcnow
from tests.conftest import DATASETS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BCCD_CLASSES = ("RBC", "WBC", "Platelets")
CARD_CLASSES = ("ace", "king", "queen", "jack", "ten", "nine")
CARDS_VAL_EVERY = 7  # cards has no val list: every 7th train image (sorted by name) validates
DEFAULT_PEER_PYTHON = "/tmp/peer-venv/bin/python"
CPU_DEFAULT_THREADS = torch.get_num_threads()  # torch's default at import (one per core)
Json = dict[str, Any]


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    """What one run does (full or ``--quick``)."""

    quick: bool
    name: str
    datasets: tuple[str, ...]
    sizes: tuple[str, ...]  # numbers or "all"
    budget_s: float
    device: str
    threads: int | None  # CPU intra-op threads while training (None: torch's default)
    max_epochs: int
    seed: int
    eval_limit: int | None  # val/test images used (None: all; --quick uses a few)
    latency: bool
    latency_calls: int
    stored_images: int
    precomputed_images: int
    peer: bool
    peer_python: str
    peer_datasets: tuple[str, ...]
    peer_sizes: tuple[str, ...]
    peer_imgsz: int
    peer_batch: int
    peer_workers: int
    predict_warmup: int = 3


def parse_list(text: str) -> tuple[str, ...]:
    """``a,b,c`` -> ("a", "b", "c") without blanks."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def make_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    """Flags -> Config; ``--quick`` shrinks every default it is not told otherwise."""
    quick = bool(args.quick)
    datasets = parse_list(args.datasets)
    sizes = parse_list(args.sizes or ("25" if quick else "25,50,100,all"))
    for d in datasets:
        if d not in ("bccd", "cards"):
            parser.error(f"unknown dataset {d!r} (bccd, cards)")
    for s in sizes:
        if s != "all" and not (s.isdigit() and int(s) > 0):
            parser.error(f"--sizes takes positive numbers or 'all', got {s!r}")
    peer_sizes = parse_list(args.peer_sizes) if args.peer_sizes else (
        (max(sizes, key=size_rank),) if sizes else ("all",))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else None)
    return Config(
        quick=quick, name=args.name or ("detection_quick" if quick else "detection"),
        datasets=datasets, sizes=sizes,
        budget_s=args.budget if args.budget is not None else (40.0 if quick else 300.0),
        device=device, threads=threads or None, max_epochs=args.max_epochs, seed=args.seed,
        eval_limit=12 if quick else None, latency=not args.no_latency,
        latency_calls=10 if quick else args.latency_calls,
        stored_images=8 if quick else 72, precomputed_images=8 if quick else 87,
        peer=bool(args.peer), peer_python=args.peer_python,
        peer_datasets=parse_list(args.peer_datasets) if args.peer_datasets else datasets,
        peer_sizes=peer_sizes, peer_imgsz=args.peer_imgsz, peer_batch=args.peer_batch,
        peer_workers=args.peer_workers)


def size_rank(size: str) -> int:
    """Order of a size: numbers by value, "all" last."""
    return 10**9 if size == "all" else int(size)


# ---------------------------------------------------------------- data


@dataclass
class Split:
    """Samples of one split and the names of their image files."""

    names: list[str]
    samples: list[DetectionSample]

    def head(self, n: int | None) -> Split:
        """The first ``n`` (all when None)."""
        return self if n is None else Split(self.names[:n], self.samples[:n])


@dataclass
class Dataset:
    """A VOC dataset split three ways, with the objects its reader skipped."""

    name: str
    classes: tuple[str, ...]
    train: Split  # the pool the labeled subsets are drawn from
    val: Split
    test: Split
    rejected: list[str] = field(default_factory=list)
    split_rule: str = ""


def read_split(xmls: Sequence[Path], classes: Sequence[str], rejected: list[str]) -> Split:
    """VOC files -> samples (images decoded in the frame their boxes refer to)."""
    samples, skipped = load_voc_samples(xmls, classes)
    rejected += [f"{Path(r.file).name} object {r.index} ({r.name}): {r.reason}" for r in skipped]
    return Split([p.stem for p in xmls], samples)


def load_dataset(name: str) -> Dataset:
    """bccd (its ImageSets lists) or cards (train/ minus every 7th for val, test/)."""
    rejected: list[str] = []
    if name == "bccd":
        root = DATASETS / "bccd"

        def listed(split: str) -> list[Path]:
            ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
            return [root / "Annotations" / f"{i}.xml" for i in ids]

        splits = [read_split(listed(s), BCCD_CLASSES, rejected) for s in ("train", "val", "test")]
        rule = "ImageSets/Main train.txt (pool) / val.txt / test.txt"
        classes = BCCD_CLASSES
    else:
        root = DATASETS / "cards"
        train_xml = sorted((root / "train").glob("*.xml"))
        val_xml = train_xml[::CARDS_VAL_EVERY]
        pool_xml = [p for p in train_xml if p not in set(val_xml)]
        test_xml = sorted((root / "test").glob("*.xml"))
        splits = [read_split(x, CARD_CLASSES, rejected) for x in (pool_xml, val_xml, test_xml)]
        rule = (f"train/ sorted by name: every {CARDS_VAL_EVERY}th image (from the first) is "
                "validation, the rest the pool; test/ is the test split")
        classes = CARD_CLASSES
    return Dataset(name, classes, *splits, rejected=rejected, split_rule=rule)


def subset_order(n: int, seed: int) -> list[int]:
    """A seeded shuffle of the pool: every size takes a prefix, so subsets are nested."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def subset(ds: Dataset, size: str, seed: int) -> Split:
    """The first ``size`` images of the pool's seeded order (all of them for "all")."""
    order = subset_order(len(ds.train.samples), seed)
    n = len(order) if size == "all" else min(int(size), len(order))
    idx = order[:n]
    return Split([ds.train.names[i] for i in idx], [ds.train.samples[i] for i in idx])


def boxes_per_class(samples: Sequence[DetectionSample], classes: Sequence[str]) -> Json:
    """Box count of each class."""
    labels = np.concatenate([s.labels for s in samples]) if samples else np.zeros(0, np.int64)
    return {c: int((labels == i).sum()) for i, c in enumerate(classes)}


# ---------------------------------------------------------------- step 1: the learning curve


def detector_config(ds: Dataset, train: Sequence[DetectionSample]) -> DetectorConfig:
    """The config the worker would pick: defaults, anchor sizes from these training boxes."""
    return config_for(train, len(ds.classes))


def train_settings(cfg: Config) -> TrainConfig:
    """TrainConfig defaults except the budget (less the crop stage's share, as in the worker),
    the epoch cap, threads and the seed."""
    return TrainConfig(time_budget_s=cfg.budget_s - crop_stage_reserve(cfg.budget_s),
                       max_epochs=cfg.max_epochs,
                       threads=cfg.threads, seed=cfg.seed)


def timed_predict(model: torch.nn.Module, samples: Sequence[DetectionSample],
                  device: str) -> tuple[list[Detections], float]:
    """Detections (score floor of the config) and seconds, one batch of 8 at a time."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    preds = predict_detections(model, [s.image for s in samples], device)
    if device == "cuda":
        torch.cuda.synchronize()
    return preds, time.perf_counter() - start


def evaluate_predictions(val_preds: Sequence[Detections], test_preds: Sequence[Detections],
                         ds: Dataset, val: Split, test: Split) -> Json:
    """Thresholds chosen on validation; COCO metrics on validation and test."""
    thresholds = choose_score_thresholds(val_preds, val.samples, len(ds.classes))
    test_m = detection_metrics(test_preds, test.samples, list(ds.classes), thresholds)
    val_m = detection_metrics(val_preds, val.samples, list(ds.classes), thresholds)
    return {"thresholds": dict(zip(ds.classes, map(float, thresholds), strict=True)),
            "test": test_m, "val": val_m, "test_pr": mean_pr(test_m)}


def mean_pr(metrics: Json) -> Json:
    """Mean precision / recall / F1 over classes at the chosen thresholds."""
    out: Json = {}
    for key in ("precision", "recall", "f1"):
        vals = [c[key] for c in metrics["per_class"].values() if c.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


class StepClock:
    """Training step timestamps from the ``progress`` callback (one call per step)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, _fraction: float) -> None:
        self.stamps.append(time.perf_counter())

    def step_seconds(self, steps_per_epoch: int, last: int) -> list[float]:
        """Durations of the ``last`` steps (the end-to-end phase) not preceded by a
        validation (epoch ends validate)."""
        gaps = np.diff(self.stamps[-last - 1:]) if last > 0 else []
        return [float(g) for k, g in enumerate(gaps, start=1) if k % steps_per_epoch]


def train_one(ds: Dataset, size: str, cfg: Config) -> tuple[Json, DetectorTrainResult]:
    """Train on one subset, pick thresholds on val, evaluate on test; the figures."""
    train = subset(ds, size, cfg.seed)
    val, test = ds.val.head(cfg.eval_limit), ds.test.head(cfg.eval_limit)
    config, settings = detector_config(ds, train.samples), train_settings(cfg)
    load0 = os.getloadavg()
    clock = StepClock()
    log(f"{ds.name} {size}: training on {len(train.samples)} images, {len(val.samples)} val, "
        f"budget {cfg.budget_s:.0f}s, device {cfg.device}, threads {cfg.threads}")
    result = train_detector(train.samples, val.samples, config, cfg.device, settings,
                            progress=clock)
    steps_per_epoch = max(1, len(train.samples) // settings.batch_size
                          if len(train.samples) > settings.batch_size else 1)
    model = load_detector(result.config, result.state_dict).to(cfg.device)
    val_preds, _ = timed_predict(model, val.samples, cfg.device)
    test_preds, test_s = timed_predict(model, test.samples, cfg.device)
    detector_ev = evaluate_predictions(val_preds, test_preds, ds, val, test)
    # the crop stage, decided on val as in the worker
    crops = fit_box_classifier(train.samples, val.samples, val_preds, len(ds.classes),
                               cfg.device, budget_s=crop_stage_reserve(cfg.budget_s))
    ev = detector_ev
    if crops.classifier is not None:
        start = time.perf_counter()
        test_preds = rescore_detections(test.samples, test_preds, crops.classifier, cfg.device)
        test_s += time.perf_counter() - start
        val_preds = rescore_detections(val.samples, val_preds, crops.classifier, cfg.device)
        ev = evaluate_predictions(val_preds, test_preds, ds, val, test)
    served_ms = onnx_latency(result, crops.classifier, test.samples[:LATENCY_IMAGES])
    finetune_steps = round((result.epochs - result.head_epochs) * steps_per_epoch)
    steps = clock.step_seconds(steps_per_epoch, finetune_steps)
    median_step = float(np.median(steps)) if steps else None
    best = next((h for h in result.history if h.epoch == result.best_epoch), None)
    out: Json = {
        "model": "fcos-lite0", "dataset": ds.name, "size": size,
        "train_images": len(train.samples), "train_boxes": boxes_per_class(train.samples,
                                                                            ds.classes),
        "val_images": len(val.samples), "test_images": len(test.samples),
        "device": result.device, "train_s": result.seconds + crops.seconds,
        "detector_train_s": result.seconds, "epochs": result.epochs,
        "crop_stage": crops.summary(), "detector_map50": detector_ev["test"]["map50"],
        "onnx_ms": served_ms,
        "head_epochs": result.head_epochs, "head_s": result.head_seconds,
        "cached_variants": result.cached_variants,
        "best_epoch": result.best_epoch, "stop_reason": result.stop_reason,
        "best_val_map50_during_training": result.best_map50,
        "time_to_best_s": best.seconds if best else None,
        "steps_per_epoch": steps_per_epoch,
        "median_step_s": median_step,
        "train_s_per_epoch_excl_val": median_step * steps_per_epoch if median_step else None,
        # the end-to-end phase only: head-first epochs are far cheaper
        "wall_s_per_epoch_incl_val": ((result.seconds - result.head_seconds)
                                      / (result.epochs - result.head_epochs)
                                      if result.epochs > result.head_epochs else None),
        "train_images_per_s": settings.batch_size / median_step if median_step else None,
        "test_inference_s_per_image": test_s / max(1, len(test.samples)),
        "map50": ev["test"]["map50"], "map": ev["test"]["map"],
        "val_map50": ev["val"]["map50"], "val_map": ev["val"]["map"],
        "test_mean_precision": ev["test_pr"]["precision"],
        "test_mean_recall": ev["test_pr"]["recall"], "test_mean_f1": ev["test_pr"]["f1"],
        "thresholds": ev["thresholds"], "test_metrics": ev["test"],
        "anchor_sizes": list(result.config.level_sizes), "min_size": result.config.min_size,
        "history": [asdict(h) for h in result.history],
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
    }
    log(f"{ds.name} {size}: test mAP@.5 {fmt(out['map50'])}, mAP {fmt(out['map'])}, "
        f"{result.epochs:.1f} epochs in {result.seconds:.0f}s ({result.stop_reason})")
    return out, result


LATENCY_IMAGES = 20  # test images timed through the exported graphs of each curve row


def onnx_latency(result: DetectorTrainResult, classifier: BoxClassifier | None,
                 samples: Sequence[DetectionSample]) -> Json:
    """onnxruntime ms per test image (one image per call, 2 threads, a warm-up call first)
    of the exported detector, and of the graph with the crop stage when it is used."""
    graphs: dict[str, BoxClassifier | None] = {"detector": None}
    if classifier is not None:
        graphs["with_crop_stage"] = classifier
    out: Json = {}
    with tempfile.TemporaryDirectory(prefix="prelabel-bench-") as tmp:
        for name, stage in graphs.items():
            path = Path(tmp) / f"{name}.onnx"
            export_detector_onnx(result.config, result.state_dict, path, box_classifier=stage)
            runtime = OnnxDetector(path, threads=2)
            runtime.predict(samples[0].image)
            times = []
            for s in samples:
                start = time.perf_counter()
                runtime.predict(s.image)
                times.append((time.perf_counter() - start) * 1000)
            out[name] = stats_ms(times)
    return out


def fmt(v: float | None, digits: int = 3) -> str:
    """A number or n/a."""
    return "n/a" if v is None else f"{v:.{digits}f}"


# ---------------------------------------------------------------- step 3: the peer

PEER_SCRIPT = r'''
import json, os, sys, time
spec = json.load(open(sys.argv[1]))
import torch
from ultralytics import YOLO, settings, __version__
settings.update({"sync": False})
if spec["threads"]:  # ultralytics sets its own thread count when it selects the device
    import ultralytics.utils.torch_utils as torch_utils
    torch_utils.NUM_THREADS = spec["threads"]
model = YOLO("yolo11n.yaml")
start = time.perf_counter()
model.train(data=spec["data"], epochs=spec["epochs"], time=spec["budget_s"] / 3600,
            imgsz=spec["imgsz"], batch=spec["batch"], device=spec["device"],
            pretrained=False, plots=False, amp=False, workers=spec["workers"],
            project=spec["project"], name="run", exist_ok=True, seed=spec["seed"],
            verbose=False)
train_s = time.perf_counter() - start
trainer = model.trainer
weights = trainer.best if os.path.exists(trainer.best) else trainer.last
best = YOLO(str(weights))
out = {"ultralytics": __version__, "torch": torch.__version__,
       "torch_threads": torch.get_num_threads(), "train_s": train_s,
       "epochs_run": int(trainer.epoch) + 1, "epochs_planned": int(trainer.epochs),
       "weights": os.path.basename(str(weights)), "splits": {}}
csv = os.path.join(str(trainer.save_dir), "results.csv")
out["results_csv"] = open(csv).read() if os.path.exists(csv) else None
for split, paths in spec["predict"].items():
    dets, times = [], []
    for p in paths:
        t0 = time.perf_counter()
        r = best.predict(p, conf=0.001, iou=0.7, imgsz=spec["imgsz"], max_det=300,
                         device=spec["device"], verbose=False)[0]
        times.append(time.perf_counter() - t0)
        b = r.boxes
        dets.append({"boxes": b.xyxy.cpu().numpy().tolist(),
                     "scores": b.conf.cpu().numpy().tolist(),
                     "labels": b.cls.cpu().numpy().astype(int).tolist()})
    out["splits"][split] = {"detections": dets, "seconds": times}
json.dump(out, open(spec["out"], "w"))
'''


def write_yolo_split(root: Path, split: str, data: Split) -> list[str]:
    """Images as PNG (the decoded frame, no EXIF) + YOLO label files; returns image paths."""
    img_dir, lab_dir = root / "images" / split, root / "labels" / split
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    paths = []
    for name, s in zip(data.names, data.samples, strict=True):
        h, w = s.image.shape[:2]
        PILImage.fromarray(s.image).save(img_dir / f"{name}.png")
        lines = []
        for (x1, y1, x2, y2), label in zip(s.boxes, s.labels, strict=True):
            lines.append(f"{int(label)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                         f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
        (lab_dir / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        paths.append(str(img_dir / f"{name}.png"))
    return paths


def peer_env(tmp: Path) -> dict[str, str]:
    """Offline, no telemetry, settings and caches inside the temp dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRELABEL_", "YOLO_"))}
    env.update(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(tmp / "yolo-config"),
               YOLO_VERBOSE="True", PYTHONUNBUFFERED="1", MPLBACKEND="Agg",
               HOME=str(tmp / "home"))
    return env


def run_peer(ds: Dataset, size: str, cfg: Config, tmp: Path) -> Json:
    """YOLO11n from its YAML on the same labels and budget; COCO metrics as for ours."""
    train = subset(ds, size, cfg.seed)
    val, test = ds.val.head(cfg.eval_limit), ds.test.head(cfg.eval_limit)
    root = tmp / f"yolo-{ds.name}-{size}"
    write_yolo_split(root, "train", train)
    val_paths = write_yolo_split(root, "val", val)
    test_paths = write_yolo_split(root, "test", test)
    names = "\n".join(f"  {i}: {c}" for i, c in enumerate(ds.classes))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\ntest: images/test\n"
                    f"names:\n{names}\n")
    script, spec_path, out_path = root / "peer.py", root / "spec.json", root / "out.json"
    script.write_text(PEER_SCRIPT)
    device = "0" if cfg.device == "cuda" else "cpu"
    spec = {"data": str(data), "budget_s": cfg.budget_s, "epochs": cfg.max_epochs,
            "imgsz": cfg.peer_imgsz, "batch": cfg.peer_batch, "device": device,
            "workers": cfg.peer_workers, "threads": cfg.threads, "seed": cfg.seed,
            "project": str(root / "runs"), "out": str(out_path),
            "predict": {"val": val_paths, "test": test_paths}}
    spec_path.write_text(json.dumps(spec))
    for d in ("yolo-config", "home"):
        (tmp / d).mkdir(exist_ok=True)
    log(f"peer {ds.name} {size}: YOLO11n from yolo11n.yaml, {len(train.samples)} images, "
        f"budget {cfg.budget_s:.0f}s")
    load0 = os.getloadavg()
    start = time.perf_counter()
    log_path = root / "peer.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen([cfg.peer_python, str(script), str(spec_path)], cwd=root,
                                env=peer_env(tmp), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=cfg.budget_s * 3 + 900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    if rc != 0 or not out_path.exists():
        raise RuntimeError(f"peer failed (rc {rc}):\n{text[-4000:]}")
    res = json.loads(out_path.read_text())
    downloads = [ln for ln in text.splitlines() if "ownload" in ln or (
        "http" in ln and "docs.ultralytics.com" not in ln)]

    def dets(split: str) -> list[Detections]:
        return [Detections(np.asarray(d["boxes"], np.float32).reshape(-1, 4),
                           np.asarray(d["scores"], np.float32),
                           np.asarray(d["labels"], np.int64))
                for d in res["splits"][split]["detections"]]

    ev = evaluate_predictions(dets("val"), dets("test"), ds, val, test)
    test_s = res["splits"]["test"]["seconds"]
    epochs = res["epochs_run"]
    out: Json = {
        "model": "yolo11n-scratch", "dataset": ds.name, "size": size,
        "train_images": len(train.samples), "val_images": len(val.samples),
        "test_images": len(test.samples), "device": cfg.device,
        "train_s": res["train_s"], "epochs": epochs, "epochs_planned": res["epochs_planned"],
        "wall_s_per_epoch_incl_val": res["train_s"] / epochs if epochs else None,
        "stop_reason": "ultralytics time= budget / epochs", "weights_evaluated":
        res["weights"], "subprocess_wall_s": wall,
        "test_inference_s_per_image": float(np.median(test_s[1:] or test_s)),
        "map50": ev["test"]["map50"], "map": ev["test"]["map"],
        "val_map50": ev["val"]["map50"], "val_map": ev["val"]["map"],
        "test_mean_precision": ev["test_pr"]["precision"],
        "test_mean_recall": ev["test_pr"]["recall"], "test_mean_f1": ev["test_pr"]["f1"],
        "thresholds": ev["thresholds"], "test_metrics": ev["test"],
        "ultralytics": res["ultralytics"], "peer_torch": res["torch"],
        "peer_torch_threads": res["torch_threads"], "results_csv": res["results_csv"],
        "download_or_url_lines_in_log": downloads[:20],
        "settings": {k: spec[k] for k in ("imgsz", "batch", "workers", "threads", "epochs")}
        | {"pretrained": False, "plots": False, "amp": False, "time_h": cfg.budget_s / 3600,
           "predict": "conf=0.001 iou=0.7 max_det=300"},
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
    }
    log(f"peer {ds.name} {size}: test mAP@.5 {fmt(out['map50'])}, mAP {fmt(out['map'])}, "
        f"{epochs} epochs in {res['train_s']:.0f}s")
    return out


# ---------------------------------------------------------------- step 2: serving latency


@dataclass
class ServedDetector:
    """A trained bccd detector to serve: weights, ONNX bytes, thresholds and where it came from."""

    config: DetectorConfig
    state_dict: dict[str, torch.Tensor]
    thresholds: list[float]
    origin: str
    metrics: Json


def serving_detector(ds: Dataset, cfg: Config, trained: DetectorTrainResult | None,
                     origin: str) -> ServedDetector:
    """The curve's bccd detector (or a short in-process run when the curve had none)."""
    if trained is None:
        budget = min(cfg.budget_s, 120.0)
        log(f"latency: no bccd detector from the curve; training one for {budget:.0f}s")
        train = subset(ds, "all", cfg.seed)
        trained = train_detector(train.samples, ds.val.head(cfg.eval_limit).samples,
                                 detector_config(ds, train.samples), cfg.device,
                                 TrainConfig(time_budget_s=budget, max_epochs=cfg.max_epochs,
                                             threads=cfg.threads, seed=cfg.seed))
        origin = f"bccd all, trained in-process for {budget:.0f}s for this step"
    model = load_detector(trained.config, trained.state_dict)
    val = ds.val.head(cfg.eval_limit)
    preds = predict_detections(model, [s.image for s in val.samples])
    thresholds = choose_score_thresholds(preds, val.samples, len(ds.classes))
    metrics = detection_metrics(preds, val.samples, list(ds.classes), thresholds)
    metrics.update(task="detection", validation="bccd val.txt (inserted by the benchmark)")
    return ServedDetector(trained.config, trained.state_dict, [float(t) for t in thresholds],
                          origin, metrics)


def insert_detector(settings: Settings, pid: int, classes: Sequence[str], onnx: bytes,
                    det: ServedDetector) -> Json:
    """A SUCCEEDED run + promoted ModelVersion row + the ONNX blob, written directly."""
    start = time.perf_counter()
    blobs = LocalBlobStore(settings.blob_dir)
    with sessionmaker_for(settings.db_url)() as session:
        now = utcnow()
        run = TrainingRun(project_id=pid, status="SUCCEEDED", trigger="manual", progress=1.0,
                          stage="succeeded", device="cpu", started_at=now, finished_at=now)
        session.add(run)
        session.flush()
        key = model_key(pid, run.id, "detector.onnx")
        blobs.put(key, onnx)  # the artifact exists before any row names it
        row = ModelVersion(
            project_id=pid, run_id=run.id, version=1, task="detection", classes=list(classes),
            backbone=backbone_id(), backbone_key=None, backbone_sha256=None, kind="fcos",
            device="cpu", head_key=None, head_sha256=None, pipeline_key=key,
            pipeline_sha256=sha256_hex(onnx), thresholds=det.thresholds, metrics=det.metrics,
            train_image_ids=[], promoted=True,
            promotion_note="inserted by benchmarks/detection.py")
        session.add(row)
        session.flush()
        run.model_id = row.id
        session.commit()
        model_id = row.id
    return {"model_id": model_id, "onnx_bytes": len(onnx), "seconds":
            time.perf_counter() - start,
            "how": "TrainingRun (SUCCEEDED) + promoted ModelVersion rows inserted with "
                   "SQLAlchemy into the server's SQLite DB, the exported ONNX put into its blob "
                   f"store; weights: {det.origin}"}


def upload_named(client: httpx.Client, pid: int, files: Sequence[tuple[str, bytes]]) -> list[int]:
    """Upload (name, JPEG) pairs in batches of 32; the new image ids in order."""
    ids: list[int] = []
    for start in range(0, len(files), 32):
        chunk = files[start:start + 32]
        body = call(client, "POST", f"/api/v1/projects/{pid}/images", 201,
                    files=[("files", (n, d, "image/jpeg")) for n, d in chunk])
        if body["errors"] or any(i["duplicate"] for i in body["images"]):
            raise RuntimeError(f"upload problems: {body['errors'] or 'duplicates'}")
        ids += [int(i["id"]) for i in body["images"]]
    return ids


def suggestion_rows(settings: Settings, ids: Sequence[int]) -> tuple[int, int]:
    """(stored suggestions, of which not yet served) for these images (read from the DB)."""
    with sessionmaker_for(settings.db_url)() as session:
        total = session.scalar(select(func.count()).select_from(Suggestion).where(
            Suggestion.image_id.in_(list(ids)))) or 0
        unserved = session.scalar(select(func.count()).select_from(Suggestion).where(
            Suggestion.image_id.in_(list(ids)), Suggestion.served_at.is_(None))) or 0
    return int(total), int(unserved)


def embedded_count(settings: Settings, ids: Sequence[int]) -> int:
    """How many of these images the worker has embedded."""
    from service.tables import Embedding

    with sessionmaker_for(settings.db_url)() as session:
        return int(session.scalar(select(func.count()).select_from(Embedding).where(
            Embedding.image_id.in_(list(ids)))) or 0)


def decode(data: bytes) -> np.ndarray:
    """JPEG bytes -> RGB uint8 [H,W,3]."""
    return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))


def eager_baseline(det: ServedDetector, files: Sequence[tuple[str, bytes]], calls: int,
                   threads: int) -> Json:
    """PyTorch eager, one image per call: decode + load_detector's model + predict_detections."""
    model = load_detector(det.config, det.state_dict)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)

    def once(data: bytes) -> int:
        return len(predict_detections(model, [decode(data)], "cpu", batch_size=1)[0].scores)

    try:
        for _, data in files[:3]:
            once(data)
        times, boxes = [], []
        for n in range(calls):
            start = time.perf_counter()
            boxes.append(once(files[n % len(files)][1]))
            times.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(previous)
    return {"ms": stats_ms(times), "torch_threads": threads,
            "boxes_over_score_floor_median": float(np.median(boxes)),
            "score_floor": det.config.score_thresh}


def onnx_in_process(onnx: bytes, files: Sequence[tuple[str, bytes]], calls: int) -> Json:
    """The served ONNX graph in this process (onnxruntime's default threads), decode included."""
    detector = OnnxDetector(onnx)
    for _, data in files[:3]:
        detector.predict(decode(data))
    times = []
    for n in range(calls):
        start = time.perf_counter()
        detector.predict(decode(files[n % len(files)][1]))
        times.append((time.perf_counter() - start) * 1000)
    return {"ms": stats_ms(times)}


def latency(ds: Dataset, cfg: Config, det: ServedDetector, tmp: Path) -> Json:
    """Every serving measurement against one real ``prelabel serve``."""
    root = DATASETS / "bccd" / "JPEGImages"
    test_files = [(f"{n}.jpg", (root / f"{n}.jpg").read_bytes()) for n in ds.test.names]
    val_files = [(f"{n}.jpg", (root / f"{n}.jpg").read_bytes()) for n in ds.val.names]
    stored_files = test_files[:cfg.stored_images]
    pre_files = val_files[:cfg.precomputed_images]
    r: Json = {"image_size": list(PILImage.open(io.BytesIO(test_files[0][1])).size)}
    data_dir = tmp / "data"
    settings = make_settings(data_dir)
    start = time.perf_counter()
    worker_ctx(settings).backbone_path()  # the one-off backbone export, outside every figure
    r["backbone_export_s"] = time.perf_counter() - start
    export_start = time.perf_counter()
    onnx_path = tmp / "detector.onnx"
    export_detector_onnx(det.config, det.state_dict, onnx_path)
    onnx = onnx_path.read_bytes()
    r["onnx_export_s"] = time.perf_counter() - export_start
    key = "pl_bench_" + secrets.token_urlsafe(32)
    with running_server(data_dir, key) as server, httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(600)) as client:
        r["server_start_s"] = wait_ready(server, client)
        log(f"latency: server ready in {r['server_start_s']:.1f}s at {server.url}")
        pid = int(call(client, "POST", "/api/v1/projects", 201, json={
            "name": "bccd-detection", "task": "detection", "classes": list(ds.classes)})["id"])
        # A: uploaded before any model exists (embedded only): computed in the GET request
        stored_ids = upload_named(client, pid, stored_files)
        wait_for(lambda: embedded_count(settings, stored_ids) == len(stored_ids), 600, 0.2,
                 "embeddings of the stored images")
        r["insert"] = insert_detector(settings, pid, ds.classes, onnx, det)
        log("latency: detector inserted and promoted")
        r["predict_uploaded"] = predict_uploaded(client, pid, test_files, cfg)
        log(f"latency: POST predict p50 {r['predict_uploaded']['ms']['p50']:.1f} ms")
        before = suggestion_rows(settings, stored_ids)
        first = [timed_ms(client, "GET", f"/api/v1/images/{i}/suggestions") for i in stored_ids]
        again = [timed_ms(client, "GET", f"/api/v1/images/{i}/suggestions") for i in stored_ids]
        r["stored_computed"] = {"images": len(stored_ids),
                                "stored_suggestions_before_first_call": before[0],
                                "first_ms": stats_ms(first), "repeat_ms": stats_ms(again)}
        log(f"latency: stored (computed in request) first p50 {stats_ms(first)['p50']:.1f} ms")
        # B: uploaded after promotion: the worker precomputes their box suggestions
        up_start = time.perf_counter()
        pre_ids = upload_named(client, pid, pre_files)
        wait_for(lambda: suggestion_rows(settings, pre_ids)[0] == len(pre_ids), 1200, 0.2,
                 "the worker's precomputed suggestions")
        precompute_s = time.perf_counter() - up_start
        before = suggestion_rows(settings, pre_ids)
        first = [timed_ms(client, "GET", f"/api/v1/images/{i}/suggestions") for i in pre_ids]
        r["stored_precomputed"] = {
            "images": len(pre_ids), "upload_to_all_precomputed_s": precompute_s,
            "worker_images_per_s": len(pre_ids) / precompute_s,
            "stored_before_first_call": before[0], "unserved_before_first_call": before[1],
            "first_ms": stats_ms(first)}
        log(f"latency: stored (precomputed) first p50 {stats_ms(first)['p50']:.1f} ms")
        r["memory"] = server.memory()
    # torch's default (one thread per core) and one thread: on a busy 2-core machine OpenMP's
    # second thread can make eager several times slower; the faster p50 is the baseline
    r["eager_by_threads"] = {str(t): eager_baseline(det, test_files, cfg.latency_calls, t)
                             for t in dict.fromkeys((CPU_DEFAULT_THREADS, 1))}
    r["eager"] = min(r["eager_by_threads"].values(), key=lambda e: e["ms"]["p50"])
    log("latency: PyTorch eager p50 " + ", ".join(
        f"{e['ms']['p50']:.1f} ms ({t} threads)" for t, e in r["eager_by_threads"].items()))
    r["onnx_in_process"] = onnx_in_process(onnx, test_files, cfg.latency_calls)
    eager = r["eager"]["ms"]["p50"]
    r["ratios"] = {
        "eager_p50_over_predict_p50": eager / r["predict_uploaded"]["ms"]["p50"],
        "eager_p50_over_stored_computed_first_p50": eager / r["stored_computed"]["first_ms"][
            "p50"],
        "eager_p50_over_stored_precomputed_first_p50": eager / r["stored_precomputed"][
            "first_ms"]["p50"],
        "eager_p50_over_onnx_in_process_p50": eager / r["onnx_in_process"]["ms"]["p50"]}
    return r


def predict_uploaded(client: httpx.Client, pid: int, files: Sequence[tuple[str, bytes]],
                     cfg: Config) -> Json:
    """POST predict (multipart ``file``), cycling through the files after warm-up calls."""
    url = f"/api/v1/projects/{pid}/predict"
    boxes: list[int] = []

    def one(name: str, data: bytes) -> float:
        start = time.perf_counter()
        resp = client.post(url, files={"file": (name, data, "image/jpeg")})
        ms = (time.perf_counter() - start) * 1000
        if resp.status_code != 200:
            raise RuntimeError(f"predict: HTTP {resp.status_code} {resp.text[:300]}")
        boxes.append(len(resp.json()["boxes"]))
        return ms

    for name, data in files[:cfg.predict_warmup]:
        one(name, data)
    boxes.clear()
    times = [one(*files[n % len(files)]) for n in range(cfg.latency_calls)]
    return {"files": min(len(files), cfg.latency_calls), "ms": stats_ms(times),
            "boxes_per_answer_median": float(np.median(boxes))}


# ---------------------------------------------------------------- report


def curve_rows(rows: Sequence[Json]) -> list[str]:
    """The accuracy table as Markdown lines."""
    out = ["| dataset | model | labeled train images | test mAP@.5 | test mAP@[.5:.95] | "
           "val mAP@.5 | mean P / R at val thresholds | train s | epochs (stop) | "
           "head-first epochs in s (views) | s/epoch incl. val | train img/s | "
           "crop stage: test mAP@.5 without, val without / with, used; ONNX p50 ms "
           "(detector / with stage) |",
           "|---|---|---:|---:|---:|---:|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        pr = f"{fmt(r['test_mean_precision'], 2)} / {fmt(r['test_mean_recall'], 2)}"
        ips = r.get("train_images_per_s")
        head = (f"{r['head_epochs']:.1f} in {r['head_s']:.0f} ({r['cached_variants']})"
                if r.get("head_epochs") else "n/a")
        out.append(
            f"| {r['dataset']} | {r['model']} | {r['train_images']} ({r['size']}) | "
            f"{fmt(r['map50'])} | {fmt(r['map'])} | {fmt(r['val_map50'])} | {pr} | "
            f"{r['train_s']:.0f} | {r['epochs']:.1f} ({r['stop_reason']}) | {head} | "
            f"{fmt(r['wall_s_per_epoch_incl_val'], 1)} | {fmt(ips, 2)} | {crop_cell(r)} |")
    return out


def crop_cell(r: Json) -> str:
    """The crop stage's figures of one curve row (n/a for the peer)."""
    c = r.get("crop_stage")
    if not c:
        return "n/a"
    used = f"yes ({c['seconds']:.0f}s)" if c["used"] else "no"
    ms = r.get("onnx_ms", {})
    speed = " / ".join(f"{v['p50']:.0f}" for v in ms.values())
    return (f"{fmt(r['detector_map50'])}, {fmt(c['val_map50_detector'])} / "
            f"{fmt(c['val_map50_rescored'])}, {used}; ONNX p50 ms {speed}")


def latency_rows(lat: Json) -> list[str]:
    """The latency table as Markdown lines."""
    def p(d: Json) -> str:
        return f"{d['p50']:.1f} / {d['p95']:.1f}"

    pre = lat["stored_precomputed"]
    sc = lat["stored_computed"]
    return [
        "| what (CPU, one image per call) | p50 / p95 ms |", "|---|---:|",
        f"| POST /predict, uploaded {lat['image_size'][0]}x{lat['image_size'][1]} bccd JPEG "
        f"(computed in the request) | {p(lat['predict_uploaded']['ms'])} |",
        f"| GET suggestions, stored image, first call, computed in the request "
        f"({sc['stored_suggestions_before_first_call']} of {sc['images']} stored before) | "
        f"{p(sc['first_ms'])} |",
        f"| GET suggestions, same images, repeated call (stored) | {p(sc['repeat_ms'])} |",
        f"| GET suggestions, stored image, first call, precomputed by the worker "
        f"({pre['unserved_before_first_call']} of {pre['images']} precomputed before) | "
        f"{p(pre['first_ms'])} |",
        *[f"| PyTorch eager (load_detector + predict_detections, decode included), {t} "
          f"thread{'s' if t != '1' else ''} | {p(e['ms'])} |"
          for t, e in lat["eager_by_threads"].items()],
        f"| ONNX pipeline in-process (onnxruntime, decode included) | "
        f"{p(lat['onnx_in_process']['ms'])} |",
    ]


def markdown(res: Json) -> str:
    """The results as a Markdown document."""
    meta = res["meta"]
    m = meta["machine"]
    cfg = meta["config"]
    lines = [f"# prelabel detection benchmark{' (QUICK smoke run)' if cfg['quick'] else ''}", "",
             f"{meta['timestamp']} · {m['cpu_model']} · {m['cpu_count']} CPUs "
             f"({m['cpus_usable']} usable) · torch {m['torch']} · onnxruntime {m['onnxruntime']}"
             f" · device {cfg['device']} · wall {meta.get('wall_s', 0) / 60:.0f} min", "",
             f"The machine was shared with other engineers' test runs: load average (1/5/15 min) "
             f"at start {loads(m['loadavg_at_start'])}, at end {loads(meta.get('loadavg_at_end'))}"
             f"; per-run load averages are in the JSON. CPU steal during the run "
             f"{meta.get('cpu_steal_s_during_run', 0):.1f} s.", "",
             f"Budget {cfg['budget_s']:.0f} s of training per run (validation included), "
             f"max_epochs {cfg['max_epochs']} (so the budget or early stopping ends a run), "
             f"training threads {cfg['threads'] or 'torch default'}, seed {cfg['seed']}. "
             f"DetectorConfig defaults at run time: `{json.dumps(meta['detector_defaults'])}`; "
             f"TrainConfig: `{json.dumps(meta['train_config'])}`.", ""]
    if res.get("curve"):
        lines += ["## Accuracy and training time against labeled images", "",
                  *curve_rows(res["curve"] + res.get("peer", [])), ""]
    if res.get("latency"):
        lat = res["latency"]
        ratios = lat["ratios"]
        lines += ["## Suggestion latency through the API (real `prelabel serve`)", "",
                  *latency_rows(lat), "",
                  f"Eager = the faster of the eager rows ({lat['eager']['torch_threads']} "
                  f"thread(s)). Eager p50 over: POST predict p50 "
                  f"{ratios['eager_p50_over_predict_p50']:.2f}x"
                  f", stored computed first call "
                  f"{ratios['eager_p50_over_stored_computed_first_p50']:.2f}x, stored "
                  f"precomputed first call "
                  f"{ratios['eager_p50_over_stored_precomputed_first_p50']:.1f}x, in-process "
                  f"ONNX {ratios['eager_p50_over_onnx_in_process_p50']:.2f}x. Median boxes per "
                  f"answer (over class thresholds): "
                  f"{lat['predict_uploaded']['boxes_per_answer_median']:.0f}; the worker "
                  f"precomputed {lat['stored_precomputed']['images']} uploads at "
                  f"{lat['stored_precomputed']['worker_images_per_s']:.2f} images/s "
                  f"(upload -> all stored).", ""]
    lines += [f"- {n}" for n in res.get("notes", [])]
    return "\n".join(lines) + "\n"


def loads(values: Sequence[float] | None) -> str:
    """Load averages as a / b / c."""
    return "n/a" if values is None else " / ".join(f"{v:.2f}" for v in values)


def write_outputs(res: Json, name: str) -> None:
    """JSON and Markdown, written atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for fname, text in ((f"{name}.json", json.dumps(res, indent=2, default=str)),
                        (f"{name}.md", markdown(res))):
        tmp = RESULTS / f"{fname}.tmp"
        tmp.write_text(text + ("\n" if fname.endswith(".json") else ""))
        os.replace(tmp, RESULTS / fname)


# ---------------------------------------------------------------- the run


def run(cfg: Config, res: Json, tmp: Path) -> None:
    """Curve, peer, latency; results go into ``res`` as they come (partial on failure)."""
    notes: list[str] = res["notes"]
    datasets = {n: load_dataset(n) for n in dict.fromkeys(
        cfg.datasets + (cfg.peer_datasets if cfg.peer else ()) + (("bccd",) if cfg.latency
                                                                  else ()))}
    res["datasets"] = {n: {"classes": list(d.classes), "pool": len(d.train.samples),
                           "val": len(d.val.samples), "test": len(d.test.samples),
                           "split_rule": d.split_rule, "rejected_objects": d.rejected,
                           "pool_boxes": boxes_per_class(d.train.samples, d.classes)}
                       for n, d in datasets.items()}
    for d in datasets.values():
        log(f"{d.name}: pool {len(d.train.samples)}, val {len(d.val.samples)}, test "
            f"{len(d.test.samples)}; {len(d.rejected)} objects skipped by the reader")
    served: DetectorTrainResult | None = None
    served_origin = ""
    largest = max(cfg.sizes, key=size_rank) if cfg.sizes else None
    for name in cfg.datasets:
        for size in sorted(cfg.sizes, key=size_rank):
            row, result = train_one(datasets[name], size, cfg)
            res["curve"].append(row)
            if name == "bccd" and size == largest:
                served, served_origin = result, (
                    f"the curve's bccd {size} detector ({row['train_images']} images, "
                    f"{row['train_s']:.0f}s, test mAP@.5 {fmt(row['map50'])})")
            del result
            save_partial(res, cfg)
    if cfg.peer:
        for name in cfg.peer_datasets:
            for size in cfg.peer_sizes:
                try:
                    res["peer"].append(run_peer(datasets[name], size, cfg, tmp))
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                    notes.append(f"Peer {name} {size} failed: {str(exc)[:600]}")
                    log(f"peer {name} {size} FAILED: {str(exc)[-2000:]}")
                save_partial(res, cfg)
    if cfg.latency:
        if cfg.device != "cpu":
            notes.append("The latency step serves on the CPU (PRELABEL_DEVICE=cpu) whatever "
                         "--device trained the curve.")
        det = serving_detector(datasets["bccd"], cfg, served, served_origin)
        res["latency"] = latency(datasets["bccd"], cfg, det, tmp)
        res["latency"]["served_model"] = {"origin": det.origin, "thresholds": dict(zip(
            BCCD_CLASSES, det.thresholds, strict=True)), "val_map50": det.metrics["map50"]}


def save_partial(res: Json, cfg: Config) -> None:
    """Write what is there so far (a crash later still leaves the finished runs)."""
    res["meta"]["loadavg_latest"] = os.getloadavg()
    write_outputs(res, cfg.name)


def default_notes(cfg: Config) -> list[str]:
    """How the figures were made."""
    notes = [
        "Accuracy: COCO mAP from pycocotools via models.detection_eval.detection_metrics on "
        "the TEST split (bccd test.txt, 72 images; cards test/, 67 images), with every "
        "detection over the detector's score floor (FCOS) or conf 0.001 (YOLO). Mean P / R: "
        "precision and recall at IoU 0.5, averaged over classes, at per-class score "
        "thresholds chosen by choose_score_thresholds (max F1) on the validation split.",
        "Labeled subsets: a seeded shuffle (seed "
        f"{cfg.seed}) of the training pool, each size a prefix of the next (nested). bccd pool "
        "= train.txt (205), val = val.txt (87); cards pool = train/ minus every 7th image "
        "(253), val = every 7th (43).",
        "FCOS runs: train_detector with the TrainConfig defaults except time_budget_s = "
        "--budget less the crop stage's reserve (15%, at most 120 s, as in the worker), "
        "max_epochs (high, so the budget or early stopping on validation mAP@.5, "
        "patience 5 evaluations, ends each phase), threads and seed; the best weights by "
        "validation mAP@.5 are evaluated. The first head_first share of the budget trains "
        "the FPN and head on cached backbone features of augmented views of each image "
        "(head-first epochs = passes over the images, feature caching included in its "
        "seconds); the rest fine-tunes end to end. 'epochs' counts both phases. 'train s' "
        "includes the validations and the crop stage; 'train img/s' is batch size / median "
        "end-to-end step time (validation excluded).",
        "Crop stage (models.box_classifier): a linear head on frozen-backbone embeddings of "
        "crops of the labeled boxes re-classifies the detector's best boxes; it is trained "
        "after the detector and used only when it lifts validation mAP@.5 (as in the worker). "
        "'test mAP@.5' is the served model's (with the stage when used); the last column "
        "gives the detector alone on test, and validation without / with the stage.",
        f"Training threads: {cfg.threads or 'torch default'} (the worker trains detectors "
        "with 1 intra-op thread on the CPU; the peer gets the same thread count); the curve's "
        "evaluation predictions use the same count.",
    ]
    if cfg.latency:
        notes.append(
            "Latency: the served model is put in place by inserting a SUCCEEDED TrainingRun + "
            "promoted ModelVersion row and the exported ONNX blob directly into the server's "
            "SQLite DB / blob store (not by labeling through the API): the weights are the "
            "curve's bccd detector on all labels. Stored-image figures: bccd test images "
            "uploaded before the model existed (the worker only embedded them, so the first "
            "GET runs the detector in the request), and bccd val images uploaded after "
            "promotion, whose suggestions the worker precomputed (the first GET reads the "
            "stored row). Eager = load_detector + predict_detections on one decoded image per "
            "call in this process, the same weights, at torch's default thread count and at 1 "
            "thread (the faster p50 is the baseline of the ratios). The API and the worker run "
            "the ONNX graph with onnxruntime's default threads (PRELABEL_ONNX_THREADS unset). "
            "The API rows are measured while the server runs, the in-process eager and ONNX "
            "rows right after it stopped: on a shared machine the load differs between the "
            "two moments, so read the ratios as rough.")
    if cfg.peer:
        notes.append(
            "Peer: Ultralytics YOLO11n built from yolo11n.yaml (no downloaded weights; "
            "pretrained=False, plots=False, amp=False), trained on the same labeled images "
            "(converted to YOLO format as PNGs of the decoded frames) with time= the same "
            "budget in hours, in a separate venv (--peer-python) as a subprocess with "
            "YOLO_OFFLINE=1 and its settings dir in a temp folder; its best.pt (ultralytics' "
            "own fitness on the same val split) predicts val and test at conf 0.001, "
            "evaluated with the same COCO evaluator and threshold choice.")
    return notes


def main() -> int:
    """Parse arguments, run every step, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="bccd,cards", help="comma list: bccd,cards")
    parser.add_argument("--sizes", help="labeled training images, comma list of numbers or "
                        "'all' (default 25,50,100,all; --quick: 25)")
    parser.add_argument("--budget", type=float, help="training seconds per run (default 300; "
                        "--quick: 40)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--threads", type=int, help="CPU training threads (default 1, as the "
                        "worker; 0: torch's default)")
    parser.add_argument("--max-epochs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-latency", action="store_true", help="skip the API latency step")
    parser.add_argument("--latency-calls", type=int, default=50)
    parser.add_argument("--peer", action="store_true", help="also train the YOLO11n peer")
    parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                        help="python of a venv with ultralytics (never this project's venv)")
    parser.add_argument("--peer-datasets", help="comma list (default: --datasets)")
    parser.add_argument("--peer-sizes", help="comma list (default: the largest of --sizes)")
    parser.add_argument("--peer-imgsz", type=int, default=640)
    parser.add_argument("--peer-batch", type=int, default=16)
    parser.add_argument("--peer-workers", type=int, default=0,
                        help="ultralytics dataloader workers (default 0: in-process, like ours)")
    parser.add_argument("--name", help="results file stem (default detection, "
                        "--quick: detection_quick)")
    parser.add_argument("--note", action="append", default=[],
                        help="a line to add to the results' notes (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    args = parser.parse_args()
    cfg = make_config(args, parser)
    if cfg.peer and not Path(cfg.peer_python).exists():
        parser.error(f"--peer-python {cfg.peer_python} does not exist")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup on SIGTERM too
    res: Json = {"meta": {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"), "config": asdict(cfg),
        "command": " ".join(sys.argv), "machine": machine_info(),
        "cuda": torch.cuda.get_device_name(0) if cfg.device == "cuda" else None,
        "detector_defaults": DetectorConfig(num_classes=1).to_dict() | {"num_classes": "C"},
        "train_config": asdict(train_settings(cfg))},
        "curve": [], "peer": [], "latency": None, "notes": args.note + default_notes(cfg)}
    if cfg.device == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)  # evaluation too (training sets it per run anyway)
    steal = cpu_steal_s()
    tmp = Path(tempfile.mkdtemp(prefix="prelabel-detbench-"))
    try:
        run(cfg, res, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        res["meta"].update(cpu_steal_s_during_run=cpu_steal_s() - steal,
                           loadavg_at_end=os.getloadavg(), wall_s=time.perf_counter() - T0)
        write_outputs(res, cfg.name)
    print("\n" + markdown(res))
    print(f"results: {RESULTS / (cfg.name + '.json')} and {RESULTS / (cfg.name + '.md')}")
    return 0


T0 = time.perf_counter()

if __name__ == "__main__":
    sys.exit(main())
