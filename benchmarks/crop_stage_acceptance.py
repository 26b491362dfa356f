"""Box acceptance on cards with fixed detectors: what the crop stage's training views change.

The service simulation (``benchmarks/simulate.py cards-detection``) retrains a detector at
every policy step, and which detector gets promoted varies from run to run, so one seed of it
cannot tell a crop-stage change from training noise. Here each seed trains one detector (the
benchmark's nested subset of ``--images`` labeled card photos, the last 20% held out as the
worker holds out about 20%, trained to the service's 40-epoch cap on one thread) and every
crop-stage variant re-classifies the same detections:

- the detector alone;
- the crop stage trained on the quarter-turn views only (8 per box: the stage before);
- the crop stage as shipped (those plus the classification views, 16 per box).

Per-class thresholds are chosen on the held-out images as the worker chooses them
(``choose_score_thresholds``, at each ``--min-precision``), and the suggestions the service
would make on the test split's 67 photos (``service.prediction.Prediction``: thresholds and one
name per object) are answered like the simulator answers them (``compare_boxes``: unchanged at
IoU >= 0.75 with the right label), with the simulator's per-action costs for time saved.

    .venv/bin/python benchmarks/crop_stage_acceptance.py [--images 50] [--seeds 0,1,2]

It prints a table and writes ``benchmarks/results/crop_stage_acceptance.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.core_loop import log, machine_info
from benchmarks.crop_classifier import write
from benchmarks.detection import load_dataset, subset
from models.box_classifier import BoxClassifierConfig, rescore_detections, train_box_classifier
from models.detection_eval import (
    MIN_PRECISION,
    choose_score_thresholds,
    cross_class_iou,
    detection_metrics,
)
from models.detection_train import TrainConfig, train_detector
from models.detection_types import Detections, DetectionSample
from models.detector import config_for, load_detector, predict_detections
from service.prediction import Prediction
from service.settings import Settings
from service.simulate.compare import compare_boxes
from service.simulate.report import Costs, step_seconds

Json = dict[str, Any]
HOLDOUT = 0.2
VARIANTS = {"quarter turns only (before)": BoxClassifierConfig(max_views_per_box=8),
            "shipped: + classification views": BoxClassifierConfig()}


def _xywh(box: np.ndarray) -> dict[str, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}


def answer(test: Sequence[DetectionSample], detections: Sequence[Detections],
           thresholds: np.ndarray, classes: Sequence[str], cross_iou: float,
           costs: Costs) -> Json:
    """The simulated annotator's edits over the test images and the time they take."""
    edits = {"unchanged": 0, "moved": 0, "relabeled": 0, "deleted": 0, "added": 0}
    manual = assisted = 0.0
    for sample, det in zip(test, detections, strict=True):
        xywh = np.concatenate([det.boxes[:, :2], det.boxes[:, 2:] - det.boxes[:, :2]], 1)
        pred = Prediction("detection", tuple(classes), 1, 1, np.zeros(len(classes), np.float32),
                          thresholds.astype(np.float32), xywh.astype(np.float32), det.labels,
                          det.scores, cross_iou)
        suggested = [{"label": label, "x": x, "y": y, "width": w, "height": h}
                     for label, _, (x, y, w, h), ok in pred.box_items() if ok]
        truth = [{"label": classes[int(c)], **_xywh(b)}
                 for b, c in zip(sample.boxes, sample.labels, strict=True)]
        got = compare_boxes(suggested, truth).to_dict()
        for key in edits:
            edits[key] += got[key]
        without, with_ = step_seconds({"boxes_true": len(truth), "edits": got}, costs, True)
        manual += without
        assisted += with_
    boxes = sum(len(s.labels) for s in test)
    return {"boxes": boxes, "accepted": edits["unchanged"] / boxes, "edits": edits,
            "time_saved": 1 - assisted / manual,
            "held_back_classes": [classes[c] for c in np.flatnonzero(thresholds >= 1.0)]}


