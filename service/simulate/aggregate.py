"""Several seeds of one scenario: mean curves per order, so that order effects are judged
against seed-to-seed noise (one seed's held-out split is small: one image is ~1 point)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.simulate.report import (
    SHOWN,
    confident_text,
    fewer_text,
    fmt,
    save_panels,
    two_panels,
)

# levels, as shares of random order's final metric, that the labels needed are compared at
LEVELS = (0.8, 0.9, 0.95, 1.0)


def _mean(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(float(np.mean(got)), 4) if got else None


def _acceptance_bins(steps: Sequence[dict[str, Any]], width: int, detection: bool
                     ) -> dict[int, float]:
    """Share accepted (detection: of the true boxes) per bin of ``width`` labels, keyed by the
    bin's last label count."""
    bins: dict[int, list[dict[str, Any]]] = {}
    for s in steps:
        if s["outcome"] in SHOWN:
            bins.setdefault((s["labels_before"] // width + 1) * width, []).append(s)
    out = {}
    for end, part in bins.items():
        if detection:
            true = sum(s.get("boxes_true", 0) for s in part)
            if true:
                out[end] = sum(s["edits"]["unchanged"] for s in part) / true
        else:
            out[end] = sum(s["outcome"] == "accepted" for s in part) / len(part)
    return out


def aggregate(seed_dirs: Sequence[Path], bin_width: int) -> dict[str, Any]:
    """Mean figures per order over the seeds' ``summary.json`` and step logs."""
    summaries = [json.loads((d / "summary.json").read_text()) for d in seed_dirs]
    detection = summaries[0]["task"] == "detection"
    orders = [s["order"] for s in summaries[0]["sessions"]]
    out: dict[str, Any] = {"task": summaries[0]["task"], "classes": summaries[0]["classes"],
                           "images": summaries[0]["images"],
                           "seeds": [s["seed"] for s in summaries], "bin_width": bin_width,
                           "orders": {}}
    for order in orders:
        sessions = [next(x for x in s["sessions"] if x["order"] == order) for s in summaries]
        labels = sorted({c["labels"] for x in sessions for c in x["checkpoints"]})
        curve = [{"labels": n, "mean": _mean([next((c["metric"] for c in x["checkpoints"]
                                                    if c["labels"] == n), None)
                                              for x in sessions]),
                  "per_seed": [next((c["metric"] for c in x["checkpoints"]
                                     if c["labels"] == n), None) for x in sessions]}
                 for n in labels]
        bins = [_acceptance_bins([json.loads(line) for line in (d / f"{order}.jsonl").open()],
                                 bin_width, detection) for d in seed_dirs]
        ends = sorted({e for b in bins for e in b})
        out["orders"][order] = {
            "labels_until_first_suggestion": _mean(
                [x["labels_until_first_suggestion"] for x in sessions]),
            "accepted_after_first_model": _mean([x["accepted_after_first_model"]
                                                 for x in sessions]),
            "accepted_after": _mean([x.get("accepted_after") for x in sessions]),
            "suggested_after": _mean([x.get("suggested_after") for x in sessions]),
            "images_accepted_after": _mean([x.get("images_accepted_after") for x in sessions]),
            "after_labels": sessions[0].get("after_labels"),
            "boxes_unchanged_after": _mean([x.get("boxes_unchanged_after") for x in sessions]),
            "saved_share": _mean([x["annotator_seconds"]["saved_share"] for x in sessions]),
            "accepted_by_confidence": [
                {"min_confidence": rows[0]["min_confidence"],
                 "share_of_suggestions": _mean([r["share_of_suggestions"] for r in rows]),
                 "accepted": _mean([r["accepted"] for r in rows])}
                for rows in zip(*[x.get("accepted_by_confidence", []) for x in sessions],
                                strict=True)],
            "metric": curve,
            "acceptance": [{"labels": e, "mean": _mean([b.get(e) for b in bins])}
                           for e in ends],
        }
    random = out["orders"].get("random")
    if random:
        final = next((c["mean"] for c in reversed(random["metric"]) if c["mean"] is not None),
                     None)
        out["vs_random"] = {o: _labels_to(v["metric"], final) | {
            "random_labels": _labels_to(random["metric"], final)["labels"]}
            for o, v in out["orders"].items() if o != "random"}
        out["random_final_metric"] = final
        # fewer labels to the same accuracy, at several levels below random order's final one
        out["labels_to_level"] = [
            {"level": round(share * final, 4), "share_of_random_final": share,
             "labels": {o: _labels_to(v["metric"], share * final)["labels"]
                        for o, v in out["orders"].items()}}
            for share in LEVELS] if final is not None else []
    return out


def _labels_to(curve: Sequence[dict[str, Any]], target: float | None) -> dict[str, Any]:
    hit = next((c["labels"] for c in curve if target is not None and c["mean"] is not None
                and c["mean"] >= target - 1e-9), None)
    return {"labels": hit}


def markdown(agg: dict[str, Any], title: str) -> str:
    """The mean figures as a Markdown table (one column per order)."""
    orders = agg["orders"]
    names = list(orders)
    metric = "mAP@.5" if agg["task"] == "detection" else "accuracy"

    rows = [("labels until suggestions first appear",
             ["-" if o["labels_until_first_suggestion"] is None
              else f"{o['labels_until_first_suggestion']:.1f}"
              for o in orders.values()]),
            ("suggestions accepted unchanged, after the first model",
             [fmt(o["accepted_after_first_model"], True) for o in orders.values()]),
            (f"... after {orders[names[0]]['after_labels']} labels",
             [fmt(o["accepted_after"], True) for o in orders.values()])]
    if agg["task"] != "detection":
        rows += [(f"images that got a suggestion, after {orders[names[0]]['after_labels']} "
                  "labels", [fmt(o.get("suggested_after"), True) for o in orders.values()]),
                 (f"images accepted unchanged (of all), after "
                  f"{orders[names[0]]['after_labels']} labels",
                  [fmt(o.get("images_accepted_after"), True) for o in orders.values()])]
    if agg["task"] == "detection":
        rows.append((f"boxes accepted unchanged after {orders[names[0]]['after_labels']} labels",
                     [fmt(o["boxes_unchanged_after"], True) for o in orders.values()]))
    for i, cut in enumerate(orders[names[0]]["accepted_by_confidence"]):
        rows.append((f"... of those, at confidence >= {cut['min_confidence']}: share shown, "
                     "accepted", [confident_text(o["accepted_by_confidence"][i])
                                  for o in orders.values()]))
    rows.append(("annotator time saved (cost model)",
                 [fmt(o["saved_share"], True) for o in orders.values()]))
    for row in agg.get("labels_to_level", []):
        rows.append((f"labels to a mean {metric} of {row['level']:.3f} "
                     f"({row['share_of_random_final']:.0%} of random's final)",
                     [str(row["labels"][o] or "-") for o in names]))
    for i, point in enumerate(orders[names[0]]["metric"]):
        rows.append((f"{metric} after {point['labels']} labels (mean)",
                     [fmt(o["metric"][i]["mean"]) if i < len(o["metric"]) else "-"
                      for o in orders.values()]))
    lines = [f"## {title} (mean of seeds {', '.join(map(str, agg['seeds']))})", "",
             f"{agg['images']} labeled images, {len(agg['classes'])} classes ({agg['task']}).",
             "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    final = agg.get("random_final_metric")
    for order, cmp in agg.get("vs_random", {}).items():
        if final is None or not cmp["random_labels"]:
            continue
        share = fewer_text(1 - cmp["labels"] / cmp["random_labels"]) if cmp["labels"] \
            else "not reached"
        lines += ["", f"Random order's final mean {metric} {final:.3f} (first reached at "
                  f"{cmp['random_labels']} labels); {order} order: "
                  f"{cmp['labels'] or '-'} labels ({share})."]
    return "\n".join(lines) + "\n"


def plot(agg: dict[str, Any], title: str, path: Path) -> None:
    """Mean metric (with the seeds' range) and mean acceptance against labels (PNG)."""
    fig, left, right = two_panels()
    for order, o in agg["orders"].items():
        pts = [c for c in o["metric"] if c["mean"] is not None]
        if pts:
            xs = [c["labels"] for c in pts]
            line, = left.plot(xs, [c["mean"] for c in pts], marker="o", label=order)
            lo = [min(v for v in c["per_seed"] if v is not None) for c in pts]
            hi = [max(v for v in c["per_seed"] if v is not None) for c in pts]
            left.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
        acc = [c for c in o["acceptance"] if c["mean"] is not None]
        if acc:
            right.plot([c["labels"] for c in acc], [c["mean"] for c in acc], marker=".",
                       label=order)
    metric = "mAP@.5" if agg["task"] == "detection" else "accuracy"
    accepted = "boxes" if agg["task"] == "detection" else "suggestions"
    left.set(xlabel="labels", ylabel=f"{metric} on the held-out split (mean, range)",
             title=title)
    right.set(xlabel="labels", ylabel=f"{accepted} accepted unchanged "
              f"(per {agg['bin_width']} labels)", title="acceptance", ylim=(0, 1.02))
    save_panels(fig, path)


def write_aggregate(out: Path, seed_dirs: Sequence[Path], title: str) -> dict[str, Any]:
    """The seeds' means into ``out`` (``summary.json``, ``summary.md``, ``curves.png``):
    acceptance per 10 images (detection) or per 5 labels per class."""
    first = json.loads((seed_dirs[0] / "summary.json").read_text())
    width = 10 if first["task"] == "detection" else 5 * len(first["classes"])
    agg = aggregate(seed_dirs, width)
    (out / "summary.json").write_text(json.dumps(agg, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(agg, title))
    plot(agg, title, out / "curves.png")
    return agg
