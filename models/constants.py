"""Model input constants, importable without torch (the API process never loads torch)."""

from __future__ import annotations

EMBED_DIM = 1280
INPUT_SIZE = 224
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
