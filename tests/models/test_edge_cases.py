"""Table-driven edge cases: degenerate training input, metrics, thresholds, uncertainty."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from models.heads import HeadParams, predict_proba, train_head
from models.metrics import (
    NOT_SUGGESTED,
    choose_confidence_floor,
    choose_thresholds,
    classification_metrics,
)
from models.uncertainty import uncertainty
from tests.models.cards import CLASSES
from tests.models.conftest import CardData

CPU = torch.device("cpu")
C = len(CLASSES)


Case = tuple[np.ndarray, np.ndarray, Any]


def _with(x: np.ndarray, index: tuple[int, int], value: float) -> np.ndarray:
    out = x.copy()
    out[index] = value
    return out


DEGENERATE: dict[str, tuple[Callable[[CardData], Case], str]] = {
    "empty": (lambda d: (d.train_x[:0], d.train_y[:0], "multiclass"), "non-empty"),
    "empty multilabel": (
        lambda d: (d.ml_train_x[:0], d.ml_train_y[:0], "multilabel"),
        "non-empty",
    ),
    "one class": (
        lambda d: (d.train_x[d.train_y == 2], d.train_y[d.train_y == 2], "multiclass"),
        "at least 2 different classes",
    ),
    "nan embedding": (
        lambda d: (_with(d.train_x, (3, 7), np.nan), d.train_y, "multiclass"),
        "NaN",
    ),
    "inf embedding": (
        lambda d: (_with(d.train_x, (0, 0), np.inf), d.train_y, "multiclass"),
        "NaN or infinite",
    ),
    "no positives": (
        lambda d: (d.ml_train_x, np.zeros_like(d.ml_train_y), "multilabel"),
        "positive",
    ),
    "label out of range": (
        lambda d: (d.train_x, np.where(d.train_y == 0, C, d.train_y), "multiclass"),
        "class indices",
    ),
    "float labels": (
        lambda d: (d.train_x, d.train_y.astype(np.float32), "multiclass"),
        "integer",
    ),
    "multilabel wrong shape": (
        lambda d: (d.train_x, d.train_y, "multilabel"),
        "multilabel targets",
    ),
    "multilabel not binary": (
        lambda d: (d.ml_train_x, d.ml_train_y * 2, "multilabel"),
        "0 or 1",
    ),
    "unknown task": (lambda d: (d.train_x, d.train_y, "detection"), "task"),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_train_head_rejects_degenerate_input(cards: CardData, case: str) -> None:
    build, message = DEGENERATE[case]
    x, y, task = build(cards)
    with pytest.raises(ValueError, match=message):
        train_head(x, y, task, C, CPU)


def test_train_head_rejects_nan_loss(cards: CardData) -> None:
    huge = np.full_like(cards.train_x, 3e38)  # finite input whose loss overflows to inf/NaN
    with pytest.raises(ValueError, match="diverged"):
        train_head(huge, cards.train_y, "multiclass", C, CPU)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_class_with_zero_examples(cards: CardData, task: str) -> None:
    absent = CLASSES.index("queen")
    if task == "multiclass":
        keep = cards.train_y != absent
        x, y = cards.train_x[keep], cards.train_y[keep]
    else:
        x, y = cards.ml_train_x, cards.ml_train_y.copy()
        y[:, absent] = 0
    head = train_head(x, y, task, C, CPU)  # type: ignore[arg-type]
    assert head.weight.shape == (C, x.shape[1]) and head.thresholds.shape == (C,)
    probs = predict_proba(head, cards.test_x)
    assert np.isfinite(probs).all()
    assert probs[:, absent].max() < 0.2  # never learned: never confidently suggested
    others = np.delete(probs, absent, axis=1)
    assert probs[:, absent].mean() < others.mean()


# --- metrics --------------------------------------------------------------------------------


METRIC_CASES = [
    # (task, y_true, probs, expected aps by class, headline)
    (
        "multiclass",
        np.array([0, 0, 1, 1]),
        np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.55, 0.45, 0.0]]),
        [1.0, 1.0, None],
        ("accuracy", 0.75),
    ),
    (
        "multilabel",
        np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]]),
        np.array([[0.9, 0.2, 0.1], [0.1, 0.8, 0.3], [0.7, 0.3, 0.2]]),
        [1.0, 1.0, None],
        ("map", 1.0),
    ),
]


@pytest.mark.parametrize(("task", "y_true", "probs", "aps", "headline"), METRIC_CASES)
def test_classification_metrics(
    task: Any, y_true: np.ndarray, probs: np.ndarray, aps: list[Any], headline: Any
) -> None:
    names = ["a", "b", "absent"]
    report = classification_metrics(task, y_true, probs, names)
    json.dumps(report, allow_nan=False)  # strictly JSON: no NaN anywhere
    assert report["task"] == task and report["n_images"] == len(y_true)
    assert [report["per_class"][n]["ap"] for n in names] == pytest.approx(aps)
    assert report["per_class"]["absent"]["support"] == 0
    key, value = headline
    assert report[key] == pytest.approx(value)
    assert report["macro_ap"] == pytest.approx(1.0)
    if task == "multilabel":
        # b: predicted for image 1 only (0.3 < 0.5 on image 2) -> precision 1, recall 1/2
        assert report["per_class"]["b"]["precision"] == 1.0
        assert report["per_class"]["b"]["recall"] == 0.5
        assert report["micro_f1"] == pytest.approx(6 / 7)  # tp 3, fp 0, fn 1
        lowered = classification_metrics(
            task, y_true, probs, names, thresholds=np.array([0.5, 0.25, 0.5])
        )
        assert lowered["per_class"]["b"]["recall"] == 1.0


@pytest.mark.parametrize(
    ("task", "y_true", "probs", "message"),
    [
        ("multiclass", np.array([0, 1]), np.zeros((2, 2)), r"probs must be \[N, 3\]"),
        ("multiclass", np.array([0, 5]), np.zeros((2, 3)), "class indices"),
        ("multilabel", np.array([0, 1]), np.zeros((2, 3)), "multilabel y_true"),
    ],
)
def test_classification_metrics_rejects_bad_shapes(
    task: Any, y_true: np.ndarray, probs: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(task, y_true, probs, ["a", "b", "c"])


def test_classification_metrics_empty() -> None:
    report = classification_metrics("multiclass", np.zeros(0, int), np.zeros((0, 2)), ["a", "b"])
    assert report["n_images"] == 0 and report["accuracy"] is None and report["macro_ap"] is None
    json.dumps(report, allow_nan=False)


# --- thresholds -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y", "p", "expected"),
    [
        # separable: threshold between the lowest positive (0.6) and the highest negative (0.4)
        ([1, 1, 0, 0], [0.9, 0.6, 0.4, 0.1], 0.5),
        ([1, 1, 0, 0], [0.3, 0.25, 0.2, 0.05], 0.225),
        # one positive only (< min_positives) -> default
        ([1, 0, 0, 0], [0.9, 0.6, 0.4, 0.1], 0.5),
        # no positives -> default
        ([0, 0, 0, 0], [0.9, 0.6, 0.4, 0.1], 0.5),
        # best F1 keeps everything -> threshold at the lowest score
        ([1, 1, 1, 1], [0.9, 0.6, 0.4, 0.1], 0.1),
    ],
)
def test_choose_thresholds(y: list[int], p: list[float], expected: float) -> None:
    scores = np.array([p], dtype=np.float32).T  # float32, like onnxruntime's probabilities
    got = choose_thresholds(np.array([y]).T, scores, default=0.5, min_positives=2)
    assert got.shape == (1,) and got.dtype == np.float32
    assert got[0] == pytest.approx(expected)
    predicted = scores[:, 0] >= got[0]
    if sum(y) >= 2:
        assert predicted.tolist() == [bool(v) for v in y]


def test_choose_thresholds_per_class_default() -> None:
    y = np.array([[1, 0], [1, 0], [0, 0]])
    p = np.array([[0.8, 0.9], [0.7, 0.1], [0.2, 0.3]])
    got = choose_thresholds(y, p, default=0.4)
    assert got[0] == pytest.approx(0.45) and got[1] == pytest.approx(0.4)


def _top(conf: list[float], right: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probabilities whose top class is class 0 at ``conf``; truth per ``right``."""
    probs = np.array([[c, 1 - c] for c in conf], dtype=np.float32)
    return np.array([0 if r else 1 for r in right]), probs


