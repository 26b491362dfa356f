"""The canonical prediction's suggestions: box thresholds, one name per object, and the
multiclass confidence floor."""

from __future__ import annotations

import numpy as np
import pytest

from service.adapters import suggestion_out, without_low
from service.labelstudio.label_config import parse_label_config
from service.labelstudio.results import ls_prediction
from service.prediction import Prediction


def _boxes(cross_class_iou: float) -> Prediction:
    # a: a card named "king" (0.9) and, almost on top of it, "queen" (0.8); a second queen
    # elsewhere (0.7); a low king on the first card (0.2, under its threshold); a queen on
    # the other one's edge (IoU 0.33 with the king, 0.6).
    return Prediction(
        task="detection", class_names=("king", "queen"), width=200, height=200,
        scores=np.array([0.9, 0.8], np.float32), thresholds=np.array([0.3, 0.3], np.float32),
        boxes=np.array([[0, 0, 40, 60], [2, 2, 40, 60], [100, 100, 40, 60], [0, 0, 40, 60],
                        [20, 0, 40, 60]], np.float32),
        box_labels=np.array([0, 1, 1, 0, 1]),
        box_scores=np.array([0.9, 0.8, 0.7, 0.2, 0.6], np.float32),
        cross_class_iou=cross_class_iou)


def test_second_name_of_an_object_is_not_suggested() -> None:
    items = _boxes(0.5).box_items()
    assert [(label, round(conf, 1), ok) for label, conf, _, ok in items] == [
        ("king", 0.9, True), ("queen", 0.8, False), ("queen", 0.7, True),
        ("queen", 0.6, True), ("king", 0.2, False)]
    out = suggestion_out(_boxes(0.5), model_id=1, version=1, suggestion_id="s", image_id=1)
    assert [b.below_threshold for b in out.boxes] == [False, True, False, False, True]


def test_rule_off_or_looser_keeps_both_names() -> None:
    assert [ok for *_, ok in _boxes(1.0).box_items()] == [True, True, True, True, False]
    # an IoU of 0.86 (the two names' boxes) is under a 0.9 rule
    assert [ok for *_, ok in _boxes(0.9).box_items()] == [True, True, True, True, False]


def test_a_box_under_its_threshold_hides_nothing() -> None:
    pred = _boxes(0.5)
    raised = Prediction(**{**pred.__dict__, "thresholds": np.array([0.95, 0.3], np.float32)})
    # the king (0.9) is no longer suggested, so the queen on the same card is; the rule never
    # hides a box of the same class (the detector's own NMS deals with those)
    assert [(label, ok) for label, _, _, ok in raised.box_items()] == [
        ("king", False), ("queen", True), ("queen", True), ("queen", True), ("king", False)]


def _tags(min_confidence: float) -> Prediction:
    return Prediction(task="multiclass", class_names=("king", "queen", "ace"), width=50,
                      height=80, scores=np.array([0.2, 0.7, 0.1], np.float32),
                      thresholds=np.full(3, 0.5, np.float32), min_confidence=min_confidence)


def test_multiclass_top_class_needs_the_floor() -> None:
    assert _tags(0.0).tags() == [("queen", pytest.approx(0.7))]
    assert _tags(0.69).tag_items() == [("queen", pytest.approx(0.7), True)]
    unsure = _tags(0.75)
    assert unsure.tags() == [] and unsure.tag_items() == [("queen", pytest.approx(0.7), False)]
    assert [label for label, _ in unsure.ranked()] == ["queen", "king", "ace"]

    # stored with the flag; served without the tag unless include_low; never pre-filled in
    # Label Studio
    payload = suggestion_out(unsure, model_id=1, version=2, suggestion_id="s",
                             image_id=3).model_dump(mode="json")
    assert payload["tags"] == [{"label": "queen", "confidence": pytest.approx(0.7),
                                "below_threshold": True}]
    assert without_low(payload)["tags"] == [] and len(without_low(payload)["scores"]) == 3
    choices = parse_label_config(
        '<View><Image name="image" value="$image"/><Choices name="rank" toName="image">'
        '<Choice value="king"/><Choice value="queen"/><Choice value="ace"/></Choices></View>')
    assert ls_prediction(payload, choices, "v2") == {"result": [], "score": 0.0,
                                                     "model_version": "v2"}
    sure = suggestion_out(_tags(0.6), 1, 2, "s", 3).model_dump(mode="json")
    assert without_low(sure) == sure
    assert ls_prediction(sure, choices, "v2")["result"][0]["value"] == {"choices": ["queen"]}
