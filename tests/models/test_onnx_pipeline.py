"""Linear-head ONNX graphs and the merged image -> probs pipeline on real photos."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import pytest
import torch

from models.backbone import EmbeddingModel
from models.heads import HeadParams, predict_proba, train_head
from models.onnx_export import build_head_onnx, merge_pipeline
from models.preprocess import batch_inputs
from models.runtime import OnnxModel
from tests.models.cards import CLASSES
from tests.models.conftest import CardData

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def multiclass_head(cards: CardData) -> HeadParams:
    return train_head(cards.train_x, cards.train_y, "multiclass", len(CLASSES), CPU)


@pytest.mark.parametrize(
    ("activation", "temperature"), [("softmax", 1.0), ("softmax", 1.7), ("sigmoid", 0.6)]
)
def test_head_onnx_matches_numpy_reference(
    cards: CardData,
    multiclass_head: HeadParams,
    activation: Literal["softmax", "sigmoid"],
    temperature: float,
) -> None:
    head = HeadParams(
        weight=multiclass_head.weight,
        bias=multiclass_head.bias,
        activation=activation,
        temperature=temperature,
    )
    blob = build_head_onnx(head.weight, head.bias, activation, temperature)
    model = onnx.load_model_from_string(blob)
    assert [i.name for i in model.graph.input] == ["embedding"]
    assert [o.name for o in model.graph.output] == ["probs"]
    got = OnnxModel(blob).run(cards.test_x.astype(np.float32))
    assert got.shape == (len(cards.test_x), len(CLASSES))
    assert np.abs(got - predict_proba(head, cards.test_x)).max() < 1e-5


def test_build_head_onnx_rejects_bad_input() -> None:
    w = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="bias"):
        build_head_onnx(w, np.zeros(2, np.float32), "softmax")
    with pytest.raises(ValueError, match="temperature"):
        build_head_onnx(w, np.zeros(3, np.float32), "softmax", 0.0)


def test_merged_pipeline_matches_torch_embeddings(
    backbone_onnx_path: Path,
    torch_embedder: EmbeddingModel,
    cards: CardData,
    multiclass_head: HeadParams,
) -> None:
    head = multiclass_head
    head_blob = build_head_onnx(head.weight, head.bias, head.activation, head.temperature)
    start = time.perf_counter()
    merged = merge_pipeline(backbone_onnx_path.read_bytes(), head_blob)
    assert time.perf_counter() - start < 5.0
    graph = onnx.load_model_from_string(merged).graph
    assert [i.name for i in graph.input] == ["image"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.output] == ["probs"]

    x = batch_inputs(cards.test_crops[:12])
    with torch.inference_mode():
        embeddings = torch_embedder(torch.from_numpy(x)).numpy()
    pipeline = OnnxModel(merged)
    assert pipeline.input_name == "image"
    got = pipeline.run(x)
    assert np.abs(got - predict_proba(head, embeddings)).max() < 1e-4
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_merge_rejects_mismatched_head(backbone_onnx_path: Path) -> None:
    head = build_head_onnx(np.zeros((2, 10), np.float32), np.zeros(2, np.float32), "sigmoid")
    with pytest.raises(ValueError, match="1280 dims but the head expects 10"):
        merge_pipeline(backbone_onnx_path.read_bytes(), head)