def test_confidence_floor_is_the_lowest_precise_cut() -> None:
    # five right, two wrong, one right: 5/5 kept at 0.8, 5/6 at 0.7, 6/8 over all
    conf = [0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55]
    y, p = _top(conf, [True, True, True, True, True, False, False, True])
    got = choose_confidence_floor(y, p, min_precision=0.85, min_kept=5)
    assert got.min_confidence == pytest.approx(0.75) and got.precision == 1.0
    assert (got.coverage, got.support) == (5 / 8, 8)
    # kept predictions at or above the floor are right that often on this data
    kept = p.max(axis=1) >= got.min_confidence
    assert np.mean(p[kept].argmax(axis=1) == y[kept]) >= 0.85
    # a looser target reaches further down: 6/8 right over all of them
    assert choose_confidence_floor(y, p, min_precision=0.75, min_kept=5).min_confidence == 0.0
    assert choose_confidence_floor(y, p, min_precision=0.8, min_kept=5).min_confidence == \
        pytest.approx(0.65)


def test_confidence_floor_needs_evidence() -> None:
    y, p = _top([0.9, 0.8, 0.7, 0.6], [True, True, True, True])
    # four right answers are fewer than the five a cut must keep
    assert choose_confidence_floor(y, p, 0.85, min_kept=5).min_confidence == NOT_SUGGESTED
    y, p = _top([0.9, 0.8, 0.7, 0.6, 0.55, 0.52], [False, True, False, True, False, True])
    got = choose_confidence_floor(y, p, 0.85, min_kept=2)
    assert got.min_confidence == NOT_SUGGESTED and got.precision is None and got.coverage == 0
    assert NOT_SUGGESTED > 1.0  # above a softmax confidence rounded to 1.0
    empty = choose_confidence_floor(np.zeros(0, int), np.zeros((0, 3)), 0.85)
    assert empty.min_confidence == NOT_SUGGESTED and empty.support == 0


