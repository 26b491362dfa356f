"""What pre-labeling saves, measured with ``prelabel simulate`` on the shared datasets.

Scenarios (each: uncertainty order vs random order, a fresh ``prelabel serve`` started by the
simulator; CPU unless ``--device`` says otherwise):

- ``cards-classification``: the cards as 6-class classification, a folder per rank of the
  card crops derived from the VOC boxes (train and test photos);
- ``cards-detection``: the cards photos with their VOC boxes;
- ``bccd-detection``: the BCCD smears with their VOC boxes.

Writes ``benchmarks/results/simulate/<scenario>/`` (``summary.{json,md}``, ``curves.png``, one
``<order>.jsonl`` step log per order) and prints the summaries; it never asserts.

    .venv/bin/python benchmarks/simulate.py cards-classification [--max-labels N]
        [--train-seconds S] [--max-epochs N] [--min-images-per-class N]
        [--checkpoints 5,10,25,50,100] [--seeds 0,1,2] [--orders uncertainty,random]
        [--suggestion-min-precision 0.85] [--device cpu|cuda|auto] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.core_loop import RESULTS, log
from service.simulate.aggregate import write_aggregate
from service.simulate.driver import embedded_server, simulate
from service.simulate.report import Costs
from service.simulate.run import SimConfig
from tests.conftest import DATASETS
from tests.images import card_crops

SCENARIOS = ("cards-classification", "cards-detection", "bccd-detection")


def card_crop_folders(dest: Path) -> Path:
    """The cards as a folder-per-rank classification dataset (crops of the VOC boxes)."""
    for split in ("train", "test"):
        for sample in card_crops(split):
            folder = dest / sample.labels[0]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{sample.name}").write_bytes(sample.data)
    return dest


def voc_folder(dest: Path, sources: list[Path]) -> Path:
    """One VOC folder (images beside their XML) from several (their file names are unique)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        for file in src.iterdir():
            if file.is_file() and file.name != "LICENSE":
                shutil.copy(file, dest / file.name)
    return dest


def dataset_for(scenario: str, tmp: Path) -> tuple[Path, str, str]:
    """(dataset path, format, task) of a scenario."""
    if scenario == "cards-classification":
        return card_crop_folders(tmp / "crops"), "folders", "multiclass"
    if scenario == "cards-detection":
        cards = DATASETS / "cards"
        return voc_folder(tmp / "cards", [cards / "train", cards / "test"]), "voc", "detection"
    return DATASETS / "bccd", "voc", "detection"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--max-labels", type=int, default=None)
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="detection training budget per run (default: the service's); "
                             "0: none, each run ends at the epoch cap (load-independent)")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="detection epoch cap per run (default: the service's)")
    parser.add_argument("--checkpoints", default="5,10,25,50,100")
    parser.add_argument("--min-images-per-class", type=int, default=None,
                        help="detection policy: images per class before a first model "
                             "(default: the service's 15)")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated; several: one folder per seed plus their means")
    parser.add_argument("--orders", default="uncertainty,diverse,random")
    parser.add_argument("--suggestion-min-precision", type=float, default=None,
                        help="multiclass: suggest only where held-out predictions of that "
                             "confidence were this often right (default: the service's)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where the server's worker trains (default: cpu, as in CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result folder (default: benchmarks/results/simulate/<scenario>)")
    args = parser.parse_args()
    env = {"PRELABEL_DEVICE": args.device}
    if args.suggestion_min_precision is not None:
        env["PRELABEL_SUGGESTION_MIN_PRECISION"] = str(args.suggestion_min_precision)
    if args.train_seconds is not None:
        env["PRELABEL_DETECTION_TRAIN_SECONDS"] = str(args.train_seconds)
    if args.max_epochs is not None:
        env["PRELABEL_DETECTION_MAX_EPOCHS"] = str(args.max_epochs)
    if args.min_images_per_class:
        env["PRELABEL_MIN_LABELS_PER_CLASS_DETECTION"] = str(args.min_images_per_class)
    seeds = [int(s) for s in args.seeds.split(",")]
    checkpoints = tuple(int(c) for c in args.checkpoints.split(","))
    out = args.out or RESULTS / "simulate" / args.scenario
    folders = {seed: out / f"seed-{seed}" if len(seeds) > 1 else out for seed in seeds}
    with tempfile.TemporaryDirectory(prefix="prelabel-sim-data-") as tmp:
        dataset, fmt, task = dataset_for(args.scenario, Path(tmp))
        log(f"{args.scenario}: {dataset} ({fmt}, {task})")
        for seed, folder in folders.items():
            # a fresh server per seed: no model or queue state carries over
            with embedded_server(env) as (url, key):
                simulate(url, key, dataset, fmt, task, args.orders.split(","), folder,
                         SimConfig(seed=seed, max_labels=args.max_labels,
                                   checkpoints=checkpoints), Costs(),
                         title=f"{args.scenario}, seed {seed}")
            print((folder / "summary.md").read_text())
    if len(seeds) > 1:
        write_aggregate(out, list(folders.values()), args.scenario)
        print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
