"""FCOS detector on real photos: short CPU training, COCO mAP floor, ONNX parity, negatives."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from models.box_classifier import (
    BoxClassifierConfig,
    fit_box_classifier,
    rescore_detections,
    train_box_classifier,
)
from models.detection_data import load_voc_samples
from models.detection_eval import choose_score_thresholds, detection_metrics
from models.detection_export import build_pipeline, export_detector_onnx
from models.detection_train import (
    DetectorTrainingCancelled,
    DetectorTrainResult,
    TrainConfig,
    train_detector,
)
from models.detection_types import DetectionSample
from models.detection_warmup import freeze_backbone
from models.detector import (
    DetectorConfig,
    build_detector,
    config_for,
    load_detector,
    predict_detections,
)
from models.runtime import OnnxDetector
from tests.models.cards import CARDS, DATASETS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

BCCD = DATASETS / "bccd"
BCCD_CLASSES = ("RBC", "WBC", "Platelets")
CARD_CLASSES = ("ace", "king", "nine", "jack", "queen", "ten")
# Short CPU runs for the quality floors (models/README.md has 300 s runs). They are capped in
# epochs, not seconds: under a time budget a slower or busier CI machine trained less and missed
# the floors (bccd 0.14 in 150 s; cards with the crop stage 0.33 in 150 s), while an epoch cap
# gives the same training anywhere, only sooner or later.
# bccd, 2 head-first epochs + 1 end to end: test mAP@.5 0.82 (220 s beside another run on the
# 2-core box; one epoch reaches ~0.67).
TRAIN_EPOCHS = 3
MAP50_FLOOR = 0.6
# Cards, 100 labeled images, 3 head-first + 4 end-to-end epochs: test mAP@.5 0.224 (the same to
# the last digit in two runs; the best validation mAP@.5 0.58 at epoch 6; 240 s beside another
# run).
CARDS_EPOCHS, CARDS_HEAD_FIRST = 7, 0.3
CARDS_MAP50_FLOOR = 0.15
# The same run with the crop stage (models/box_classifier.py, 800 training views): 0.498 (the
# 150 s budget had given 0.555 and 0.33, depending on the machine).
CARDS_RESCORED_MAP50_FLOOR = 0.4


def _bccd_split(split: str) -> list[Path]:
    ids = (BCCD / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    return [BCCD / "Annotations" / f"{i}.xml" for i in ids]


@pytest.fixture(scope="module")
def bccd() -> dict[str, list[DetectionSample]]:
    out = {}
    for split in ("train", "val", "test"):
        out[split], _ = load_voc_samples(_bccd_split(split), BCCD_CLASSES)
    return out


@pytest.fixture(scope="module")
def trained(bccd: dict[str, list[DetectionSample]]) -> DetectorTrainResult:
    config = config_for(bccd["train"], len(BCCD_CLASSES))
    assert config.min_size == 320 and config.anchor_sizes == (4, 8, 16, 32, 64)  # platelets
    settings = TrainConfig(max_epochs=TRAIN_EPOCHS, time_budget_s=None, threads=1, seed=0)
    # A third of the validation split keeps the per-epoch validation cheap.
    return train_detector(bccd["train"], bccd["val"][::3], config, "cpu", settings)


def test_short_training_reaches_map_floor(
    trained: DetectorTrainResult, bccd: dict[str, list[DetectionSample]]
) -> None:
    assert trained.device == "cpu"
    assert trained.stop_reason in ("max_epochs", "early_stop")
    assert trained.epochs <= TRAIN_EPOCHS and trained.head_epochs == 2
    assert trained.history and all(h.val_map50 is not None for h in trained.history)
    assert [h.seconds for h in trained.history] == sorted(h.seconds for h in trained.history)
    assert trained.best_map50 == max(h.val_map50 or 0.0 for h in trained.history)
    model = load_detector(trained.config, trained.state_dict)
    test = bccd["test"]
    metrics = detection_metrics(
        predict_detections(model, [s.image for s in test]), test, BCCD_CLASSES
    )
    print("bccd test after a short CPU run:", json.dumps(metrics))
    assert metrics["map50"] >= MAP50_FLOOR
    assert 0.0 < metrics["map"] < metrics["map50"]
    assert all(c["ap50"] is not None for c in metrics["per_class"].values())

    val = bccd["val"][::3]
    val_predictions = predict_detections(model, [s.image for s in val])
    thresholds = choose_score_thresholds(val_predictions, val, len(BCCD_CLASSES))
    assert ((thresholds > 0.05) & (thresholds < 1.0)).all()
    at = detection_metrics(val_predictions, val, BCCD_CLASSES, thresholds)
    for entry in at["per_class"].values():
        assert entry["precision"] is not None and entry["recall"] is not None


def test_short_training_on_cards_reaches_map_floor() -> None:
    """Cards: large objects, six look-alike classes (the hard part is telling the ranks apart)."""
    xmls = sorted((CARDS / "train").glob("*.xml"))
    val, _ = load_voc_samples(xmls[::7][:15], CARD_CLASSES)
    train, _ = load_voc_samples([x for i, x in enumerate(xmls) if i % 7][:100], CARD_CLASSES)
    test, _ = load_voc_samples(sorted((CARDS / "test").glob("*.xml")), CARD_CLASSES)
    config = config_for(train, len(CARD_CLASSES))
    assert config.anchor_sizes is None  # cards are large: the standard level sizes
    settings = TrainConfig(max_epochs=CARDS_EPOCHS, time_budget_s=None, threads=1, seed=0,
                           head_first=CARDS_HEAD_FIRST)
    result = train_detector(train, val, config, "cpu", settings)
    assert result.head_epochs > 0 and result.cached_variants >= 1
    assert {h.phase for h in result.history} == {"head", "finetune"}
    model = load_detector(result.config, result.state_dict)
    predictions = predict_detections(model, [s.image for s in test])
    metrics = detection_metrics(predictions, test, CARD_CLASSES)
    print("cards test after a short CPU run:", json.dumps(metrics))
    assert metrics["map50"] >= CARDS_MAP50_FLOOR

    # The crop stage names the ranks from crops of the image. Whether the worker keeps it is
    # decided on 15 validation images, a noisy verdict (once 0.633 vs 0.655): here it is
    # always kept (min_gain -1) and judged on the 143 boxes of the test set instead.
    fit = fit_box_classifier(train, val, predict_detections(model, [s.image for s in val]),
                             len(CARD_CLASSES), config=BoxClassifierConfig(min_gain=-1.0))
    print("crop stage:", json.dumps(fit.summary()))
    assert fit.classifier is not None
    assert fit.val_map50_rescored is not None and fit.val_map50_detector is not None
    rescored = detection_metrics(rescore_detections(test, predictions, fit.classifier), test,
                                 CARD_CLASSES)
    print("cards test with the crop stage:", json.dumps(rescored))
    assert rescored["map50"] >= CARDS_RESCORED_MAP50_FLOOR
    assert rescored["map50"] > metrics["map50"]


def test_config_round_trips_through_json(trained: DetectorTrainResult) -> None:
    blob = json.dumps(trained.config.to_dict())
    config = DetectorConfig.from_dict(json.loads(blob))
    assert config == trained.config
    model = load_detector(config, trained.state_dict)
    assert not model.training
    with pytest.raises(ValueError, match="unknown"):
        DetectorConfig.from_dict({**json.loads(blob), "colour": "red"})


def _parity_images(bccd: dict[str, list[DetectionSample]]) -> list[np.ndarray]:
    cards, _ = load_voc_samples(sorted((CARDS / "test").glob("*.xml"))[:2], CARD_CLASSES)
    blood = bccd["test"][0].image
    return [
        blood,  # 480x640
        bccd["test"][5].image[37:437, 11:],  # 400x629, not a multiple of 32
        cards[0].image,  # 504x378 portrait
        np.ascontiguousarray(cards[1].image[::2, ::2]),  # 252x189, upscaled by the graph
        np.ascontiguousarray(np.repeat(np.repeat(blood[:300, :350], 2, 0), 2, 1)),  # 600x700
    ]


def _compare(runtime: OnnxDetector, pipeline: torch.nn.Module, images: list[np.ndarray],
             box_tolerance: float = 0.5, score_tolerance: float = 1e-3) -> int:
    """Assert onnxruntime and the PyTorch pipeline give the same detections; count them."""
    compared = 0
    for image in images:
        got = runtime.predict(image)
        with torch.inference_mode():
            boxes, scores, labels = (t.numpy() for t in pipeline(torch.from_numpy(image.copy())))
        assert got.boxes.dtype == np.float32 and got.labels.dtype == np.int64
        # Compare above the in-graph floor (0.05) so no detection sits at the cut. Near-equal
        # scores may come out in another order, so pair each reference detection with the
        # closest unused ONNX one of the same label.
        keep_got, keep_ref = got.scores > 0.1, scores > 0.1
        assert keep_got.sum() == keep_ref.sum() > 0, image.shape
        got_boxes, got_scores, got_labels = (a[keep_got] for a in got)
        used = np.zeros(len(got_boxes), dtype=bool)
        for box, score, label in zip(
            boxes[keep_ref], scores[keep_ref], labels[keep_ref], strict=True
        ):
            distance = np.abs(got_boxes - box).max(axis=1)
            distance[used | (got_labels != label)] = np.inf
            j = int(np.argmin(distance))
            assert distance[j] <= box_tolerance, (image.shape, box, label)
            assert abs(got_scores[j] - score) <= score_tolerance
            used[j] = True
        height, width = image.shape[:2]
        assert (got.boxes[:, 2] <= width + 1e-3).all() and (got.boxes[:, 3] <= height + 1e-3).all()
        compared += int(keep_got.sum())
    return compared


def test_onnx_matches_pytorch(
    trained: DetectorTrainResult, bccd: dict[str, list[DetectionSample]], tmp_path: Path
) -> None:
    path = tmp_path / "detector.onnx"
    export_detector_onnx(trained.config, trained.state_dict, path)
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["image"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["height", "width", 3]
    assert [o.name for o in graph.output] == ["boxes", "scores", "labels"]

    runtime = OnnxDetector(path)
    pipeline = build_pipeline(trained.config, trained.state_dict)
    assert _compare(runtime, pipeline, _parity_images(bccd)) >= 20
    with pytest.raises(ValueError, match="uint8"):
        runtime.predict(np.zeros((32, 32, 3), np.float32))


def test_onnx_with_crop_stage_matches_pytorch(
    trained: DetectorTrainResult, bccd: dict[str, list[DetectionSample]], tmp_path: Path
) -> None:
    """The crop re-classifier (RoIAlign, backbone, head, rescoring) inside the same graph."""
    classifier = train_box_classifier(bccd["train"][:20], len(BCCD_CLASSES),
                                      config=BoxClassifierConfig(max_training_views=300))
    path = tmp_path / "rescored.onnx"
    export_detector_onnx(trained.config, trained.state_dict, path, box_classifier=classifier)
    runtime = OnnxDetector(path)
    pipeline = build_pipeline(trained.config, trained.state_dict, box_classifier=classifier)
    assert _compare(runtime, pipeline, _parity_images(bccd)) >= 20
    # when the detector finds nothing the crop stage gets no boxes: empty outputs, not an error
    silent = tmp_path / "silent.onnx"
    export_detector_onnx(trained.config, trained.state_dict, silent, score_thresh=1.01,
                         box_classifier=classifier)
    empty = OnnxDetector(silent).predict(bccd["test"][0].image)
    assert empty.boxes.shape == (0, 4) and empty.scores.shape == (0,)
    assert empty.labels.shape == (0,)


def test_runtime_does_not_import_torch() -> None:
    code = (
        "import sys; import models.runtime; "
        "assert 'torch' not in sys.modules, 'runtime imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_fcos_loss_is_finite_on_images_without_boxes() -> None:
    torch.manual_seed(0)
    model = build_detector(DetectorConfig(num_classes=3, min_size=128, max_size=192)).train()
    images = [torch.rand(3, 128, 160), torch.rand(3, 150, 128)]
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, [empty, empty])
    assert losses["classification"] > 0
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()


def test_training_with_negative_images_and_cancellation(
    bccd: dict[str, list[DetectionSample]],
) -> None:
    positives = bccd["train"][:2]
    negatives = [
        DetectionSample(s.image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        for s in bccd["train"][2:6]
    ]
    config = DetectorConfig(num_classes=len(BCCD_CLASSES), min_size=160, max_size=224)
    settings = TrainConfig(max_epochs=1, time_budget_s=None, batch_size=2, threads=1,
                           head_first=0.0)
    seen: list[float] = []
    result = train_detector(
        negatives + positives, positives, config, "cpu", settings, progress=seen.append
    )
    assert result.epochs == 1.0 and result.stop_reason == "max_epochs"
    assert result.head_epochs == 0.0 and result.cached_variants == 0
    assert len(result.history) == 1 and math.isfinite(result.history[0].loss)
    assert seen == sorted(seen) and seen[-1] == 1.0

    # Head first: 2 of 4 epochs on cached features, then 2 end to end. Two passes draw one
    # view of each image each: the third view asked for would never be used, so it is not made.
    two_phase = dataclasses.replace(settings, max_epochs=4, head_first=0.5, cached_variants=3)
    result = train_detector(negatives + positives, positives, config, "cpu", two_phase)
    assert result.head_epochs == 2.0 and result.cached_variants == 2
    one_view = dataclasses.replace(two_phase, cached_variants=1)
    assert train_detector(negatives + positives, positives, config, "cpu",
                          one_view).cached_variants == 1
    assert result.epochs == 4.0 and result.stop_reason == "max_epochs"
    # passes of 3 steps are shorter than 200 images: the head phase validates once, at its end
    assert [h.phase for h in result.history] == ["head", "finetune", "finetune"]
    assert [h.epoch for h in result.history] == [2.0, 3.0, 4.0]
    assert result.best_map50 == max(h.val_map50 or 0.0 for h in result.history)

    model = build_detector(config, pretrained=False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    restore = freeze_backbone(model)
    assert not any(p.requires_grad for p in model.backbone.body.parameters())
    assert any(p.requires_grad for p in model.head.parameters())
    restore()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before

    with pytest.raises(DetectorTrainingCancelled):
        train_detector(positives, [], config, "cpu", settings, should_stop=lambda: True)
    with pytest.raises(DetectorTrainingCancelled):  # in the head-first phase
        train_detector(positives, [], config, "cpu", two_phase, should_stop=lambda: True)
    with pytest.raises(ValueError, match="nothing to learn"):
        train_detector(negatives, [], config, "cpu", settings)
    with pytest.raises(ValueError, match="0-based"):
        bad = DetectionSample(positives[0].image, positives[0].boxes, positives[0].labels + 3)
        train_detector([bad], [], config, "cpu", settings)
