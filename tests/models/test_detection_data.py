"""Detection data, VOC reading and COCO metrics on the real bccd / cards annotations (fast)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.detection_data import (
    DetectionDataset,
    load_voc_samples,
    read_voc,
    resized_size,
)
from models.detection_eval import (
    CROSS_CLASS_IOU,
    NOT_SUGGESTED,
    choose_score_thresholds,
    cross_class_iou,
    detection_metrics,
    image_matches,
    resampled_map50,
)
from models.detection_types import Detections, DetectionSample
from tests.models.cards import CARDS, DATASETS

BCCD = DATASETS / "bccd"
BCCD_CLASSES = ("RBC", "WBC", "Platelets")
CARD_CLASSES = ("ace", "king", "nine", "jack", "queen", "ten")


def _bccd(stem: str) -> Path:
    return BCCD / "Annotations" / f"{stem}.xml"


@pytest.mark.parametrize("stem", ["BloodImage_00338", "BloodImage_00343"])
def test_voc_reader_rejects_zero_area_boxes(stem: str) -> None:
    annotation = read_voc(_bccd(stem), BCCD_CLASSES)
    (rejected,) = annotation.rejected
    assert rejected.file.endswith(f"{stem}.xml")
    assert rejected.name == "RBC"
    assert "zero area" in rejected.reason and "xmin=" in rejected.reason
    assert annotation.image_path == BCCD / "JPEGImages" / f"{stem}.jpg"
    assert len(annotation.boxes) == len(annotation.labels) > 0
    widths = annotation.boxes[:, 2] - annotation.boxes[:, 0]
    heights = annotation.boxes[:, 3] - annotation.boxes[:, 1]
    assert (widths > 0).all() and (heights > 0).all()


def test_voc_reader_converts_one_based_corners() -> None:
    annotation = read_voc(CARDS / "train" / "IMG_2385.xml", CARD_CLASSES)
    # <xmin>92 <ymin>183 <xmax>223 <ymax>348, king
    np.testing.assert_array_equal(annotation.boxes, [[91.0, 182.0, 223.0, 348.0]])
    assert annotation.labels.tolist() == [CARD_CLASSES.index("king")]
    assert (annotation.width, annotation.height) == (378, 504)
    assert annotation.rejected == ()


_OBJECTS = {
    "ok": ("ace", "10", "20", "110", "220"),
    "partly_outside": ("ace", "-5", "400", "50", "600"),
    "zero_area": ("ace", "30", "30", "30", "80"),
    "inverted": ("ace", "90", "30", "40", "80"),
    "outside": ("ace", "500", "30", "600", "80"),
    "unknown_class": ("joker", "10", "20", "110", "220"),
    "not_a_number": ("ace", "ten", "20", "110", "220"),
}


def test_voc_reader_edge_cases(tmp_path: Path) -> None:
    shutil.copy(CARDS / "train" / "IMG_2385.JPG", tmp_path / "img.JPG")
    objects = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, x1, y1, x2, y2 in _OBJECTS.values()
    )
    xml = tmp_path / "img.xml"
    xml.write_text(
        "<annotation><filename>img.jpg</filename><size><width>378</width>"
        f"<height>504</height><depth>3</depth></size>{objects}</annotation>"
    )
    annotation = read_voc(xml, CARD_CLASSES)
    # The named file differs in case from the one on disk: found by stem.
    assert annotation.image_path == tmp_path / "img.JPG"
    np.testing.assert_array_equal(annotation.boxes, [[9, 19, 110, 220], [0, 399, 50, 504]])
    reasons = {r.index: r.reason for r in annotation.rejected}
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert "zero area" in reasons[2]
    assert "inverted" in reasons[3]
    assert "outside" in reasons[4]
    assert "unknown class 'joker'" in reasons[5]
    assert "non-numeric" in reasons[6]


@pytest.mark.parametrize(
    ("boxes", "labels", "match"),
    [
        ([[0, 0, 5, float("nan")]], [0], "finite"),
        ([[5, 0, 4, 5]], [0], "x2 > x1"),
        ([[0, 0, 5]], [0], r"\[K,4\]"),
        ([[0, 0, 5, 5]], [0, 1], r"\[K,4\]"),
        ([[0, 0, 5, 5]], [-1], "0-based"),
    ],
)
def test_sample_rejects_bad_targets(boxes: list, labels: list, match: str) -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        DetectionSample(image, np.array(boxes, np.float32), np.array(labels))


def test_sample_accepts_no_boxes() -> None:
    sample = DetectionSample(np.zeros((10, 12, 3), np.uint8), np.zeros((0, 4)), np.zeros(0))
    assert sample.boxes.shape == (0, 4) and sample.labels.dtype == np.int64
    with pytest.raises(ValueError, match="uint8"):
        DetectionSample(np.zeros((10, 12, 3), np.float32), [], [])


@pytest.fixture(scope="module")
def bccd_val() -> list[DetectionSample]:
    ids = (BCCD / "ImageSets" / "Main" / "val.txt").read_text().split()
    samples, rejected = load_voc_samples([_bccd(i) for i in ids[:12]], BCCD_CLASSES)
    assert rejected == []
    return samples


def test_dataset_resizes_like_the_model_and_augments_within_the_frame(
    bccd_val: list[DetectionSample],
) -> None:
    plain = DetectionDataset(bccd_val[:4], min_size=320, max_size=640)
    image, target = plain[0]
    assert image.dtype == torch.float32 and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert tuple(image.shape[1:]) == resized_size(480, 640, 320, 640) == (320, 426)
    scale = torch.tensor([426 / 640, 320 / 480] * 2)
    np.testing.assert_allclose(target["boxes"], torch.from_numpy(bccd_val[0].boxes) * scale)

    torch.manual_seed(0)
    augmented = DetectionDataset(bccd_val[:4], min_size=320, max_size=640, augment=True)
    for index in range(4):
        for _ in range(5):
            image, target = augmented[index]
            boxes = target["boxes"]
            assert tuple(image.shape[1:]) == (320, 426)
            assert boxes.shape[0] == target["labels"].shape[0] <= len(bccd_val[index].boxes)
            assert (boxes[:, 2:] > boxes[:, :2]).all()
            assert (boxes >= 0).all() and (boxes[:, 0::2] <= 426).all()
            assert (boxes[:, 1::2] <= 320).all()


def _as_predictions(samples: list[DetectionSample]) -> list[Detections]:
    return [
        Detections(s.boxes.copy(), np.ones(len(s.boxes), np.float32), s.labels.copy())
        for s in samples
    ]


def test_metrics_perfect_empty_and_missing_class(bccd_val: list[DetectionSample]) -> None:
    perfect = detection_metrics(_as_predictions(bccd_val), bccd_val, BCCD_CLASSES)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    assert perfect["n_images"] == len(bccd_val)
    counts = np.bincount(np.concatenate([s.labels for s in bccd_val]), minlength=3)
    for c, name in enumerate(BCCD_CLASSES):
        assert perfect["per_class"][name]["support"] == counts[c]

    none = [Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, int))]
    empty = detection_metrics(none * len(bccd_val), bccd_val, BCCD_CLASSES)
    assert empty["map"] == 0.0 and empty["map50"] == 0.0

    # A 4th class with no objects has no AP; it does not drag the mean down.
    four = detection_metrics(_as_predictions(bccd_val), bccd_val, (*BCCD_CLASSES, "other"))
    assert four["per_class"]["other"]["ap"] is None and four["map50"] == pytest.approx(1.0)

    with pytest.raises(ValueError, match="predictions"):
        detection_metrics(_as_predictions(bccd_val)[:-1], bccd_val, BCCD_CLASSES)


def test_metrics_iou_half_but_not_strict(bccd_val: list[DetectionSample]) -> None:
    # White cells only (one or two per image, apart): no neighbour can steal a match.
    wbc = [
        DetectionSample(s.image, s.boxes[s.labels == 1], s.labels[s.labels == 1]) for s in bccd_val
    ]
    # Shift every box right by just under a third of its width: IoU just over 0.5.
    shifted = []
    for p in _as_predictions(wbc):
        boxes = p.boxes.copy()
        w = boxes[:, 2] - boxes[:, 0]
        boxes[:, 0] += w / 3.01
        boxes[:, 2] += w / 3.01
        shifted.append(Detections(boxes, p.scores, p.labels))
    metrics = detection_metrics(shifted, wbc, BCCD_CLASSES)
    assert metrics["map50"] == pytest.approx(1.0)
    assert metrics["map"] == pytest.approx(0.1)  # matched at IoU .5 only, of .5:.05:.95


def test_thresholds_maximise_f1_with_fallback(bccd_val: list[DetectionSample]) -> None:
    # Every true box at score 0.8 plus, per image, a false box of each class at 0.3.
    predictions = []
    for s in bccd_val:
        false_boxes = np.array([[0, 0, 3, 3]] * 3, np.float32)
        predictions.append(
            Detections(
                np.concatenate([s.boxes, false_boxes]),
                np.concatenate([np.full(len(s.boxes), 0.8), np.full(3, 0.3)]).astype(np.float32),
                np.concatenate([s.labels, [0, 1, 2]]),
            )
        )
    thresholds = choose_score_thresholds(predictions, bccd_val, num_classes=4, default=0.25)
    np.testing.assert_allclose(thresholds, [0.55, 0.55, 0.55, 0.25])
    metrics = detection_metrics(predictions, bccd_val, (*BCCD_CLASSES, "other"), thresholds)
    for name in BCCD_CLASSES:
        entry = metrics["per_class"][name]
        assert entry["precision"] == 1.0 and entry["recall"] == 1.0 and entry["fp"] == 0
    assert metrics["per_class"]["other"]["recall"] is None
    low = detection_metrics(predictions, bccd_val, (*BCCD_CLASSES, "other"), [0.2] * 4)
    assert low["per_class"]["RBC"]["fp"] == len(bccd_val)
    assert choose_score_thresholds(predictions, bccd_val, 4)[3] == NOT_SUGGESTED


def test_thresholds_need_half_of_the_kept_boxes_right(bccd_val: list[DetectionSample]) -> None:
    # WBC: the true box at 0.3 under two false ones at 0.8 per image; the best F1 (0.5) keeps
    # everything, but only a third of those boxes are right: WBC is not suggested at all.
    predictions = []
    for s in bccd_val:
        wbc = s.boxes[s.labels == 1]
        false_boxes = np.array([[0, 0, 3, 3], [5, 5, 9, 9]], np.float32)
        predictions.append(Detections(
            np.concatenate([s.boxes, false_boxes]),
            np.concatenate([np.where(s.labels == 1, 0.3, 0.8), [0.8, 0.8]]).astype(np.float32),
            np.concatenate([s.labels, [1, 1]])))
        assert len(wbc) >= 1
    loose = choose_score_thresholds(predictions, bccd_val, 3, min_precision=0.0)
    assert loose[1] == pytest.approx(0.3)
    strict = choose_score_thresholds(predictions, bccd_val, 3)
    assert strict[1] == NOT_SUGGESTED
    assert strict[0] == pytest.approx(0.8) and strict[2] == pytest.approx(0.8)
    metrics = detection_metrics(predictions, bccd_val, BCCD_CLASSES, strict)
    assert metrics["per_class"]["WBC"]["tp"] == 0 and metrics["per_class"]["RBC"]["fp"] == 0


def test_cross_class_iou_follows_the_labels() -> None:
    # In both shared sets different-class boxes never overlap much (max IoU 0.37 on cards):
    # the rule takes its floor.
    cards, _ = load_voc_samples(sorted((CARDS / "train").glob("*.xml")), CARD_CLASSES)
    assert cross_class_iou(cards) == CROSS_CLASS_IOU
    # Labels that put two classes on one object (IoU 0.81) move the rule out of their way.
    box = np.array([[0, 0, 100, 100], [0, 0, 90, 90]], np.float32)
    stacked = DetectionSample(np.zeros((120, 120, 3), np.uint8), box, np.array([0, 1]))
    assert cross_class_iou([*cards, stacked]) == pytest.approx(0.91)
    same = DetectionSample(np.zeros((120, 120, 3), np.uint8), box, np.array([0, 0]))
    assert cross_class_iou([same]) == CROSS_CLASS_IOU
    assert cross_class_iou([DetectionSample(
        np.zeros((120, 120, 3), np.uint8), box[[0, 0]], np.array([0, 1]))]) == 1.0


def test_resampled_map50_is_cocos_on_the_resample(bccd_val: list[DetectionSample]) -> None:
    rng = np.random.default_rng(3)
    predictions = []
    for s in bccd_val:  # truth moved a little, a few boxes lost, a few false ones, noisy scores
        keep = rng.random(len(s.boxes)) > 0.2
        boxes = s.boxes[keep] + rng.normal(0, 4, (int(keep.sum()), 4)).astype(np.float32)
        false_boxes = rng.uniform(0, 300, (3, 2)).astype(np.float32)
        boxes = np.concatenate([boxes, np.concatenate([false_boxes, false_boxes + 40], 1)])
        labels = np.concatenate([s.labels[keep], rng.integers(0, 3, 3)])
        predictions.append(Detections(boxes, rng.random(len(boxes)).astype(np.float32), labels))
    matches = image_matches(predictions, bccd_val, 3)
    n = len(bccd_val)
    every = detection_metrics(predictions, bccd_val, BCCD_CLASSES)["map50"]
    assert resampled_map50(matches, np.ones(n, np.int64)) == pytest.approx(every, abs=1e-12)
    assert 0.3 < every < 0.95
    for _ in range(5):
        idx = rng.integers(0, n, n)
        coco = detection_metrics([predictions[i] for i in idx], [bccd_val[i] for i in idx],
                                 BCCD_CLASSES)["map50"]
        got = resampled_map50(matches, np.bincount(idx, minlength=n))
        assert got == pytest.approx(coco, abs=1e-12)
    assert resampled_map50(matches, np.zeros(n, np.int64)) is None
