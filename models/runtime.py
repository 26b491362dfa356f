"""Inference runtime: onnxruntime sessions and torch device selection."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from models.detection_types import (
    BOXES_OUTPUT,
    IMAGE_INPUT,
    LABELS_OUTPUT,
    SCORES_OUTPUT,
    Detections,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def _providers() -> list[str]:
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    return providers


class OnnxModel:
    """An onnxruntime session over a serialized model (bytes) or a model file (Path).

    ``threads`` sets intra-op threads (default: onnxruntime's choice, one per physical core).
    """

    def __init__(self, model: bytes | Path, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads sleep instead of spinning: API and workers share the CPU cores in
        # the embedded deployment; measured on a busy 2-core box, 2 threads took 14-18 ms per
        # image without spinning vs 37-39 ms with it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, sess_options=options, providers=_providers())
        self.input_name: str = self.session.get_inputs()[0].name
        self.output_name: str = self.session.get_outputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run the model on one input array and return its first output."""
        (out,) = self.session.run([self.output_name], {self.input_name: x})
        return np.asarray(out)


class OnnxDetector(OnnxModel):
    """An exported detector (``models.detection_export``): one RGB uint8 image per call."""

    _OUTPUTS = (BOXES_OUTPUT, SCORES_OUTPUT, LABELS_OUTPUT)

    def __init__(self, model: bytes | Path, threads: int | None = None) -> None:
        super().__init__(model, threads)
        names = (self.input_name, *(o.name for o in self.session.get_outputs()))
        if names != (IMAGE_INPUT, *self._OUTPUTS):
            raise ValueError(f"not an exported detector: inputs/outputs are {names}")

    def predict(self, image: np.ndarray) -> Detections:
        """Boxes (xyxy, original pixels), scores and 0-based labels above the in-graph floor."""
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be RGB uint8 [H,W,3], got {image.dtype} {image.shape}")
        boxes, scores, labels = self.session.run(list(self._OUTPUTS), {IMAGE_INPUT: image})
        return Detections(
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            scores=np.asarray(scores, dtype=np.float32).reshape(-1),
            labels=np.asarray(labels, dtype=np.int64).reshape(-1),
        )


def select_device(setting: str) -> torch.device:
    """Resolve "auto" | "cpu" | "cuda" to a torch device; raise if CUDA is asked but absent."""
    import torch  # here, not at import: serving (onnxruntime only) must not load torch

    choice = setting.strip().lower()
    if choice == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif choice == "cpu":
        device = torch.device("cpu")
    elif choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device 'cuda' was requested but torch.cuda.is_available() is False "
                "(no GPU or no CUDA-enabled torch build); use 'auto' or 'cpu'"
            )
        device = torch.device("cuda")
    else:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {setting!r}")
    if device.type == "cuda":
        logger.info("using device cuda (%s)", torch.cuda.get_device_name(device))
    else:
        logger.info("using device cpu (setting %r)", setting)
    return device
