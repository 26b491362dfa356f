"""Backbone loading, preprocessing and ONNX export against real card photos."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.backbone import (
    EMBED_DIM,
    INPUT_SIZE,
    MEAN,
    STD,
    EmbeddingModel,
    Preprocess,
    _map_state_dict,
    backbone_id,
    load_backbone,
)
from models.preprocess import batch_inputs, to_model_input
from models.runtime import OnnxModel
from tests.models.cards import crops, load_split
from tests.models.conftest import CardData


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("network access attempted")


def test_load_backbone_offline_embeds_real_crop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    backbone = load_backbone()
    assert not backbone.training
    crop, _ = crops(load_split("train")[0])[0]
    model = EmbeddingModel(backbone)
    with torch.inference_mode():
        emb = model(torch.from_numpy(batch_inputs([crop])))
    assert emb.shape == (1, EMBED_DIM)
    assert emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert emb.abs().sum() > 0


def test_backbone_id_is_stable() -> None:
    ident = backbone_id()
    assert re.fullmatch(rf"efficientnet_lite0-{INPUT_SIZE}-[0-9a-f]{{12}}", ident)
    assert backbone_id() == ident


def test_weight_mapping_rejects_mismatch() -> None:
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    good = {"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2), "_fc.weight": torch.ones(1)}
    assert list(_map_state_dict(good, target)) == ["a.weight", "a.bias"]
    with pytest.raises(RuntimeError, match="shape"):
        _map_state_dict({"x.weight": torch.ones(3, 3), "x.bias": torch.ones(2)}, target)
    with pytest.raises(RuntimeError, match="expects 2"):
        _map_state_dict({"x.weight": torch.ones(2, 3)}, target)


def test_preprocess_normalizes_nhwc_uint8() -> None:
    x = torch.randint(0, 256, (2, INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8)
    out = Preprocess()(x)
    expected = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / (
        torch.tensor(STD).view(1, 3, 1, 1)
    )
    assert out.shape == (2, 3, INPUT_SIZE, INPUT_SIZE)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_to_model_input_squashes_without_crop() -> None:
    img = Image.new("RGB", (300, 100), (10, 20, 30))
    img.paste((250, 0, 0), (0, 0, 150, 100))  # left half red
    arr = to_model_input(img)
    assert arr.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    assert arr.dtype == np.uint8
    assert tuple(arr[112, 5]) == (250, 0, 0)
    assert tuple(arr[112, INPUT_SIZE - 5]) == (10, 20, 30)
    with pytest.raises(ValueError, match="RGB"):
        to_model_input(img.convert("L"))
    assert batch_inputs([]).shape == (0, INPUT_SIZE, INPUT_SIZE, 3)
    assert batch_inputs([img, img]).shape == (2, INPUT_SIZE, INPUT_SIZE, 3)


def test_onnx_export_matches_torch(
    backbone_onnx_path: Path,
    backbone_onnx: OnnxModel,
    torch_embedder: EmbeddingModel,
    cards: CardData,
) -> None:
    assert [p.name for p in backbone_onnx_path.parent.iterdir()] == [backbone_onnx_path.name]
    assert backbone_onnx.input_name == "image"
    x = batch_inputs(cards.test_crops[:8])
    with torch.inference_mode():
        expected = torch_embedder(torch.from_numpy(x)).numpy()
    got = backbone_onnx.run(x)
    assert got.shape == (8, EMBED_DIM)
    assert np.abs(got - expected).max() < 1e-3
    # dynamic batch: one image alone gives the same embedding as inside a batch
    np.testing.assert_allclose(backbone_onnx.run(x[:1])[0], got[0], atol=1e-4)
