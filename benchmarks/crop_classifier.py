"""Crop-classifier study (issue 3): what names a detected card best, and what is left to gain.

The detection target for ``cards`` (mAP@.5 >= 0.90 with 100 labeled images) depends on the crop
stage (``models/box_classifier.py``) naming each box. This benchmark measures, on the
ground-truth boxes of the cards TEST split, the crop accuracy of ways to classify a crop, all
trained on the boxes of the detection benchmark's 100-image subset (seed 0, the same 8 views
per box as the shipped stage):

- the shipped stage: frozen Lite0, global average pooling (GAP) of a 224-px crop, linear head;
- frozen features of other kinds: 320-px crops, GAP + global max pooling, a 2x2 grid of GAPs,
  GAP plus the max over 4 corner crops (35% of the box side, 224 px each, i.e. the rank index
  at ~2x zoom), training views turned by arbitrary angles (not only quarter turns), grayscale;
- DN4-style local-descriptor matching (Li et al., CVPR 2019): every stride-16 descriptor of a
  crop votes for the class whose training descriptors it is nearest to (a few-shot method
  for fine-grained detail);
- fine-tuning the top 2 / 3 backbone stages (``models.finetune``) on the crops.

Accuracy is reported on the exact boxes and on boxes jittered like the detector's (7%), per
class. With ``--oracle-budget S`` it also trains the detector for S seconds (780 s is what the
worker gives it at its 900 s budget) and reports test mAP@.5 of the detector alone, with the
shipped crop stage, and with an oracle stage that gives each kept box the class of the
ground-truth box it overlaps (IoU >= 0.5): the ceiling better crop classes can reach.

It prints a table and writes ``benchmarks/results/<name>.{json,md}``. With ``--views`` it
runs only the training-views study instead: crop accuracy at few labeled images (``--sizes``,
``--seeds``) with the stage's quarter-turn views alone and with the classification views added,
written to ``benchmarks/results/<name>_views.{json,md}``.

    .venv/bin/python benchmarks/crop_classifier.py [--oracle-budget 780] [--name crop_classifier]
    .venv/bin/python benchmarks/crop_classifier.py --views [--sizes 25,50] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchvision.ops import box_iou, roi_align

from benchmarks.core_loop import log, machine_info
from benchmarks.detection import (
    RESULTS,
    Dataset,
    detector_config,
    load_dataset,
    subset,
    timed_predict,
)
from models.backbone import Normalize, load_backbone
from models.box_classifier import (
    BoxClassifierConfig,
    CropView,
    _jitter,
    _training_views,
    crop_stage_reserve,
    rescore_all,
    rescore_detections,
    train_box_classifier,
    view_of_crop,
)
from models.detection_eval import detection_metrics
from models.detection_train import TrainConfig, train_detector
from models.detection_types import DetectionSample
from models.detector import load_detector
from models.finetune import FinetuneConfig, finetune
from models.heads import predict_proba, train_head
from models.views import PREDICTION_VIEWS

Json = dict[str, Any]
CPU = torch.device("cpu")
BATCH = 32
CORNER_SIDE = 0.35  # corner crops: this share of the box's width and height
TEST_JITTER = 0.07  # the detector's boxes are not the labeled ones


# ---------------------------------------------------------------- crops


def _turned_box(box: np.ndarray, degrees: float) -> np.ndarray:
    """The axis-aligned box around ``box`` turned by ``degrees`` about its centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[2], box[3]],
                        [box[0], box[3]]]) - [cx, cy]
    t = np.deg2rad(degrees)
    turned = corners @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) + [cx, cy]
    return np.array([*turned.min(0), *turned.max(0)], np.float32)