def one_seed(ds: Any, images: int, seed: int, precisions: Sequence[float]) -> list[Json]:
    """Every variant's outcome with one detector."""
    classes = list(ds.classes)
    pool = subset(ds, str(images), seed).samples
    held = max(3, round(HOLDOUT * len(pool)))
    train, val = pool[:-held], pool[-held:]
    test = ds.test.samples
    start = time.perf_counter()
    settings = TrainConfig(max_epochs=Settings().detection_max_epochs, time_budget_s=None,
                           threads=1)
    result = train_detector(train, val, config_for(train, len(classes)), "cpu", settings)
    detector = load_detector(result.config, result.state_dict)
    val_raw = predict_detections(detector, [s.image for s in val])
    test_raw = predict_detections(detector, [s.image for s in test])
    log(f"seed {seed}: detector {result.epochs:.0f} epochs in {time.perf_counter() - start:.0f} s")
    cross_iou = cross_class_iou(pool)
    outputs = {"detector alone": (val_raw, test_raw)}
    for name, config in VARIANTS.items():
        classifier = train_box_classifier(train, len(classes), config=config)
        outputs[name] = (rescore_detections(val, val_raw, classifier),
                         rescore_detections(test, test_raw, classifier))
    rows = []
    for name, (val_dets, test_dets) in outputs.items():
        test_map = detection_metrics(test_dets, test, classes)["map50"]
        for precision in precisions:
            thresholds = choose_score_thresholds(val_dets, val, len(classes),
                                                 min_precision=precision)
            row = {"seed": seed, "variant": name, "min_precision": precision,
                   "epochs": result.epochs, "test_map50": test_map,
                   **answer(test, test_dets, thresholds, classes, cross_iou, Costs())}
            log(f"  {name}, min precision {precision}: {row['accepted']:.3f} accepted, "
                f"{row['time_saved']:.3f} saved, test mAP@.5 {test_map:.3f}")
            rows.append(row)
    return rows


def markdown(res: Json) -> str:
    """Means over the seeds, one row per variant and precision."""
    lines = [f"# Crop stage on fixed detectors (cards, {res['images']} labeled images)", "",
             f"Generated {res['generated']} on {res['machine']['cpu_model']} "
             f"({res['machine']['cpu_count']} cores). One detector per seed ({res['seeds']}), "
             f"{res['test_boxes']} test boxes; accepted: suggested unchanged (IoU >= 0.75, right "
             "label). Means over the seeds, then per seed.", "",
             "| variant | min precision | boxes accepted | per seed | time saved | "
             "test mAP@.5 | moved / relabeled / deleted / added (all seeds) |",
             "|---|---|---|---|---|---|---|"]
    rows = res["rows"]
    for key in dict.fromkeys((r["variant"], r["min_precision"]) for r in rows):
        got = [r for r in rows if (r["variant"], r["min_precision"]) == key]
        edits = [sum(r["edits"][k] for r in got) for k in ("moved", "relabeled", "deleted",
                                                            "added")]
        lines.append(
            f"| {key[0]} | {key[1]} | {np.mean([r['accepted'] for r in got]):.3f} | "
            + " / ".join(f"{r['accepted']:.3f}" for r in got)
            + f" | {np.mean([r['time_saved'] for r in got]):.3f} | "
            f"{np.mean([r['test_map50'] for r in got]):.3f} | "
            + " / ".join(str(e) for e in edits) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--min-precision", default=f"{MIN_PRECISION},0.33",
                        help="comma-separated: the threshold rule's precision floor(s)")
    parser.add_argument("--name", default="crop_stage_acceptance")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the worker trains
    ds = load_dataset("cards")
    seeds = [int(s) for s in args.seeds.split(",")]
    precisions = [float(p) for p in args.min_precision.split(",")]
    res: Json = {"generated": datetime.now(UTC).isoformat(timespec="seconds"),
                 "machine": machine_info(), "loadavg_before": os.getloadavg(),
                 "images": args.images, "seeds": seeds,
                 "test_boxes": int(sum(len(s.labels) for s in ds.test.samples)), "rows": []}
    for seed in seeds:
        res["rows"] += one_seed(ds, args.images, seed, precisions)
    res["loadavg_after"] = os.getloadavg()
    write(args.name, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
