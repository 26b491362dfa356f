"""The crop re-classification stage on real card photos: rotations, rescoring rules, training
views; its effect on mAP and its ONNX parity are tested with trained detectors in
test_detection_model.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.box_classifier import (
    CPU_CROPS_PER_S,
    BoxClassifierConfig,
    CropClassifier,
    _training_views,
    crop_boxes,
    fit_box_classifier,
    quarter_turns,
    rescore,
    train_box_classifier,
    view_of_crop,
    views_within,
)
from models.detection_data import load_voc_samples
from models.detection_types import Detections, DetectionSample
from models.heads import HeadParams
from models.views import VIEWS
from tests.models.cards import CARDS

CARD_CLASSES = ("ace", "king", "nine", "jack", "queen", "ten")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cards() -> list[DetectionSample]:
    samples, _ = load_voc_samples(sorted((CARDS / "train").glob("*.xml"))[:40], CARD_CLASSES)
    return samples


def _random_head(num_classes: int, seed: int = 0) -> HeadParams:
    rng = np.random.default_rng(seed)
    return HeadParams(weight=rng.normal(0, 0.05, (num_classes, 1280)).astype(np.float32),
                      bias=np.zeros(num_classes, np.float32), activation="softmax",
                      temperature=1.0)


def test_quarter_turns_match_rot90() -> None:
    x = torch.randn(2, 3, 224, 224)
    for turns in range(-1, 5):
        assert torch.equal(quarter_turns(x, turns), torch.rot90(x, turns % 4, (2, 3)))
        assert torch.equal(quarter_turns(x[0], turns), torch.rot90(x[0], turns % 4, (1, 2)))


def test_crop_is_the_box_resized() -> None:
    image = torch.zeros(3, 100, 200)
    image[:, 20:60, 50:150] = 255.0  # a white box on black
    crop = crop_boxes(image, torch.tensor([[50.0, 20.0, 150.0, 60.0]]))
    assert crop.shape == (1, 3, 224, 224)
    # bilinear samples at pixel centres: only the outermost crop pixels mix in the border
    assert float(crop[..., 8:-8, 8:-8].min()) == pytest.approx(255.0)
    assert float(crop.mean()) > 0.97 * 255.0
    wider = crop_boxes(image, torch.tensor([[0.0, 0.0, 200.0, 100.0]]))
    assert float(wider.mean()) == pytest.approx(255.0 * 0.2, rel=0.02)  # box = 20% of image


def test_rescore_keeps_one_box_per_object_and_multiplies_scores(
    cards: list[DetectionSample],
) -> None:
    sample = next(s for s in cards if len(s.boxes) >= 1)
    image = torch.tensor(sample.image).permute(2, 0, 1).float()
    box = torch.from_numpy(sample.boxes[:1])
    shifted = box + torch.tensor([[3.0, 2.0, 3.0, 2.0]])  # IoU > 0.5 with box: same object
    elsewhere = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    boxes = torch.cat([box, shifted, elsewhere, elsewhere + 30])
    scores = torch.tensor([0.9, 0.6, 0.3, 0.07])
    labels = torch.tensor([1, 2, 3, 4])
    config = BoxClassifierConfig(score_floor=0.0, min_box_score=0.05, max_boxes=2)
    classifier = CropClassifier(_random_head(6), config.tta_quarter_turns)
    with torch.inference_mode():
        out_boxes, out_scores, out_labels = rescore(image, boxes, scores, labels,
                                                    classifier.classify_boxes, config)
        probs = classifier(crop_boxes(image, boxes[[0, 2]]))
    # two objects re-classified (the overlapping pair merged into its best box), every class of
    # each; the third object (beyond max_boxes) passes through with the detector's label
    assert len(out_scores) == 2 * 6 + 1
    assert (out_scores[:-1] >= out_scores[1:]).all()
    passed = (out_boxes == boxes[3]).all(dim=1)
    assert int(passed.sum()) == 1 and int(out_labels[passed]) == 4
    assert float(out_scores[passed]) == pytest.approx(0.07)
    expected = torch.tensor([0.9, 0.3])[:, None] * probs
    for b, s, label in zip(out_boxes[~passed], out_scores[~passed], out_labels[~passed],
                           strict=True):
        row = 0 if torch.equal(b, boxes[0]) else 1
        assert row == 0 or torch.equal(b, boxes[2])
        assert float(s) == pytest.approx(float(expected[row, label]), rel=1e-5)
    # probabilities sum to one per box, so each object's scores sum to its detector score
    assert float(out_scores[~passed].sum()) == pytest.approx(1.2, rel=1e-4)

    floored = dataclasses.replace(config, score_floor=0.2, min_box_score=0.1)
    with torch.inference_mode():
        _, kept, _ = rescore(image, boxes, scores, labels, classifier.classify_boxes, floored)
    # the 0.07 box is neither re-classified nor passed on; every other score reaches the floor
    assert len(kept) < len(out_scores) - 1 and (kept >= 0.2).all()

    one = dataclasses.replace(config, max_boxes=1)  # the other objects keep their own labels
    with torch.inference_mode():
        kept_boxes, kept, kept_labels = rescore(image, boxes, scores, labels,
                                                classifier.classify_boxes, one)
    assert len(kept) == 6 + 2
    second = (kept_boxes == boxes[2]).all(dim=1)
    assert kept_labels[second].tolist() == [3] and float(kept[second]) == pytest.approx(0.3)

    with torch.inference_mode():
        empty = rescore(image, torch.zeros(0, 4), torch.zeros(0),
                        torch.zeros(0, dtype=torch.int64), classifier.classify_boxes, config)
    assert [tuple(t.shape) for t in empty] == [(0, 4), (0,), (0,)]


def test_training_views_are_capped_and_class_balanced() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    boxes = np.tile(np.asarray([[4.0, 4.0, 40.0, 40.0]], np.float32), (60, 1))
    labels = np.asarray([0] * 50 + [1] * 10)  # class 1 is rare
    sample = DetectionSample(image, boxes, labels)
    few = BoxClassifierConfig(max_views_per_box=8, max_training_views=240)
    views, y = _training_views([sample], few)
    assert len(views) == len(y) == 240 and len(y) == 60 * 4  # 4 views per box fit the cap
    assert {v.turns for v in views} == {0, 1, 2, 3}
    assert {v.view for v in views} == {None}  # the quarter turns come first
    tight = BoxClassifierConfig(max_training_views=20)
    views, y = _training_views([sample], tight)
    assert len(y) == 20
    assert 5 <= int((y == 1).sum()) <= 15  # balanced draw, not the 1-in-6 of the boxes


def test_roomy_training_views_add_the_classification_views(cards: list[DetectionSample]
                                                          ) -> None:
    """With room, each box gets its 8 turned views and then each classification view of its
    upright labeled box, all with the box's label."""
    sample = cards[0]
    views, y = _training_views([sample], BoxClassifierConfig())
    per_box = 8 + len(VIEWS)
    assert len(views) == per_box * len(sample.labels)
    for k, box_views in enumerate(views[i:i + per_box] for i in range(0, len(views), per_box)):
        assert [v.view for v in box_views[8:]] == list(VIEWS)
        assert all(v.turns == 0 and np.array_equal(v.box, sample.boxes[k])
                   for v in box_views[8:])
        assert y[k * per_box:(k + 1) * per_box].tolist() == [sample.labels[k]] * per_box


