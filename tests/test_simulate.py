"""``prelabel simulate`` end to end on a small real subset: card crops of three ranks, a
folder per class, against a ``prelabel serve`` the command starts itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service.simulate.aggregate import aggregate
from service.simulate.aggregate import markdown as aggregate_markdown
from service.simulate.compare import compare_boxes
from service.simulate.driver import group_alive
from service.simulate.run import model_summary
from tests.conftest import REPO
from tests.images import card_crops

pytestmark = pytest.mark.slow
RANKS = ("ace", "king", "nine")


def test_compare_boxes_counts_each_edit() -> None:
    box = {"label": "a", "x": 0.0, "y": 0.0, "width": 100.0, "height": 100.0}
    truth = [box, {**box, "x": 300.0}, {**box, "x": 600.0}, {**box, "y": 300.0}]
    suggested = [
        {**box, "x": 2.0},  # IoU 0.96, same label: unchanged
        {**box, "x": 302.0, "label": "b"},  # right place, wrong label: relabeled
        {**box, "x": 640.0},  # IoU 0.43: moved
        {**box, "x": 900.0},  # nothing there: deleted
    ]  # the box at y=300 is not suggested: added
    edits = compare_boxes(suggested, truth)
    assert edits.to_dict() == {"unchanged": 1, "moved": 1, "relabeled": 1, "deleted": 1,
                               "added": 1}
    assert not edits.accepted and compare_boxes(truth, truth).accepted
    assert compare_boxes([], []).accepted


def crop_folders(dest: Path) -> Path:
    """Card crops of three ranks, 14 each, a folder per rank."""
    for sample in card_crops("train", per_class=14):
        if sample.labels[0] in RANKS:
            folder = dest / sample.labels[0]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / sample.name).write_bytes(sample.data)
    return dest


def children_serving(parent: int) -> list[int]:
    """Pids of ``prelabel serve`` processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # it ended while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"serve" in cmdline and b"service.cli" in cmdline:
            found.append(int(entry.name))
    return found


def test_model_summary_keeps_the_crop_stage_decision() -> None:
    """A detector's entry says whether its crop stage was used; a head's has no such key."""
    crops = {"used": True, "reason": "...", "val_map50_detector": 0.41,
             "val_map50_rescored": 0.58, "training_views": 1280, "seconds": 70.2}
    detector = {"version": 3, "promoted": True, "metrics": {
        "labeled_images": 48, "training": {"epochs": 40, "box_classifier": crops}}}
    assert model_summary(detector) == {
        "version": 3, "promoted": True, "labeled_images": 48, "suggestion_floor": None,
        "crop_stage": {"used": True, "val_map50_detector": 0.41, "val_map50_rescored": 0.58}}
    head = {"version": 1, "promoted": False,
            "metrics": {"labeled_images": 30, "suggestion_floor": {"min_confidence": 0.4}}}
    assert model_summary(head) == {"version": 1, "promoted": False, "labeled_images": 30,
                                   "suggestion_floor": {"min_confidence": 0.4}}
    assert model_summary({"version": 2, "promoted": False, "metrics": None})[
        "labeled_images"] is None