def _corner_boxes(box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box
    w, h = CORNER_SIDE * (x1 - x0), CORNER_SIDE * (y1 - y0)
    return np.array([[x0, y0, x0 + w, y0 + h], [x1 - w, y0, x1, y0 + h],
                     [x1 - w, y1 - h, x1, y1], [x0, y1 - h, x0 + w, y1]], np.float32)


def crops_of(samples: Sequence[DetectionSample], views: Sequence[CropView], size: int = 224,
             any_angle: bool = False, gray: bool = False, corners: bool = False,
             seed: int = 5) -> torch.Tensor:
    """Float crops [N,3,size,size] (0-255) of the views; with ``corners`` [N*4,...] (4 per
    view). ``any_angle`` replaces each turned view's quarter turns by a random angle (the
    image is turned about the box centre and the box around the turned box is cropped)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, box, turns, view in views:
        image = torch.tensor(samples[i].image).permute(2, 0, 1).float()
        if any_angle and turns:
            degrees = float(rng.uniform(0, 360))
            cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
            image = TF.rotate(image, degrees, center=[cx, cy])
            box, turns = _turned_box(box, degrees), 0
        boxes = _corner_boxes(box) if corners else box[None]
        cut = roi_align(image[None], [torch.from_numpy(boxes)], (size, size), 1.0, 0, True)
        cut = torch.rot90(cut, turns, (-2, -1))
        if view is not None:
            cut = torch.stack([view_of_crop(c, view) for c in cut])
        if gray:
            cut = (cut * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
            cut = cut.expand(-1, 3, -1, -1)
        out.append(cut)
    return torch.cat(out)


class Features(nn.Module):
    """Frozen Lite0 -> the pooled vectors and stride-16 map each variant needs."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = load_backbone()
        self.normalize = Normalize()

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        bb = self.backbone
        x = bb.bn1(bb.conv_stem(self.normalize(crops)))
        out = {}
        for i, block in enumerate(bb.blocks):
            x = block(x)
            if i == 4:  # 112 channels at stride 16: DN4's descriptors
                out["local"] = F.normalize(x.flatten(2).transpose(1, 2), dim=2).half()
        x = bb.bn2(bb.conv_head(x))
        out["gap"] = x.mean((2, 3))
        out["gmp"] = x.amax((2, 3))
        out["grid"] = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return out


def featurize(model: Features, crops: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """``model`` outputs named ``keys`` for ``crops``, in batches."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    with torch.inference_mode():
        for start in range(0, len(crops), BATCH):
            out = model(crops[start:start + BATCH])
            for k in keys:
                parts[k].append(out[k])
    return {k: torch.cat(v) for k, v in parts.items()}


# ---------------------------------------------------------------- classifiers


def linear(train_x: np.ndarray, y: np.ndarray, tests: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Predicted classes of each test set from the shipped linear head fitter."""
    head = train_head(train_x, y, "multiclass", int(y.max()) + 1, CPU)
    return [predict_proba(head, x).argmax(1) for x in tests]


def dn4(train_local: torch.Tensor, y: np.ndarray, tests: Sequence[torch.Tensor]
        ) -> list[np.ndarray]:
    """Image-to-class nearest-descriptor votes (k = 1), cosine similarity."""
    classes = int(y.max()) + 1
    banks = [train_local[torch.from_numpy(y == c)].reshape(-1, train_local.shape[2]).float()
             for c in range(classes)]
    out = []
    for local in tests:
        scores = torch.zeros(len(local), classes)
        with torch.inference_mode():
            for n, q in enumerate(local.float()):
                for c, bank in enumerate(banks):
                    scores[n, c] = (q @ bank.T).amax(1).sum()
        out.append(scores.argmax(1).numpy())
    return out


def finetuned(train_crops: torch.Tensor, y: np.ndarray, tests: Sequence[torch.Tensor],
              blocks: int, steps: int) -> list[np.ndarray]:
    """Fine-tune the top ``blocks`` stages on the crops (uint8 NHWC), then classify."""
    def uint8(crops: torch.Tensor) -> np.ndarray:
        return crops.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()

    result = finetune(uint8(train_crops), y, "multiclass", int(y.max()) + 1, CPU,
                      FinetuneConfig(trainable_blocks=blocks, steps=steps))
    out = []
    with torch.inference_mode():
        for crops in tests:
            images = uint8(crops)
            emb = np.concatenate([result.model(torch.from_numpy(images[i:i + 64])).numpy()
                                  for i in range(0, len(images), 64)])
            out.append(predict_proba(result.head, emb).argmax(1))
    return out


# ---------------------------------------------------------------- the study


def scores(name: str, predictions: Sequence[np.ndarray], truth: np.ndarray,
           classes: Sequence[str], seconds: float) -> Json:
    """Accuracy on exact and jittered boxes, per-class accuracy (jittered), the confusions."""
    exact, jittered = predictions
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, (truth, jittered), 1)
    per_class = {c: float(confusion[i, i] / max(1, confusion[i].sum()))
                 for i, c in enumerate(classes)}
    row = {"variant": name, "exact": float((exact == truth).mean()),
           "jittered": float((jittered == truth).mean()), "per_class_jittered": per_class,
           "confusion_jittered": confusion.tolist(), "seconds": round(seconds, 1)}
    log(f"{name}: exact {row['exact']:.3f}, jittered {row['jittered']:.3f} ({seconds:.0f} s)")
    return row


def crop_study(ds: Dataset, train: Sequence[DetectionSample]) -> list[Json]:
    """Every variant's crop accuracy on the test split's ground-truth boxes."""
    views, y = _training_views(train, BoxClassifierConfig())
    rng = np.random.default_rng(1)
    test = ds.test.samples
    exact = [CropView(i, box, 0) for i, s in enumerate(test) for box in s.boxes]
    jittered = [v._replace(box=_jitter(v.box, TEST_JITTER, rng)) for v in exact]
    truth = np.concatenate([s.labels for s in test])
    classes = list(ds.classes)
    model = Features().eval()
    rows: list[Json] = []

    def run(name: str, fn: Callable[[], list[np.ndarray]]) -> None:
        start = time.perf_counter()
        predictions = fn()
        rows.append(scores(name, predictions, truth, classes, time.perf_counter() - start))

    start = time.perf_counter()
    keys = ("gap", "gmp", "grid", "local")
    base = [featurize(model, crops_of(s, v), keys)
            for s, v in ((train, views), (test, exact), (test, jittered))]
    base_s = time.perf_counter() - start

    def pooled(*names: str) -> list[np.ndarray]:
        return [torch.cat([f[n] for n in names], 1).numpy() for f in base]

    def frozen(*names: str) -> list[np.ndarray]:
        x = pooled(*names)
        return linear(x[0], y, x[1:])

    rows.append(scores("shipped: frozen GAP, 224 px", frozen("gap"), truth, classes, base_s))
    run("frozen GAP + global max", lambda: frozen("gap", "gmp"))
    run("frozen 2x2 grid of GAPs", lambda: frozen("grid"))
    run("DN4 local descriptors (stride 16)",
        lambda: dn4(base[0]["local"], y, [base[1]["local"], base[2]["local"]]))

    def other_crops(**kwargs: Any) -> list[np.ndarray]:
        x = [featurize(model, crops_of(s, v, **kwargs), ("gap",))["gap"].numpy()
             for s, v in ((train, views), (test, exact), (test, jittered))]
        return linear(x[0], y, x[1:])

    run("frozen GAP, 320 px crops", lambda: other_crops(size=320))
    run("frozen GAP, views at any angle", lambda: other_crops(any_angle=True))
    run("frozen GAP, grayscale", lambda: other_crops(gray=True))

    def with_corners() -> list[np.ndarray]:
        corner = [featurize(model, crops_of(s, v, corners=True), ("gap",))["gap"]
                  .reshape(len(v), 4, -1).amax(1)
                  for s, v in ((train, views), (test, exact), (test, jittered))]
        x = [torch.cat([f["gap"], c], 1).numpy() for f, c in zip(base, corner, strict=True)]
        return linear(x[0], y, x[1:])

    run(f"frozen GAP + max over 4 corner crops ({CORNER_SIDE:.0%})", with_corners)
    crops = [crops_of(s, v) for s, v in ((train, views), (test, exact), (test, jittered))]
    run("fine-tuned top 2 stages, 60 steps", lambda: finetuned(crops[0], y, crops[1:], 2, 60))
    run("fine-tuned top 3 stages, 300 steps", lambda: finetuned(crops[0], y, crops[1:], 3, 300))
    return rows


def views_study(ds: Dataset, sizes: Sequence[int], seeds: Sequence[int]) -> list[Json]:
    """Crop accuracy on the test split's jittered ground-truth boxes at few labeled images:
    the head trained on the quarter-turn views alone (the stage before) against the shipped
    views (those plus the classification views), and either one averaged at test time over
    ``models.views.PREDICTION_VIEWS`` of each crop."""
    rng = np.random.default_rng(1)
    test = ds.test.samples
    jittered = [CropView(i, _jitter(box, TEST_JITTER, rng), 0)
                for i, s in enumerate(test) for box in s.boxes]
    truth = np.concatenate([s.labels for s in test])
    model = Features().eval()

    def embed(samples: Sequence[DetectionSample], views: Sequence[CropView]) -> np.ndarray:
        return featurize(model, crops_of(samples, views), ("gap",))["gap"].numpy()

    plain = embed(test, jittered)
    viewed = [embed(test, [v._replace(view=n) for v in jittered]) for n in PREDICTION_VIEWS]
    rows = []
    for size in sizes:
        for seed in seeds:
            train = subset(ds, str(size), seed).samples
            views, y = _training_views(train, BoxClassifierConfig())
            x = embed(train, views)
            turned = np.asarray([v.view is None for v in views])
            for name, keep in (("quarter turns only (before)", turned),
                               ("shipped: + classification views", np.ones_like(turned))):
                head = train_head(x[keep], y[keep], "multiclass", len(ds.classes), CPU)
                probs = predict_proba(head, plain)
                averaged = (probs + sum(predict_proba(head, v) for v in viewed)) / (1 + len(viewed))
                row = {"images": size, "seed": seed, "variant": name,
                       "training_views": int(keep.sum()),
                       "accuracy": float((probs.argmax(1) == truth).mean()),
                       "accuracy_prediction_views": float((averaged.argmax(1) == truth).mean())}
                log(f"{size} images, seed {seed}, {name}: {row['accuracy']:.3f} "
                    f"({row['accuracy_prediction_views']:.3f} averaged over views)")
                rows.append(row)
    return rows


def views_markdown(res: Json) -> str:
    """The views study as a Markdown report (means over the seeds)."""
    lines = ["# Crop-stage training views (cards, few labeled images)", "",
             f"Generated {res['generated']} on {res['machine']['cpu_model']} "
             f"({res['machine']['cpu_count']} cores). Crop accuracy on the test split's "
             f"{res['test_boxes']} ground-truth boxes jittered {TEST_JITTER:.0%}, linear head on "
             f"frozen Lite0 embeddings, seeds {res['seeds']} (the benchmark's nested subsets).", "",
             "| labeled images | training views | crop accuracy | per seed | "
             "averaged over prediction views |", "|---|---|---|---|---|"]
    rows = res["views"]
    for size in res["sizes"]:
        for name in dict.fromkeys(r["variant"] for r in rows):
            got = [r for r in rows if r["images"] == size and r["variant"] == name]
            per = " / ".join(f"{r['accuracy']:.3f}" for r in got)
            lines.append(f"| {size} | {name} | {np.mean([r['accuracy'] for r in got]):.3f} | "
                         f"{per} | {np.mean([r['accuracy_prediction_views'] for r in got]):.3f} |")
    return "\n".join(lines) + "\n"


def oracle(ds: Dataset, train: Sequence[DetectionSample], budget_s: float) -> Json:
    """Test mAP@.5: detector alone, shipped crop stage, oracle crop classes."""
    settings = TrainConfig(time_budget_s=budget_s, threads=1, seed=0)
    log(f"oracle: training the detector for {budget_s:.0f} s")
    result = train_detector(train, ds.val.samples, detector_config(ds, train), "cpu", settings)
    detector = load_detector(result.config, result.state_dict)
    test = ds.test.samples
    preds, _ = timed_predict(detector, test, "cpu")
    classes = list(ds.classes)
    classifier = train_box_classifier(train, len(classes))
    shipped = rescore_detections(test, preds, classifier)
    config = classifier.config
    oracle_preds = []
    for sample, det in zip(test, preds, strict=True):
        truth = torch.from_numpy(sample.boxes).float()

        def truth_classes(_image: torch.Tensor, boxes: torch.Tensor,
                          truth: torch.Tensor = truth, sample: DetectionSample = sample
                          ) -> torch.Tensor:
            # the matched ground-truth class with certainty; unmatched boxes get a flat guess
            probs = torch.full((len(boxes), len(classes)), 1.0 / len(classes))
            if len(truth):
                iou = box_iou(boxes, truth)
                best, which = iou.max(1)
                hit = best >= 0.5
                probs[hit] = F.one_hot(torch.from_numpy(sample.labels)[which[hit]],
                                       len(classes)).float()
            return probs

        oracle_preds += rescore_all([sample], [det], truth_classes, config)

    def ap(preds: Sequence[Any]) -> Json:
        m = detection_metrics(preds, test, classes)
        return {"map50": m["map50"],
                "per_class_ap50": {c: v.get("ap50") for c, v in m["per_class"].items()}}

    out = {"detector_train_s": result.seconds, "epochs": result.epochs,
           "detector": ap(preds), "shipped_stage": ap(shipped), "oracle_stage": ap(oracle_preds)}
    log(f"oracle: detector {out['detector']['map50']:.3f}, shipped stage "
        f"{out['shipped_stage']['map50']:.3f}, oracle classes {out['oracle_stage']['map50']:.3f}")
    return out


def markdown(res: Json) -> str:
    """The result as a Markdown report."""
    classes = res["classes"]
    lines = ["# Crop classifier study (cards, 100 labeled images)", "",
             f"Generated {res['generated']} on {res['machine']['cpu_model']} "
             f"({res['machine']['cpu_count']} cores), one torch thread. Crops of the test split's "
             f"{res['test_boxes']} ground-truth boxes (exact, and jittered {TEST_JITTER:.0%} "
             f"like detector boxes); training: {res['training_views']} views of "
             f"{res['training_boxes']} boxes. Per-class accuracy is on the jittered boxes.", "",
             "| variant | exact | jittered | " + " | ".join(classes) + " | s |",
             "|---|---|---|" + "---|" * len(classes) + "---|"]
    for row in res["variants"]:
        per = " | ".join(f"{row['per_class_jittered'][c]:.2f}" for c in classes)
        lines.append(f"| {row['variant']} | {row['exact']:.3f} | {row['jittered']:.3f} | {per} "
                     f"| {row['seconds']:.0f} |")
    if res.get("oracle"):
        o = res["oracle"]
        lines += ["", f"Test mAP@.5 with a detector trained {o['detector_train_s']:.0f} s "
                  f"({o['epochs']:.1f} epochs):", "",
                  "| classes from | mAP@.5 | " + " | ".join(classes) + " |",
                  "|---|---|" + "---|" * len(classes)]
        for key, label in (("detector", "the detector alone"),
                           ("shipped_stage", "the shipped crop stage"),
                           ("oracle_stage", "oracle: matched ground-truth class")):
            per = " | ".join(f"{(o[key]['per_class_ap50'][c] or 0):.2f}" for c in classes)
            lines.append(f"| {label} | {o[key]['map50']:.3f} | {per} |")
    return "\n".join(lines) + "\n"


def write(name: str, res: Json, report: str) -> None:
    """Write ``benchmarks/results/<name>.{json,md}`` and print the report."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(report)
    print(report)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oracle-budget", type=float, default=None,
                        help="also train the detector this long and report the oracle ceiling")
    parser.add_argument("--name", default="crop_classifier")
    parser.add_argument("--views", action="store_true",
                        help="only the training-views study (writes <name>_views.{json,md})")
    parser.add_argument("--sizes", default="25,50", help="labeled images, for --views")
    parser.add_argument("--seeds", default="0,1,2", help="subset seeds, for --views")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the worker's crop stage
    ds = load_dataset("cards")
    if args.views:
        sizes = [int(v) for v in args.sizes.split(",")]
        seeds = [int(v) for v in args.seeds.split(",")]
        res = {"generated": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info(), "sizes": sizes, "seeds": seeds,
               "test_boxes": int(sum(len(s.boxes) for s in ds.test.samples)),
               "views": views_study(ds, sizes, seeds)}
        write(f"{args.name}_views", res, views_markdown(res))
        return 0
    train = subset(ds, "100", 0).samples
    views, _ = _training_views(train, BoxClassifierConfig())
    res: Json = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(), "loadavg_before": os.getloadavg(),
        "classes": list(ds.classes), "training_boxes": int(sum(len(s.boxes) for s in train)),
        "training_views": len(views), "test_boxes": int(sum(len(s.boxes) for s in ds.test.samples)),
        "variants": crop_study(ds, train),
        "worker_detector_budget_s": 900 - crop_stage_reserve(900),
    }
    if args.oracle_budget:
        res["oracle"] = oracle(ds, train, args.oracle_budget)
    res["loadavg_after"] = os.getloadavg()
    write(args.name, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
