"""Label-preserving views: what each transform does, and that a head trained also on the views
of a few real labeled card crops generalises better than one on the crops alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.heads import predict_proba, train_head
from models.runtime import OnnxModel
from models.views import PREDICTION_VIEWS, VIEWS, average_over_views, view_key
from tests.models.cards import CLASSES, crops, load_split
from tests.models.conftest import CardData, embed

CPU = torch.device("cpu")
DRAWS, PER_CLASS = 4, 10
# measured per draw: +0.028, +0.056, +0.021, +0.000 (mean +0.026); 10 draws on all 547
# crops of both splits: +0.053 (benchmarks/results/head_views.md)
MIN_MEAN_GAIN = 0.01


def test_views_keep_the_picture() -> None:
    img = Image.new("RGB", (60, 40), (200, 10, 10))
    img.putpixel((0, 0), (0, 255, 0))
    mirrored = VIEWS["mirror"](img)
    assert mirrored.size == (60, 40) and mirrored.getpixel((59, 0)) == (0, 255, 0)
    assert VIEWS["centre90"](img).size == (54, 36)
    turned = VIEWS["turn+15"](img)
    assert turned.mode == "RGB" and turned.width > 60 and turned.height > 40
    assert turned.getpixel((0, 0)) == (128, 128, 128)  # the corners the turn uncovers
    assert turned.getpixel((turned.width // 2, turned.height // 2)) == (200, 10, 10)
    assert VIEWS["turn-15"](img).size == turned.size
    wider = VIEWS["turn+30"](img)
    assert wider.width > turned.width and VIEWS["turn-30"](img).size == wider.size
    assert VIEWS["brighter"](img).getpixel((30, 20)) == (255, 13, 13)  # clipped at 255
    assert VIEWS["darker"](img).getpixel((30, 20)) == (150, 7, 7)
    assert all(VIEWS[v](img).size == (60, 40) for v in ("mirror", "brighter", "darker"))


def test_average_over_views_uses_the_views_each_image_has() -> None:
    plain = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    calls = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x

    out = average_over_views(run, plain, [(np.array([0, 2]), np.array([[0.0, 1.0], [1.0, 0.0]])),
                                          (np.array([0]), np.array([[0.5, 0.5]])),
                                          (np.array([], int), np.zeros((0, 2)))])
    np.testing.assert_allclose(out, [[0.5, 0.5], [0.0, 1.0], [0.75, 0.25]])
    assert out.dtype == np.float32 and calls == [3, 2, 1]  # an empty view is not run
    assert set(PREDICTION_VIEWS) <= set(VIEWS)


def test_view_key_names_the_view() -> None:
    assert view_key("efficientnet_lite0-224-abc", "mirror") == "efficientnet_lite0-224-abc|mirror"
    with pytest.raises(ValueError, match="unknown view"):
        view_key("efficientnet_lite0-224-abc", "upside-down")


def test_views_improve_the_few_shot_head(cards: CardData, backbone_onnx: OnnxModel) -> None:
    """10 labeled crops per class, drawn 4 times from the train split; all test crops."""
    pool = [(c, CLASSES.index(label)) for item in load_split("train") for c, label in crops(item)]
    labels = np.array([k for _, k in pool])
    gains = []
    for seed in range(DRAWS):
        rng = np.random.default_rng(seed)
        picked = np.concatenate([rng.choice(np.flatnonzero(labels == k), PER_CLASS, replace=False)
                                 for k in range(len(CLASSES))])
        images, y = [pool[i][0] for i in picked], labels[picked]
        x = embed(backbone_onnx, images)
        views = [embed(backbone_onnx, [f(im) for im in images]) for f in VIEWS.values()]
        acc = []
        for train_x in (x, np.concatenate([x, *views])):
            head = train_head(train_x, np.tile(y, len(train_x) // len(y)), "multiclass",
                              len(CLASSES), CPU)
            acc.append(float((predict_proba(head, cards.test_x).argmax(1) == cards.test_y).mean()))
        gains.append(acc[1] - acc[0])
    print(f"accuracy gain with views per draw: {np.round(gains, 3).tolist()}")
    assert np.mean(gains) >= MIN_MEAN_GAIN, gains
