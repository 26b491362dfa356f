"""One simulated annotation session on one project: pick, look at the suggestion, answer with
the truth, let the training policy run; the accuracy on a fixed held-out split at checkpoints."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from models.detection_eval import detection_metrics
from models.detection_types import Detections
from service.simulate.client import Client, SimulationError
from service.simulate.compare import IOU_UNCHANGED, compare_boxes, tags_accepted

ORDERS = ("uncertainty", "diverse", "random", "file")
# orders the project listing picks by (the others the annotator picks by itself)
LISTED_ORDERS = ("uncertainty", "diverse")
# images per upload request (one embedding job per request), within the default body limit
UPLOAD_BATCH, UPLOAD_BYTES = 64, 8 * 1024 * 1024
CHECKPOINTS = (5, 10, 25, 50, 100)


@dataclass(frozen=True)
class Truth:
    """One dataset image with its true label, in prelabel's (displayed) frame."""

    name: str
    data: bytes
    tags: tuple[str, ...]
    boxes: tuple[dict[str, Any], ...] | None  # detection


@dataclass
class SimConfig:
    """How the annotator works."""

    order: str = "uncertainty"
    seed: int = 0
    max_labels: int | None = None  # stop after this many labels (default: the whole pool)
    checkpoints: Sequence[int] = CHECKPOINTS  # labels per class (average) to evaluate at
    # an operator starts a run (once a first model exists) so a checkpoint sees every label
    train_at_checkpoints: bool = True
    training_timeout: float = 3600
    iou_unchanged: float = IOU_UNCHANGED


@dataclass
class Session:
    """What one simulation recorded: the step log and the checkpoint evaluations."""

    order: str
    task: str
    classes: list[str]
    pool: int
    holdout: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    training_wait_s: float = 0.0
    embedding_wait_s: float = 0.0
    # every model version the session trained: its labels, whether it is the promoted one at
    # the end, and its suggestion floor
    models: list[dict[str, Any]] = field(default_factory=list)


class _Target(NamedTuple):
    boxes: np.ndarray
    labels: np.ndarray


def _batches(items: Sequence[Truth]) -> list[list[Truth]]:
    out: list[list[Truth]] = [[]]
    size = 0
    for item in items:
        if out[-1] and (len(out[-1]) >= UPLOAD_BATCH or size + len(item.data) > UPLOAD_BYTES):
            out.append([])
            size = 0
        out[-1].append(item)
        size += len(item.data)
    return [b for b in out if b]


def split_holdout(truth: Sequence[Truth], share: float, seed: int) -> tuple[list[Truth],
                                                                           list[Truth]]:
    """A seeded, fixed held-out split (the same for every order): (pool, holdout)."""
    order = sorted(truth, key=lambda t: t.name)
    random.Random(f"holdout-{seed}").shuffle(order)
    cut = round(share * len(order))
    return sorted(order[cut:], key=lambda t: t.name), sorted(order[:cut], key=lambda t: t.name)


def model_summary(model: dict[str, Any]) -> dict[str, Any]:
    """What the session log keeps of a trained model (``GET /projects/{id}/models`` entry):
    for a detector also whether its crop stage was used, and the validation mAP@.5 it was
    decided on."""
    metrics = model["metrics"] or {}
    out = {"version": model["version"], "promoted": model["promoted"],
           "labeled_images": metrics.get("labeled_images"),
           "suggestion_floor": metrics.get("suggestion_floor")}
    crops = (metrics.get("training") or {}).get("box_classifier")
    if isinstance(crops, dict):
        out["crop_stage"] = {k: crops.get(k) for k in
                             ("used", "val_map50_detector", "val_map50_rescored")}
    return out


