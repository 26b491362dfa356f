"""Few-shot accuracy of the frozen head with and without its training views (models/views.py).

On the 547 card crops (6 ranks) of ``shared/datasets/cards``: per draw, ``k`` random crops of
each rank are labeled and every other crop is held out; the linear head (``models.heads``)
trains on the labeled crops' embeddings alone, on them repeated ``1 + views`` times (the same
weight against the prior as with views: rules out a weaker regulariser as the cause), or on
them plus the embeddings of each view of them. Held-out accuracy, mean of the draws. The
last row (not shipped) also averages the shipped head's probabilities over each held-out crop
and its first four views at prediction time (test-time augmentation).

    .venv/bin/python benchmarks/head_views.py [--draws 10] [--name head_views]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from benchmarks.active_learning_probe import embed
from benchmarks.core_loop import RESULTS, log, machine_info
from models.backbone import EmbeddingModel, backbone_id
from models.heads import predict_proba, train_head
from models.views import VIEWS
from tests.images import card_crops

CPU = torch.device("cpu")
PER_CLASS = (5, 10, 25)
SHIPPED = "crop + all views (shipped)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--name", default="head_views")
    args = parser.parse_args()
    torch.set_num_threads(1)
    samples = card_crops("train") + card_crops("test")
    names = sorted({s.labels[0] for s in samples})
    y = np.array([names.index(s.labels[0]) for s in samples])
    images = [Image.open(io.BytesIO(s.data)).convert("RGB") for s in samples]
    model = EmbeddingModel()
    start = time.perf_counter()
    plain = embed(images, model, 224)
    views = {name: embed([f(im) for im in images], model, 224) for name, f in VIEWS.items()}
    log(f"{len(samples)} crops x {1 + len(views)} views embedded "
        f"({time.perf_counter() - start:.0f} s)")
    setups = {"crop alone": [plain], f"crop repeated {1 + len(views)}x": [plain] * (1 + len(views)),
              **{f"crop + {name}": [plain, x] for name, x in views.items()},
              "crop + first four views (shipped before)": [plain, *list(views.values())[:4]],
              SHIPPED: [plain, *views.values()]}
    tta = f"{SHIPPED}, predictions averaged over crop + first four views"
    results: dict[str, dict[int, float]] = {}
    for setup, parts in setups.items():
        results[setup] = {}
        for k in PER_CLASS:
            acc, tta_acc = [], []
            for draw in range(args.draws):
                rng = np.random.default_rng(draw)
                idx = np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                                      for c in range(len(names))])
                rest = np.setdiff1d(np.arange(len(y)), idx)
                head = train_head(np.concatenate([p[idx] for p in parts]),
                                  np.tile(y[idx], len(parts)), "multiclass", len(names), CPU)
                acc.append(float((predict_proba(head, plain[rest]).argmax(1) == y[rest]).mean()))
                if setup == SHIPPED:
                    probs = np.mean([predict_proba(head, v[rest])
                                     for v in [plain, *list(views.values())[:4]]], axis=0)
                    tta_acc.append(float((probs.argmax(1) == y[rest]).mean()))
            results[setup][k] = round(float(np.mean(acc)), 4)
            if tta_acc:
                results.setdefault(tta, {})[k] = round(float(np.mean(tta_acc)), 4)
        log(f"{setup}: {results[setup]}")
    log(f"{tta}: {results[tta]}")
    lines = [f"# Frozen head with training views: card crops, {args.draws} draws", "",
             "| head trained on | " + " | ".join(f"{k} per class" for k in PER_CLASS) + " |",
             "|---|" + "---:|" * len(PER_CLASS)]
    lines += [f"| {setup} | " + " | ".join(f"{r[k]:.3f}" for k in PER_CLASS) + " |"
              for setup, r in results.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
              "backbone": backbone_id(), "draws": args.draws, "views": list(VIEWS),
              "results": results}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(text)


if __name__ == "__main__":
    main()
