"""ONNX export of the whole detector: uint8 image in, boxes in original pixels out.

The graph holds the preprocessing (HWC uint8 -> normalized float), the resize, FCOS, score
threshold and NMS, and maps boxes back to the original image, so serving needs only
onnxruntime (``models.runtime.OnnxDetector``). Per-class thresholds are applied by the caller.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from models.box_classifier import BoxClassifier, RescoredPipeline
from models.detection_types import BOXES_OUTPUT, IMAGE_INPUT, LABELS_OUTPUT, SCORES_OUTPUT
from models.detector import DetectorConfig, load_detector
from models.onnx_export import atomic_file

OPSET = 17
# The in-graph score floor: low, so the caller's per-class thresholds decide.
EXPORT_SCORE_THRESHOLD = 0.05


class DetectorPipeline(nn.Module):
    """uint8 RGB [H,W,3] -> (boxes [N,4], scores [N], labels [N]) in original image pixels.

    The PyTorch reference of the exported graph: the detector resizes and normalizes inside,
    and maps its boxes back to the input's size.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = image.permute(2, 0, 1).to(torch.float32) / 255.0
        (result,) = self.detector([x])
        return result["boxes"], result["scores"], result["labels"]


def build_pipeline(
    config: DetectorConfig,
    state_dict: dict[str, torch.Tensor],
    score_thresh: float = EXPORT_SCORE_THRESHOLD,
    box_classifier: BoxClassifier | None = None,
) -> nn.Module:
    """The export pipeline (eval, CPU) for trained weights, with the in-graph score floor;
    with ``box_classifier`` the detector's boxes are re-classified from crops inside it."""
    detector = load_detector(config, state_dict)
    detector.score_thresh = score_thresh
    pipeline = DetectorPipeline(detector).eval()
    return pipeline if box_classifier is None else RescoredPipeline(pipeline, box_classifier)


def export_detector_onnx(
    config: DetectorConfig,
    state_dict: dict[str, torch.Tensor],
    path: Path,
    score_thresh: float = EXPORT_SCORE_THRESHOLD,
    box_classifier: BoxClassifier | None = None,
) -> None:
    """Write the detector pipeline as ONNX (opset 17) to ``path``, atomically.

    Input "image" uint8 [height, width, 3]; outputs "boxes" float32 [N,4], "scores" float32
    [N], "labels" int64 [N]; height, width and N are dynamic. A ``box_classifier`` (the crop
    stage) becomes part of the same graph.
    """
    pipeline = build_pipeline(config, state_dict, score_thresh, box_classifier)
    # A non-square example that is not a multiple of 32, so no size gets baked in as a constant.
    generator = torch.Generator().manual_seed(0)  # leave the global RNG alone
    example = torch.randint(0, 256, (301, 403, 3), dtype=torch.uint8, generator=generator)
    with atomic_file(path) as tmp_name, torch.inference_mode(), warnings.catch_warnings():
        # dynamo=False: the legacy tracer exports torchvision's detection transform and NMS
        # with dynamic sizes; its deprecation notice and tracer warnings are expected.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        torch.onnx.export(
            pipeline,
            (example,),
            tmp_name,
            input_names=[IMAGE_INPUT],
            output_names=[BOXES_OUTPUT, SCORES_OUTPUT, LABELS_OUTPUT],
            dynamic_axes={
                IMAGE_INPUT: {0: "height", 1: "width"},
                BOXES_OUTPUT: {0: "detections"},
                SCORES_OUTPUT: {0: "detections"},
                LABELS_OUTPUT: {0: "detections"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
