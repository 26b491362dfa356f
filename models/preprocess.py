"""The single image -> model-input path shared by embedding, training and serving."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from models.constants import INPUT_SIZE

# Pillow pre-shrinks by an integer factor with a box filter while the image stays at least
# this many times larger than the target, then finishes with bilinear: fast on big photos.
_REDUCING_GAP = 3.0


def to_model_input(img: Image.Image) -> np.ndarray:
    """Squash-resize an RGB, EXIF-corrected image to uint8 [224,224,3] (bilinear, no crop)."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r}")
    resized = img.resize(
        (INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP
    )
    return np.asarray(resized, dtype=np.uint8)


def batch_inputs(images: Sequence[Image.Image]) -> np.ndarray:
    """Stack :func:`to_model_input` of each image into uint8 [N,224,224,3]."""
    if not images:
        return np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    return np.stack([to_model_input(img) for img in images])