def test_stopped_simulation_stops_its_server(tmp_path: Path) -> None:
    """SIGTERM to ``prelabel simulate`` stops the server (API and worker) it started."""
    dataset = crop_folders(tmp_path / "crops")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "simulate", str(dataset), "--format", "folders",
         "--task", "multiclass", "--out", str(tmp_path / "out"), "--order", "random"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (servers := children_serving(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "no server started"
            time.sleep(0.2)
        (server,) = servers
        group = os.getpgid(server)
        # its own session (a kill of ours misses it), which it leads
        assert group == server and group != os.getpgid(proc.pid)
        time.sleep(3)  # let the API and the worker start
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while group_alive(group):  # the server leads its group: API and worker are in it
            assert time.monotonic() < deadline, "the server outlived the simulation"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()


# the server's suggestion target in the subset run: the three ranks are easy (94-100% right
# out of fold), so only a strict target makes some models hold back their less sure answers
MIN_PRECISION = 0.99


@pytest.mark.parametrize("setting", ["SUGGESTION_MIN_PRECISION=0.7", "PRELABEL_X"])
def test_server_setting_needs_a_prelabel_name_and_value(tmp_path: Path, setting: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "simulate", str(tmp_path), "--format", "folders",
         "--task", "multiclass", "--out", str(tmp_path / "out"), "--server-setting", setting],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "PRELABEL_NAME=VALUE" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_simulate_cards_subset(tmp_path: Path) -> None:
    dataset = crop_folders(tmp_path / "crops")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "simulate", str(dataset), "--format", "folders",
         "--task", "multiclass", "--out", str(out), "--order", "uncertainty", "--order", "diverse",
         "--order", "random",
         "--checkpoints", "5,10", "--seed", "1", "--seed", "2",
         "--server-setting", f"PRELABEL_SUGGESTION_MIN_PRECISION={MIN_PRECISION}"],
        cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in (1, 2):
        check_seed(out / f"seed-{n}")
    floors = [m["suggestion_floor"]["min_confidence"] for n in (1, 2) for s in json.loads(
        (out / f"seed-{n}" / "summary.json").read_text())["sessions"] for m in s["models"]]
    assert any(f > 0 for f in floors), floors  # the setting reached the server's worker

    # the means over the two seeds
    agg = json.loads((out / "summary.json").read_text())
    runs = [json.loads((out / f"seed-{n}" / "summary.json").read_text()) for n in (1, 2)]
    assert agg["seeds"] == [1, 2] and "mean of seeds 1, 2" in (out / "summary.md").read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for i, order in enumerate(("uncertainty", "diverse", "random")):
        mean = agg["orders"][order]
        assert mean["accepted_after_first_model"] == pytest.approx(np.mean(
            [r["sessions"][i]["accepted_after_first_model"] for r in runs]), abs=1e-4)
        final = [r["sessions"][i]["checkpoints"][-1]["metric"] for r in runs]
        assert mean["metric"][-1]["per_seed"] == final
        assert mean["metric"][-1]["mean"] == pytest.approx(np.mean(final), abs=1e-4)
    # 100% of random order's final accuracy: where random order reached it
    assert agg["labels_to_level"][-1]["labels"]["random"] == agg["vs_random"]["diverse"][
        "random_labels"] in (15, 30)
    assert [row["level"] for row in agg["labels_to_level"]] == sorted(
        row["level"] for row in agg["labels_to_level"])


def check_seed(out: Path) -> None:
    """One seed's logs and summary are consistent."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 42 and sorted(summary["classes"]) == sorted(RANKS)
    # the labeled import queued a run for the ground-truth project; it would only take a slot
    assert summary["ground_truth_runs_cancelled"] == 1
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| labels given | 34 | 34 | 34 |" in (out / "summary.md").read_text()
    logs = {s["order"]: [json.loads(line) for line in (out / f"{s['order']}.jsonl").open()]
            for s in summary["sessions"]}
    for s in summary["sessions"]:
        steps = logs[s["order"]]
        # every pool image answered once; the counts add up
        assert len(steps) == s["labels"] == s["pool"] == 34 and s["holdout"] == 8
        assert len({st["image_id"] for st in steps}) == 34
        assert [st["step"] for st in steps] == list(range(1, 35))
        outcomes = [st["outcome"] for st in steps]
        first = s["labels_until_first_model"]
        # no suggestion before the first model (5 labels per class at least); after it each
        # image gets one, or none where the model is not sure enough (withheld)
        assert first is not None and first >= 15
        assert set(outcomes[:first]) == {"absent"}
        assert set(outcomes[first:]) <= {"accepted", "corrected", "withheld"}
        modeled = steps[first:]
        shown = [st for st in modeled if st["outcome"] != "withheld"]
        accepted = [st for st in shown if st["outcome"] == "accepted"]
        assert s["labels_until_first_suggestion"] == shown[0]["labels_before"]
        assert s["suggested_after_first_model"] == pytest.approx(len(shown) / len(modeled),
                                                                 abs=1e-4)
        assert s["accepted_after_first_model"] == pytest.approx(len(accepted) / len(shown),
                                                                abs=1e-4)
        assert s["images_accepted_after_first_model"] == pytest.approx(
            len(accepted) / len(modeled), abs=1e-4)
        assert s["accepted_after_first_model"] >= 0.5  # acceptance rises from 0 with a model
        assert all(st["suggested_tags"] for st in shown)
        # each model's floor, chosen on its held-out predictions for the server's target,
        # decides what was pre-filled: withheld exactly under it
        floors = {m["version"]: m["suggestion_floor"] for m in s["models"]}
        assert {st["model_version"] for st in modeled} <= set(floors)
        for floor in floors.values():
            assert floor["target_precision"] == MIN_PRECISION, floor
            assert floor["precision"] is None or floor["precision"] >= MIN_PRECISION, floor
        for st in modeled:
            below = st["confidence"] < floors[st["model_version"]]["min_confidence"]
            assert (st["outcome"] == "withheld") == below, st
            assert ("suggested_tags" in st) != below
        # acceptance by confidence: fewer suggestions at each higher cut, counted from the steps
        conf = [(st["confidence"], st["outcome"]) for st in shown
                if st["labels_before"] >= s["after_labels"]]
        for row in s["accepted_by_confidence"]:
            sure = [o for c, o in conf if c >= row["min_confidence"]]
            assert row["share_of_suggestions"] == pytest.approx(len(sure) / len(conf), abs=1e-4)
            assert row["accepted"] == (pytest.approx(sure.count("accepted") / len(sure), abs=1e-4)
                                       if sure else None)
        assert [c["labels_per_class"] for c in s["checkpoints"]] == [5, 10]
        for c in s["checkpoints"]:  # a metric once the policy's first model exists
            assert (c["metric"] is None) == (c["labels"] < first), c
            assert c["metric"] is None or 0 <= c["metric"] <= 1
        time = s["annotator_seconds"]
        assert time["with_suggestions"] < time["without_suggestions"] == 34 * 3.0
        # a withheld image costs what labeling it alone does; a shown one 1 s, or 1 s + 3 s
        assert time["with_suggestions"] == pytest.approx(
            3.0 * (34 - len(shown)) + 1.0 * len(accepted) + 4.0 * (len(shown) - len(accepted)))
    # both orders start alike (upload order, no model); then uncertainty follows the model
    first = summary["sessions"][0]["labels_until_first_model"]
    active, baseline = logs["uncertainty"], logs["random"]
    assert [st["file"] for st in active[:first]] == [st["file"] for st in baseline[:first]]
    assert all(st["uncertainty"] is not None for st in active[first:])
    assert [st["file"] for st in active[first:]] != [st["file"] for st in baseline[first:]]
    # diverse starts from the same first image, then spreads out (k-center before a model)
    diverse = logs["diverse"]
    first = next(s["labels_until_first_model"] for s in summary["sessions"]
                 if s["order"] == "diverse")
    assert diverse[0]["file"] == baseline[0]["file"]
    assert [st["file"] for st in diverse[:first]] != [st["file"] for st in baseline[:first]]
    assert all(st["uncertainty"] is not None for st in diverse[first:])

    # the means over "seeds" that are this run twice are this run's figures
    agg = aggregate([out, out], bin_width=15)
    for s in summary["sessions"]:
        mean = agg["orders"][s["order"]]
        assert mean["accepted_after_first_model"] == s["accepted_after_first_model"]
        assert [c["mean"] for c in mean["metric"]] == [c["metric"] for c in s["checkpoints"]]
        assert [c["labels"] for c in mean["acceptance"]] == [30, 45][:len(mean["acceptance"])]
    assert agg["vs_random"]["diverse"]["random_labels"] == summary["vs_random"]["diverse"][
        "baseline_labels_to_target"]
    assert agg["labels_to_level"][-1]["labels"]["random"] == agg["vs_random"]["diverse"][
        "random_labels"]  # 100% of random order's final accuracy: where random reached it
    assert [row["level"] for row in agg["labels_to_level"]] == sorted(
        row["level"] for row in agg["labels_to_level"])
    assert "| labels until suggestions first appear |" in aggregate_markdown(agg, "cards")