def test_confidence_floor_keeps_ties_together() -> None:
    # the 0.8s are one right and one wrong: a cut cannot keep one without the other
    y, p = _top([0.95, 0.9, 0.8, 0.8, 0.6], [True, True, True, False, False])
    got = choose_confidence_floor(y, p, min_precision=0.9, min_kept=2)
    assert got.min_confidence == pytest.approx(0.85) and got.coverage == 0.4


# --- uncertainty ----------------------------------------------------------------------------


def test_uncertainty_orders_multiclass_by_margin() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.5, 0.5, 0.0]])
    u = uncertainty("multiclass", probs)
    assert u.shape == (4,)
    assert u.tolist() == pytest.approx([0.0, 0.7, 0.95, 1.0])
    assert list(np.argsort(u)) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("thresholds", "probs", "expected"),
    [
        (None, [[0.5, 0.0]], 1.0),  # right at the threshold
        (None, [[1.0, 0.0]], 0.0),  # every class certain
        (None, [[0.75, 0.1]], 0.5),
        ([0.2, 0.5], [[0.6, 0.0]], 0.5),  # |0.6-0.2| / 0.8
        ([0.2, 0.5], [[0.1, 0.0]], 0.875),  # |0.1-0.2| / 0.8, closest class wins
    ],
)
def test_uncertainty_multilabel_closeness_to_threshold(
    thresholds: list[float] | None, probs: list[list[float]], expected: float
) -> None:
    t = None if thresholds is None else np.array(thresholds)
    u = uncertainty("multilabel", np.array(probs), t)
    assert u[0] == pytest.approx(expected)
    assert 0.0 <= u[0] <= 1.0


def test_uncertainty_on_real_predictions(cards: CardData) -> None:
    head = train_head(cards.train_x, cards.train_y, "multiclass", C, CPU)
    probs = predict_proba(head, cards.test_x)
    u = uncertainty("multiclass", probs)
    assert u.dtype == np.float32 and ((u >= 0) & (u <= 1)).all()
    wrong = probs.argmax(axis=1) != cards.test_y
    assert u[wrong].mean() > u[~wrong].mean()  # mistakes are flagged as uncertain


def test_head_params_validates_shapes() -> None:
    params = HeadParams(np.zeros((3, 4)), np.zeros(3), "softmax")
    assert params.thresholds.tolist() == [0.5, 0.5, 0.5] and params.temperature == 1.0
    with pytest.raises(ValueError, match="bias"):
        HeadParams(np.zeros((3, 4)), np.zeros(2), "softmax")