def test_view_of_crop_applies_the_named_view(cards: list[DetectionSample]) -> None:
    image = torch.tensor(cards[0].image).permute(2, 0, 1).float()
    crop = crop_boxes(image, torch.from_numpy(cards[0].boxes[:1]))[0].round()
    mirrored = view_of_crop(crop, "mirror")
    assert mirrored.shape == crop.shape
    assert torch.equal(mirrored, crop.flip(-1))
    turned = view_of_crop(crop, "turn+30")
    assert turned.shape == crop.shape and not torch.equal(turned, crop)
    assert float(turned[:, 0, 0].sub(128).abs().max()) < 1  # the turned-in corner is grey
    assert float(view_of_crop(crop, "darker").mean()) < float(crop.mean())


def test_training_needs_two_classes(cards: list[DetectionSample]) -> None:
    one = [DetectionSample(s.image, s.boxes, np.zeros_like(s.labels)) for s in cards[:3]]
    with pytest.raises(ValueError, match="two classes"):
        train_box_classifier(one, 6)


def test_crop_head_learns_the_ranks(cards: list[DetectionSample]) -> None:
    """A head trained on the first images' cards names most cards of later images."""
    train, held = cards[:28], cards[28:]
    config = BoxClassifierConfig(max_views_per_box=2)
    classifier = train_box_classifier(train, len(CARD_CLASSES), config=config)
    assert classifier.training_views == 2 * sum(len(s.labels) for s in train)
    crop_classifier = CropClassifier(classifier.head, config.tta_quarter_turns)
    right = total = 0
    with torch.inference_mode():
        for s in held:
            image = torch.tensor(s.image).permute(2, 0, 1).float()
            probs = crop_classifier(crop_boxes(image, torch.from_numpy(s.boxes)))
            right += int((probs.argmax(1).numpy() == s.labels).sum())
            total += len(s.labels)
    print(f"crop head: {right}/{total} held-out cards named right")
    assert total >= 10 and right / total >= 0.5  # chance is 1/6


def test_budget_caps_training_views(cards: list[DetectionSample]) -> None:
    """On the CPU a crop-stage budget bounds the views embedded: the validation crops first,
    then what is left, never under one view per labeled box nor over the config's cap."""
    train, val = cards[:10], cards[10:14]
    dets = [Detections(s.boxes, np.ones(len(s.labels), np.float32), s.labels) for s in val]
    objects = sum(len(s.labels) for s in train)
    config = BoxClassifierConfig()
    val_crops = sum(len(s.labels) + 1 for s in val)  # each box, plus the padding box
    room = 3 * objects + val_crops
    assert views_within(room / CPU_CROPS_PER_S, objects, dets, config) == 3 * objects
    assert views_within(0.0, objects, dets, config) == objects
    assert views_within(1e6, objects, dets, config) == config.max_training_views

    tight = fit_box_classifier(train, val, dets, len(CARD_CLASSES), budget_s=0.0)
    assert tight.training_views == objects
    roomy = fit_box_classifier(train, val, dets, len(CARD_CLASSES), budget_s=1e6)
    assert roomy.training_views == config.max_views_per_box * objects
