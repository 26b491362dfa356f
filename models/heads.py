"""Linear classification heads on frozen embeddings: training and a numpy reference."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Task = Literal["multiclass", "multilabel"]
Activation = Literal["softmax", "sigmoid"]

# Solver and regularisation, chosen by measurement on real photo sets (card crops, BCCD cells;
# 5-70 labels per class; see models/README.md): full-batch L-BFGS on the raw embeddings, loss
# summed over samples plus 0.5 * prior * ||W||^2 (a Gaussian prior on the weights, i.e. mean
# loss with L2 = prior/N). For multiclass, prior 1 tracked the best fixed L2 at every label
# count; for multilabel (cards whole images, validation split) prior 3 gave the same mAP as 1
# with a better log loss (0.49-0.54 vs 0.55-0.60). Label smoothing and temperature scaling
# (cross-validated or on a held-out split) did not help consistently and were left out.
_WEIGHT_PRIOR: dict[str, float] = {"multiclass": 1.0, "multilabel": 3.0}
_MAX_ITER = 100
_BIAS_PRIOR_VAR = 100.0  # weak prior: keeps biases of classes with no examples finite


class _DivergedError(Exception):
    """The training loss became NaN or infinite."""


@dataclass
class HeadParams:
    """A trained linear head: probs = activation((x @ weight.T + bias) / temperature)."""

    weight: np.ndarray  # [C, D] float32
    bias: np.ndarray  # [C] float32
    activation: Activation
    temperature: float = 1.0
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float32)
        self.bias = np.asarray(self.bias, dtype=np.float32)
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(
                f"expected weight [C,D] and bias [C], got {self.weight.shape} and {self.bias.shape}"
            )
        self.thresholds = np.asarray(self.thresholds, dtype=np.float32)
        if self.thresholds.size == 0:
            self.thresholds = np.full(self.num_classes, 0.5, dtype=np.float32)
        if self.thresholds.shape != (self.num_classes,):
            raise ValueError(
                f"expected thresholds [{self.num_classes}], got {self.thresholds.shape}"
            )

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])


def _validate(x: np.ndarray, y: np.ndarray, task: Task, num_classes: int) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty [N,D] embedding matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    if num_classes < 2 and task == "multiclass":
        raise ValueError(f"multiclass needs at least 2 classes, got {num_classes}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    n = x.shape[0]
    if task == "multiclass":
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"multiclass labels must be integer class indices [N={n}], got {y.dtype} {y.shape}"
            )
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(
                f"class indices must lie in [0, {num_classes}), got {y.min()}..{y.max()}"
            )
        if np.unique(y).size < 2:
            raise ValueError("multiclass training needs examples of at least 2 different classes")
    elif task == "multilabel":
        if y.shape != (n, num_classes):
            raise ValueError(f"multilabel targets must be [N={n}, C={num_classes}], got {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("multilabel targets must be 0 or 1")
        if not y.any():
            raise ValueError("multilabel training needs at least one positive label")
    else:
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")


@contextmanager
def _single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the tiny full-batch solve on one intra-op thread (restored afterwards).

    Its ops are far too small to gain from threads, and on a busy 2-core machine multi-threaded
    torch was 5-20x slower (e.g. 3.5 s vs 0.2 s for 30 samples).
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit(
    feats: torch.Tensor,
    target: torch.Tensor,
    task: Task,
    num_classes: int,
    progress: Callable[[float], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the penalised loss with L-BFGS; raise _DivergedError on a non-finite loss."""
    weight = torch.zeros(num_classes, feats.shape[1], device=feats.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=feats.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=_MAX_ITER,
        tolerance_grad=1e-5,
        tolerance_change=1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    max_eval = _MAX_ITER * 5 // 4  # torch's default cap on function evaluations
    prior = _WEIGHT_PRIOR[task]
    evals = 0

    def objective() -> torch.Tensor:
        scores = feats @ weight.T + bias
        if task == "multiclass":
            data = F.cross_entropy(scores, target, reduction="sum")
        else:
            data = F.binary_cross_entropy_with_logits(scores, target, reduction="sum")
        penalty = prior * weight.square().sum() + bias.square().sum() / _BIAS_PRIOR_VAR
        return data + 0.5 * penalty

    def closure() -> torch.Tensor:
        nonlocal evals
        optimizer.zero_grad()
        loss = objective()
        if not torch.isfinite(loss):
            raise _DivergedError
        loss.backward()
        evals += 1
        if progress is not None:
            progress(min(evals / max_eval, 0.99))
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        if not torch.isfinite(objective()):
            raise _DivergedError
    return weight.detach().cpu().numpy(), bias.detach().cpu().numpy()


def train_head(
    x: np.ndarray,
    y: np.ndarray,
    task: Task,
    num_classes: int,
    device: torch.device,
    progress: Callable[[float], None] | None = None,
    seed: int = 0,
) -> HeadParams:
    """Fit a linear head on embeddings ``x`` [N,D]; ``y`` is [N] class ids or [N,C] in {0,1}.

    Deterministic: full-batch L-BFGS on a convex loss from zero weights draws no random numbers,
    so ``seed`` (kept for interface stability) cannot change the result. Raises ValueError on
    degenerate input or a non-finite loss. ``progress`` receives fractions in (0, 1].
    """
    x = np.asarray(x)
    y = np.asarray(y)
    _validate(x, y, task, num_classes)
    feats = torch.as_tensor(x, dtype=torch.float32, device=device)
    target_dtype = torch.long if task == "multiclass" else torch.float32
    target = torch.as_tensor(y, dtype=target_dtype, device=device)
    try:
        with _single_thread_on_cpu(device):
            weight, bias = _fit(feats, target, task, num_classes, progress)
    except _DivergedError:
        raise ValueError("head training diverged: the loss became NaN or infinite") from None
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ValueError("head training diverged: the weights became NaN or infinite")
    if progress is not None:
        progress(1.0)
    return HeadParams(
        weight=weight,
        bias=bias,
        activation="softmax" if task == "multiclass" else "sigmoid",
        temperature=1.0,
    )


def logits(params: HeadParams, x: np.ndarray) -> np.ndarray:
    """Temperature-scaled logits [N,C] in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    return (x64 @ params.weight.T.astype(np.float64) + params.bias) / params.temperature


def predict_proba(params: HeadParams, x: np.ndarray) -> np.ndarray:
    """Numpy reference of the head (matches the ONNX head): probabilities [N,C] float32."""
    z = logits(params, x)
    if params.activation == "softmax":
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(axis=1, keepdims=True)
    else:
        p = np.exp(-np.logaddexp(0.0, -z))
    return p.astype(np.float32)
