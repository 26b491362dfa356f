"""Diverse active-learning picks: uncertainty weighted by distance from what is labeled.

Plain uncertainty order keeps asking for near-copies of the same hard image until the next
model is trained (its scores only change then). The greedy here is k-center on the cached
embeddings, weighted by uncertainty: each pick maximises ``weight * distance to the nearest
labeled or already-picked image``, so a candidate that looks like one just labeled drops back.
"""

from __future__ import annotations

import numpy as np

# with no model yet every candidate weighs the same: the greedy is then plain k-center
UNSCORED_WEIGHT = 1.0
# a floor keeps an image the model is sure of pickable when everything else is a near-copy
MIN_WEIGHT = 0.05


def _unit(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def diverse_order(weights: np.ndarray, candidates: np.ndarray,
                  labeled: np.ndarray | None = None, picks: int | None = None) -> list[int]:
    """Indices of ``candidates`` [N, D] in pick order (``picks`` of them, default all).

    ``weights`` [N]: uncertainty in [0, 1], NaN where the image has no score yet.
    ``labeled`` [M, D]: embeddings of labeled images (the centres already covered).
    Distance is cosine distance (1 - cosine similarity) in [0, 2]; a candidate with no
    labeled image or pick yet counts as 1 away, so the first pick is the most uncertain.
    """
    cand = _unit(candidates)
    n = cand.shape[0]
    if n == 0:
        return []
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"weights must be [{n}], got {w.shape}")
    w = np.where(np.isnan(w), UNSCORED_WEIGHT, np.clip(w, MIN_WEIGHT, 1.0))
    dist = np.ones(n, dtype=np.float64)
    if labeled is not None and len(labeled):
        sims = _unit(labeled) @ cand.T  # [M, N]
        dist = np.minimum(dist, 1.0 - sims.max(axis=0).astype(np.float64))
    dist = np.maximum(dist, 0.0)
    order: list[int] = []
    taken = np.zeros(n, dtype=bool)
    for _ in range(min(picks if picks is not None else n, n)):
        score = np.where(taken, -np.inf, w * dist)
        best = int(np.argmax(score))
        order.append(best)
        taken[best] = True
        dist = np.minimum(dist, np.maximum(1.0 - cand @ cand[best], 0.0))
    return order
