"""Session fixtures: the exported ONNX backbone and real card embeddings, computed once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.backbone import EmbeddingModel
from models.onnx_export import export_backbone_onnx
from models.preprocess import batch_inputs
from models.runtime import OnnxModel
from tests.models.cards import CARDS, CLASSES, crops, load_split, open_displayed

SHOTS = 5  # labelled train crops per class
MULTILABEL_TRAIN_IMAGES = 90
_BATCH = 32


@dataclass(frozen=True)
class CardData:
    """Card crops/images with their labels and ONNX-backbone embeddings."""

    train_crops: list[Image.Image]
    train_y: np.ndarray  # [N] class index
    train_x: np.ndarray  # [N,1280]
    test_crops: list[Image.Image]
    test_y: np.ndarray
    test_x: np.ndarray
    ml_train_y: np.ndarray  # [M,C] ranks present in each whole image
    ml_train_x: np.ndarray
    ml_test_y: np.ndarray
    ml_test_x: np.ndarray


def embed(model: OnnxModel, images: Sequence[Image.Image]) -> np.ndarray:
    """Embed images in batches through the single preprocessing path."""
    parts = [model.run(batch_inputs(images[i : i + _BATCH])) for i in range(0, len(images), _BATCH)]
    return np.concatenate(parts)


def _tags(labels: frozenset[str]) -> list[int]:
    return [int(name in labels) for name in CLASSES]


@pytest.fixture(scope="session")
def backbone_onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CARDS.is_dir():
        pytest.fail(f"dataset missing: {CARDS}")
    path = tmp_path_factory.mktemp("onnx") / "backbone.onnx"
    export_backbone_onnx(path)
    return path


@pytest.fixture(scope="session")
def backbone_onnx(backbone_onnx_path: Path) -> OnnxModel:
    return OnnxModel(backbone_onnx_path)


@pytest.fixture(scope="session")
def cards(backbone_onnx: OnnxModel) -> CardData:
    rng = np.random.default_rng(0)
    pool = [(c, CLASSES.index(label)) for item in load_split("train") for c, label in crops(item)]
    train: list[tuple[Image.Image, int]] = []
    for k in range(len(CLASSES)):
        of_class = [p for p in pool if p[1] == k]
        train += [of_class[i] for i in rng.choice(len(of_class), SHOTS, replace=False)]
    test = [(c, CLASSES.index(label)) for item in load_split("test") for c, label in crops(item)]

    train_items = load_split("train")
    picked = sorted(rng.choice(len(train_items), MULTILABEL_TRAIN_IMAGES, replace=False))
    ml_train = [train_items[i] for i in picked]
    ml_test = load_split("test")
    return CardData(
        train_crops=[c for c, _ in train],
        train_y=np.array([y for _, y in train]),
        train_x=embed(backbone_onnx, [c for c, _ in train]),
        test_crops=[c for c, _ in test],
        test_y=np.array([y for _, y in test]),
        test_x=embed(backbone_onnx, [c for c, _ in test]),
        ml_train_y=np.array([_tags(it.labels) for it in ml_train]),
        ml_train_x=embed(backbone_onnx, [open_displayed(it) for it in ml_train]),
        ml_test_y=np.array([_tags(it.labels) for it in ml_test]),
        ml_test_x=embed(backbone_onnx, [open_displayed(it) for it in ml_test]),
    )


@pytest.fixture(scope="session")
def torch_embedder() -> EmbeddingModel:
    return EmbeddingModel().eval()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module's training tests (restored afterwards): the CI box has
    2 cores shared with other jobs, where one thread is faster (README)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
