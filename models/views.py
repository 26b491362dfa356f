"""Label-preserving views of a labeled image, for the linear head on frozen embeddings.

The frozen head sees each labeled image once; photos of the same class come slightly turned,
framed or mirrored. Training the head also on the embeddings of such views of every labeled
image teaches it that invariance. Measured on the 547 card crops (6 ranks, 10 random draws;
``benchmarks/head_views.py``): held-out accuracy 0.606 / 0.667 / 0.774 at 5 / 10 / 25 labels
per class with the image alone, 0.633 / 0.720 / 0.823 with the first four views, more with all
eight (see models/README.md). Repeating the plain embedding five times (the same weight against
the prior as five views) changed little (0.608 / 0.669 / 0.781): the gain is the views', not a
weaker regulariser's. Quarter turns and flips upside down gained less than small turns and do
not keep the label of most photos; shifted 90% crops (corners), an 80% crop, a grey border and
mirrored turns added nothing over these eight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

_FILL = (128, 128, 128)  # turned corners: mid-grey, ~0 after ImageNet normalisation


def _centre(img: Image.Image, keep: float = 0.9) -> Image.Image:
    w, h = img.size
    dx, dy = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
    return img.crop((dx, dy, w - dx, h - dy))


def _brightness(factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: ImageEnhance.Brightness(img).enhance(factor)


def _turn(degrees: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: img.rotate(degrees, Image.Resampling.BILINEAR, expand=True,
                                  fillcolor=_FILL)


# name -> transform of an RGB PIL image; the names are part of the cached embeddings' keys
VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "centre90": _centre,
    "turn+15": _turn(15.0),
    "turn-15": _turn(-15.0),
    "mirror": lambda img: img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    # added later (+1.3 to +1.8 points over the four above; benchmarks/head_views.py)
    "turn+30": _turn(30.0),
    "turn-30": _turn(-30.0),
    "brighter": _brightness(1.3),
    "darker": _brightness(0.75),
}


# Views whose predictions are averaged with the image's own (test-time augmentation), for a
# frozen head on the same backbone: +2.0 / +2.7 / +3.0 points of held-out accuracy at 5 / 10 /
# 25 labels per class on the card crops over the head trained with all views
# (benchmarks/head_views.py); averaging over all eight gained no more than these four.
PREDICTION_VIEWS: tuple[str, ...] = ("centre90", "turn+15", "turn-15", "mirror")


def average_over_views(run: Callable[[np.ndarray], np.ndarray], plain: np.ndarray,
                       views: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Probabilities [N, C] averaged over each image and those of its views that are given.

    ``run`` maps inputs (embeddings or images) to probabilities; ``plain`` holds the images'
    own inputs; each entry of ``views`` is (row indices into ``plain``, those rows' inputs for
    one view). An image with no view keeps its own probabilities.
    """
    total = np.asarray(run(plain), np.float64)
    count = np.ones(len(plain))
    for rows, inputs in views:
        if len(rows):
            total[rows] += run(inputs)
            count[rows] += 1
    return (total / count[:, None]).astype(np.float32)


def view_key(backbone: str, view: str) -> str:
    """The embeddings-table key of a view's embedding under a backbone."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}")
    return f"{backbone}|{view}"
