"""Device selection and the onnxruntime wrapper."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from models.onnx_export import build_head_onnx
from models.runtime import OnnxModel, select_device

HAS_CUDA = torch.cuda.is_available()


def test_select_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="models.runtime"):
        assert select_device("cpu") == torch.device("cpu")
    assert "cpu" in caplog.text


def test_select_auto(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="models.runtime"):
        device = select_device("auto")
    assert device.type == ("cuda" if HAS_CUDA else "cpu")
    assert device.type in caplog.text


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error path")
def test_select_cuda_without_gpu_raises() -> None:
    with pytest.raises(RuntimeError, match="cuda"):
        select_device("cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_select_cuda_with_gpu() -> None:
    assert select_device("cuda").type == "cuda"


def test_select_unknown_setting() -> None:
    with pytest.raises(ValueError, match="auto"):
        select_device("tpu")


def test_onnx_model_from_bytes_and_path(tmp_path: Path) -> None:
    weight = np.eye(3, 5, dtype=np.float32)
    blob = build_head_onnx(weight, np.zeros(3, np.float32), "sigmoid")
    path = tmp_path / "head.onnx"
    path.write_bytes(blob)
    x = np.arange(10, dtype=np.float32).reshape(2, 5) - 4
    from_bytes = OnnxModel(blob, threads=1)
    from_path = OnnxModel(path)
    assert from_bytes.input_name == from_path.input_name == "embedding"
    np.testing.assert_allclose(from_bytes.run(x), 1 / (1 + np.exp(-x[:, :3])), atol=1e-6)
    np.testing.assert_array_equal(from_bytes.run(x), from_path.run(x))
    with pytest.raises(ValueError, match="threads"):
        OnnxModel(blob, threads=0)