class Simulation:
    """An annotator labeling ``pool`` in one new project of a running prelabel."""

    def __init__(self, client: Client, task: str, classes: list[str], pool: Sequence[Truth],
                 holdout: Sequence[Truth], config: SimConfig, log_path: Path | None = None
                 ) -> None:
        if config.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}")
        self.client, self.task, self.classes, self.config = client, task, classes, config
        self.pool, self.holdout = list(pool), list(holdout)
        self.log_path = log_path
        self.session = Session(config.order, task, classes, len(pool), len(holdout))
        self.truth: dict[int, Truth] = {}  # image id -> truth
        self.upload_order: list[int] = []
        self.pid = 0

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        """A new project with the dataset's classes; the pool uploaded in a seeded order (file
        order for ``file``), so that every order starts from the same images."""
        self.pid = self.client.create_project(f"simulate {self.config.order}", self.task,
                                              self.classes)
        pool = list(self.pool)
        if self.config.order != "file":
            random.Random(f"upload-{self.config.seed}").shuffle(pool)
        for batch in _batches(pool):
            rows = self.client.upload(self.pid, [(t.name, t.data) for t in batch])
            for item, image in zip(batch, rows, strict=True):
                self.truth[image["id"]] = item
                self.upload_order.append(image["id"])
        if len(self.truth) != len(pool):
            raise SimulationError("the pool holds the same image twice")
        # Labeling starts on a ready project: before its images are embedded a new
        # classification model cannot score them (order=uncertainty would fall back to upload
        # order), and order=diverse reads the embeddings.
        self.session.embedding_wait_s = self.client.wait_embedded(
            self.pid, self.config.training_timeout)

    # -- the loop ----------------------------------------------------------------------------

    def next_image(self, labeled: set[int]) -> tuple[int, float | None] | None:
        """The next image and, for listed orders, the uncertainty it was chosen by."""
        if self.config.order in LISTED_ORDERS:
            found = self.client.next_listed(self.pid, self.config.order)
            return None if found is None else (int(found["id"]), found["uncertainty"])
        iid = next((i for i in self.upload_order if i not in labeled), None)
        return None if iid is None else (iid, None)

    def run(self) -> Session:
        """Label until the pool (or ``max_labels``) is done; returns the session record."""
        start = time.monotonic()
        self.setup()
        labeled: set[int] = set()
        limit = min(self.config.max_labels or len(self.pool), len(self.pool))
        pending = sorted(self.config.checkpoints)
        log = self.log_path.open("w") if self.log_path else None
        try:
            while len(labeled) < limit:
                picked = self.next_image(labeled)
                if picked is None:
                    break
                iid, uncertainty = picked
                step = self.step(iid, len(labeled))
                if self.config.order in LISTED_ORDERS:
                    step["uncertainty"] = uncertainty
                labeled.add(iid)
                wait = self.client.wait_training(self.pid, self.config.training_timeout)
                if self.config.order in LISTED_ORDERS:  # the next pick reads the new scores
                    wait += self.client.wait_scored(self.pid, self.config.training_timeout)
                step["training_wait_s"] = round(wait, 2)
                self.session.training_wait_s += step["training_wait_s"]
                self.session.steps.append(step)
                if log:
                    log.write(json.dumps(step) + "\n")
                    log.flush()
                while pending and len(labeled) >= pending[0] * len(self.classes):
                    self.session.checkpoints.append(self.checkpoint(pending.pop(0),
                                                                    len(labeled)))
        finally:
            if log:
                log.close()
        self.session.seconds = time.monotonic() - start
        self.session.models = [model_summary(m) for m in sorted(
            self.client.call("GET", f"/projects/{self.pid}/models"), key=lambda m: m["version"])]
        return self.session

    def step(self, iid: int, labels_before: int) -> dict[str, Any]:
        """Look at the suggestion, answer with the truth, record what that took."""
        truth = self.truth[iid]
        suggestion = self.client.suggestion(iid)
        step: dict[str, Any] = {"step": labels_before + 1, "image_id": iid, "file": truth.name,
                                "labels_before": labels_before,
                                "model_version": suggestion["model_version"] if suggestion
                                else None, "true_tags": list(truth.tags)}
        body: dict[str, Any] = ({"boxes": list(truth.boxes)} if truth.boxes is not None
                                else {"tags": list(truth.tags)})
        if truth.boxes is not None:
            step["boxes_true"] = len(truth.boxes)
        if suggestion is None:
            step["outcome"] = "absent"
            body["source"] = "manual"
        elif self.task == "multiclass" and not suggestion["tags"]:
            # a model exists but does not vouch for its top class here: nothing is pre-filled
            step["outcome"] = "withheld"
            step["confidence"] = suggestion["scores"][0]["confidence"]
            body["source"] = "manual"
        else:
            if truth.boxes is not None:
                edits = compare_boxes(suggestion["boxes"], truth.boxes,
                                      self.config.iou_unchanged)
                accepted = edits.accepted
                step["edits"] = edits.to_dict()
                step["boxes_suggested"] = len(suggestion["boxes"])
            else:
                tags = [t["label"] for t in suggestion["tags"]]
                accepted = tags_accepted(tags, truth.tags)
                step["suggested_tags"] = tags
                # how sure the model said it was: acceptance by confidence is in the summary
                step["confidence"] = min((t["confidence"] for t in suggestion["tags"]),
                                         default=None)
            step["outcome"] = "accepted" if accepted else "corrected"
            body["source"] = "suggestion_accepted" if accepted else "suggestion_corrected"
            body["suggestion_id"] = suggestion["suggestion_id"]
        self.client.annotate(iid, body)
        return step

    # -- evaluation --------------------------------------------------------------------------

    def checkpoint(self, per_class: int, labels: int) -> dict[str, Any]:
        """Accuracy (classification) or mAP@.5 (detection) of the promoted model on the
        held-out split, once a run has seen every label so far (when configured). None before
        the policy's first model."""
        waited = 0.0
        version = self.client.promoted_version(self.pid)
        # Only once the policy has trained: the first model comes when the policy says, so
        # "labels until suggestions" is the service's, not the checkpoint's.
        if self.config.train_at_checkpoints and version is not None:
            runs = self.client.runs(self.pid)
            seen = max((r["labels_seen"] or 0 for r in runs if r["status"] == "SUCCEEDED"),
                       default=0)
            if seen < labels:
                self.client.call("POST", f"/projects/{self.pid}/training-runs",
                                 expect=(201, 409))
                waited = self.client.wait_training(self.pid, self.config.training_timeout)
                self.session.training_wait_s += waited
        version = self.client.promoted_version(self.pid)
        out: dict[str, Any] = {"labels_per_class": per_class, "labels": labels,
                               "model_version": version, "training_wait_s": round(waited, 1)}
        if version is None:
            return {**out, "metric": None}
        # views=true: held-out images are judged as the service judges the images it stores
        # (a frozen head averaged over its prediction views; no-op for other models)
        predictions = [self.client.call("POST", f"/projects/{self.pid}/predict",
                                        params={"include_low": "true", "views": "true"},
                                        files={"file": (t.name, t.data)}) for t in self.holdout]
        if self.task == "detection":
            out["metric_name"] = "map50"
            out["metric"] = _map50(predictions, self.holdout, self.classes)
        else:
            out["metric_name"] = "accuracy"
            hits = [tags_accepted([t["label"] for t in p["tags"]], t.tags)
                    for p, t in zip(predictions, self.holdout, strict=True)]
            out["metric"] = float(np.mean(hits)) if hits else None
        return out


def _map50(predictions: list[dict[str, Any]], truth: list[Truth],
           classes: list[str]) -> float | None:
    def xyxy(boxes: Sequence[dict[str, Any]]) -> np.ndarray:
        return np.asarray([[b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]]
                           for b in boxes], np.float32).reshape(-1, 4)

    dets = [Detections(xyxy(p["boxes"]), np.asarray([b["confidence"] for b in p["boxes"]],
                                                    np.float32),
                       np.asarray([classes.index(b["label"]) for b in p["boxes"]], np.int64))
            for p in predictions]
    targets = [_Target(xyxy(t.boxes or ()), np.asarray([classes.index(b["label"])
                                                        for b in t.boxes or ()], np.int64))
               for t in truth]
    value = detection_metrics(dets, targets, classes)["map50"]
    return None if value is None else float(value)
