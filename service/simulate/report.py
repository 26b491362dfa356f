"""Summaries of simulated sessions: labels until suggestions, acceptance, accuracy per label
budget, annotator time by per-action costs, and the plots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.simulate.run import Session

# confidence cuts the summary breaks classification acceptance down by
CONFIDENCE_CUTS = (0.5, 0.7, 0.9)
# step outcomes where the annotator saw a suggestion ("absent": no model yet; "withheld": a
# model, but not sure enough of this image to pre-fill anything)
SHOWN = ("accepted", "corrected")


def shown_steps(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps where a suggestion was shown."""
    return [s for s in steps if s["outcome"] in SHOWN]


@dataclass(frozen=True)
class Costs:
    """Seconds per annotator action (flags of ``prelabel simulate``).

    Drawing a box: 7.0 s with extreme clicking (Papadopoulos et al., ICCV 2017; about 35 s for
    a high-quality box drawn the classic way). The other costs are assumptions (verification
    in the 1-2 s range), not measurements: see the README.
    """

    tag: float = 3.0  # choose a tag from the list
    verify_tag: float = 1.0  # look at a suggested tag and accept it
    draw_box: float = 7.0
    verify_box: float = 1.6
    adjust_box: float = 3.5  # drag a suggested box into place
    relabel_box: float = 1.5
    delete_box: float = 1.0


def step_seconds(step: dict[str, Any], costs: Costs, detection: bool) -> tuple[float, float]:
    """(seconds without suggestions, seconds with this step's suggestion)."""
    if detection:
        # an image with nothing in it still takes a look to confirm
        manual = costs.draw_box * step["boxes_true"] or costs.verify_tag
        edits = step.get("edits")
        if edits is None:
            return manual, manual
        looked = edits["unchanged"] + edits["moved"] + edits["relabeled"] + edits["deleted"]
        assisted = (costs.verify_box * looked + costs.adjust_box * edits["moved"]
                    + costs.relabel_box * edits["relabeled"] + costs.delete_box * edits["deleted"]
                    + costs.draw_box * edits["added"]) or costs.verify_tag
        return manual, assisted
    manual = costs.tag * max(1, len(step["true_tags"]))
    if step["outcome"] not in SHOWN:
        return manual, manual
    if step["outcome"] == "accepted":
        return manual, costs.verify_tag
    return manual, costs.verify_tag + manual


def fmt(value: Any, pct: bool = False) -> str:
    """A figure for a table: - when missing, a percentage, 3 decimals or as is."""
    if value is None:
        return "-"
    text = f"{100 * value:.1f}%" if pct else f"{value:.3f}" if isinstance(value, float) \
        else str(value)
    # a tiny negative rounds to "-0.0%": no sign on a zero
    return text[1:] if text.startswith("-") and not text.strip("-0.%") else text


def fewer_text(share: float | None) -> str:
    """1 - labels needed / baseline labels, in words."""
    if share is None:
        return "not reached"
    return f"{100 * share:.1f}% fewer" if share >= 0 else f"{-100 * share:.1f}% more"


def confident_text(row: dict[str, Any]) -> str:
    """A confidence cut's share of suggestions and their acceptance, for a table."""
    return f"{fmt(row['share_of_suggestions'], True)}, {fmt(row['accepted'], True)}"


def summarize(session: Session, costs: Costs, after_labels: int | None = None) -> dict[str, Any]:
    """The figures of one session. ``after_labels``: also the acceptance from that many
    labels on (e.g. 5 per class, or 50 images)."""
    steps = session.steps
    detection = session.task == "detection"
    modeled = [s for s in steps if s["outcome"] != "absent"]
    shown = shown_steps(steps)
    out: dict[str, Any] = {
        "order": session.order, "task": session.task, "classes": len(session.classes),
        "pool": session.pool, "holdout": session.holdout, "labels": len(steps),
        "labels_until_first_model": modeled[0]["labels_before"] if modeled else None,
        "labels_until_first_suggestion": shown[0]["labels_before"] if shown else None,
        # of the suggestions shown; "suggested" is the share of images that got one, and
        # "images_accepted" the share of all images after the first model accepted unchanged
        "accepted_after_first_model": _share(shown),
        "suggested_after_first_model": _ratio(len(shown), len(modeled)),
        "images_accepted_after_first_model": _share(modeled),
        "seconds": round(session.seconds, 1), "training_wait_s": round(session.training_wait_s, 1),
        "embedding_wait_s": round(session.embedding_wait_s, 1),
        "checkpoints": session.checkpoints,
        "models": session.models,
    }
    if after_labels is not None:
        late = [s for s in shown if s["labels_before"] >= after_labels]
        late_modeled = [s for s in modeled if s["labels_before"] >= after_labels]
        out["after_labels"] = after_labels
        out["accepted_after"] = _share(late)
        out["suggested_after"] = _ratio(len(late), len(late_modeled))
        out["images_accepted_after"] = _share(late_modeled)
        if detection:
            out["boxes_unchanged_after"] = _box_share(late)
        else:
            out["accepted_by_confidence"] = by_confidence(late)
    if detection:
        out["boxes_unchanged_after_first_model"] = _box_share(shown)
    manual = assisted = 0.0
    for s in steps:
        m, a = step_seconds(s, costs, detection)
        manual, assisted = manual + m, assisted + a
    out["annotator_seconds"] = {"without_suggestions": round(manual, 1),
                                "with_suggestions": round(assisted, 1),
                                "saved_share": round(1 - assisted / manual, 4) if manual else None,
                                "costs": asdict(costs)}
    return out


