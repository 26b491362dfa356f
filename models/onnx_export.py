"""ONNX export of the embedding backbone, linear heads built directly, and their merge."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# The IR version that torch's exporter writes for opset 17; heads use it too so they merge.
IR_VERSION = 8
IMAGE_INPUT = "image"
EMBEDDING = "embedding"
PROBS_OUTPUT = "probs"


@contextmanager
def atomic_file(path: Path) -> Iterator[str]:
    """A temporary name beside ``path`` that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp_name
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; artifacts are not secret
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def export_backbone_onnx(path: Path) -> None:
    """Export EmbeddingModel to ``path``: "image" uint8 [N,224,224,3] -> "embedding" [N,1280]."""
    from models.backbone import EmbeddingModel

    export_embedding_model(EmbeddingModel().eval(), path)


def export_embedding_model(model: Any, path: Path) -> None:
    """Export any uint8 NHWC -> embedding module (pretrained or fine-tuned), atomically."""
    import torch  # imported here: building and merging heads must not need torch

    from models.constants import INPUT_SIZE

    example = torch.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8)
    with atomic_file(path) as tmp_name, torch.inference_mode(), warnings.catch_warnings():
        # dynamo=False is deliberate (checked to export this graph exactly); silence the
        # legacy-exporter deprecation notice.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            tmp_name,
            input_names=[IMAGE_INPUT],
            output_names=[EMBEDDING],
            dynamic_axes={IMAGE_INPUT: {0: "batch"}, EMBEDDING: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def build_head_onnx(
    weight: np.ndarray,
    bias: np.ndarray,
    activation: Literal["softmax", "sigmoid"],
    temperature: float = 1.0,
) -> bytes:
    """Linear head as ONNX: "embedding" [N,D] -> "probs" = act((e @ W.T + b) / T) [N,C]."""
    w = np.asarray(weight, dtype=np.float32)
    b = np.asarray(bias, dtype=np.float32)
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise ValueError(f"expected weight [C,D] and bias [C], got {w.shape} and {b.shape}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    num_classes, dim = w.shape
    # Fold the temperature into the parameters: Gemm computes e @ (W/T).T + b/T.
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w / np.float32(temperature)), "head/weight"),
        numpy_helper.from_array(b / np.float32(temperature), "head/bias"),
    ]
    nodes = [
        helper.make_node(
            "Gemm", [EMBEDDING, "head/weight", "head/bias"], ["head/logits"], transB=1
        ),
        helper.make_node(
            "Softmax" if activation == "softmax" else "Sigmoid",
            ["head/logits"],
            [PROBS_OUTPUT],
            **({"axis": -1} if activation == "softmax" else {}),
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "linear_head",
        [helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(PROBS_OUTPUT, TensorProto.FLOAT, ["batch", num_classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="prelabel",
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def merge_pipeline(backbone_onnx: bytes, head_onnx: bytes) -> bytes:
    """Chain backbone and head into one model: "image" uint8 -> "probs"."""
    backbone = onnx.load_model_from_string(backbone_onnx)
    head = onnx.load_model_from_string(head_onnx)
    produced, consumed = (
        _last_dim(backbone.graph.output, EMBEDDING),
        _last_dim(head.graph.input, EMBEDDING),
    )
    if produced != consumed:
        raise ValueError(f"backbone embeds to {produced} dims but the head expects {consumed}")
    if head.ir_version != backbone.ir_version:
        head.ir_version = backbone.ir_version
    merged = onnx.compose.merge_models(
        backbone,
        head,
        io_map=[(EMBEDDING, EMBEDDING)],
    )
    return merged.SerializeToString()


def _last_dim(values: Sequence[onnx.ValueInfoProto], name: str) -> int:
    for value in values:
        if value.name == name:
            return int(value.type.tensor_type.shape.dim[-1].dim_value)
    raise ValueError(f"model has no {name!r} tensor among {[v.name for v in values]}")