def by_confidence(shown: Sequence[dict[str, Any]],
                  cuts: Sequence[float] = CONFIDENCE_CUTS) -> list[dict[str, Any]]:
    """Per confidence cut: the share of suggestions at or above it and how many of those were
    accepted (what a UI that only pre-fills confident tags would show and get)."""
    out = []
    for cut in cuts:
        sure = [s for s in shown if s.get("confidence") is not None and s["confidence"] >= cut]
        out.append({"min_confidence": cut,
                    "share_of_suggestions": round(len(sure) / len(shown), 4) if shown else None,
                    "accepted": _share(sure)})
    return out


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _share(steps: Sequence[dict[str, Any]]) -> float | None:
    if not steps:
        return None
    return round(sum(s["outcome"] == "accepted" for s in steps) / len(steps), 4)


def _box_share(steps: Sequence[dict[str, Any]]) -> float | None:
    true = sum(s.get("boxes_true", 0) for s in steps)
    kept = sum(s["edits"]["unchanged"] for s in steps if "edits" in s)
    return round(kept / true, 4) if true else None


def labels_to_reach(session: Session, target: float) -> int | None:
    """Fewest labels at which a checkpoint reached ``target`` (None if none did)."""
    for cp in session.checkpoints:
        if cp["metric"] is not None and cp["metric"] >= target - 1e-9:
            return int(cp["labels"])
    return None


def compare_orders(active: Session, baseline: Session) -> dict[str, Any]:
    """Labels the active order needs to reach the baseline's final checkpoint metric."""
    done = [c for c in baseline.checkpoints if c["metric"] is not None]
    if not done:
        return {"target": None}
    target, baseline_labels = done[-1]["metric"], done[-1]["labels"]
    baseline_first = labels_to_reach(baseline, target)
    active_labels = labels_to_reach(active, target)
    return {"target": target, "baseline_final_labels": baseline_labels,
            "baseline_labels_to_target": baseline_first, "active_labels_to_target": active_labels,
            "fewer_labels_share": (round(1 - active_labels / baseline_first, 4)
                                   if active_labels and baseline_first else None)}


def acceptance_curve(session: Session, window: int = 20) -> tuple[list[int], list[float]]:
    """Share of suggestions accepted over a sliding window of steps (detection: share of the
    true boxes accepted unchanged; whole images rarely are), against labels."""
    xs, ys = [], []
    shown = shown_steps(session.steps)
    window = min(window, len(shown))
    for end in range(window, len(shown) + 1, max(1, window // 4)) if window else ():
        part = shown[end - window:end]
        xs.append(part[-1]["labels_before"])
        if session.task == "detection":
            ys.append(_box_share(part) or 0.0)
        else:
            ys.append(sum(s["outcome"] == "accepted" for s in part) / window)
    return xs, ys


def two_panels() -> tuple[Any, Any, Any]:
    """A figure with two side-by-side axes (metric, acceptance), drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    return fig, left, right


def save_panels(fig: Any, path: Path) -> None:
    """Grid and legends on every axis; the figure written as a PNG and closed."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no line: nothing to name
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(sessions: Sequence[Session], title: str, path: Path) -> None:
    """Metric and acceptance against labels, one line per order (PNG)."""
    fig, left, right = two_panels()
    detection = bool(sessions) and sessions[0].task == "detection"
    window = 10 if detection else 20  # detection runs are short (tens of images)
    for s in sessions:
        pts = [(c["labels"], c["metric"]) for c in s.checkpoints if c["metric"] is not None]
        if pts:
            left.plot(*zip(*pts, strict=True), marker="o", label=s.order)
        xs, ys = acceptance_curve(s, window)
        if xs:
            right.plot(xs, ys, marker=".", label=s.order)
    metric = next((c.get("metric_name") for s in sessions for c in s.checkpoints
                   if c.get("metric_name")), "metric")
    left.set(xlabel="labels", ylabel=f"{metric} on the held-out split", title=title)
    accepted = "boxes" if detection else "suggestions"
    right.set(xlabel="labels", ylabel=f"{accepted} accepted unchanged (last {window} images)",
              title="acceptance", ylim=(0, 1.02))
    save_panels(fig, path)
