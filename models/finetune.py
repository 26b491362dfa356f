"""Fine-tune the top of the EfficientNet-Lite0 backbone together with a linear head.

The lower, frozen part runs once per image (and once per mirrored image) under inference mode;
only the top stages and the head train, on those cached feature maps. That keeps fine-tuning
affordable on a 2-core CPU. See models/README.md for the measurements behind the defaults.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import EMBED_DIM, INPUT_SIZE, EmbeddingModel, Preprocess, load_backbone
from models.heads import HeadParams, _single_thread_on_cpu, _validate, train_head
from models.onnx_export import export_embedding_model

Task = Literal["multiclass", "multilabel"]

# Rule for the worker: try fine-tuning only when every class has at least this many labels
# (multilabel: positives). From 5 per class up the tuned top never lost to the frozen head on
# held-out card or cell crops; below 5 a hold-out fold cannot hold every class (README).
FINETUNE_MIN_LABELS_PER_CLASS = 5

_PRECOMPUTE_BATCH = 32
_POLL_EVERY = 5  # steps between should_stop() polls
_WARMUP_FRACTION = 0.1
_PRECOMPUTE_SHARE = 0.4  # progress reported for the frozen pass; training gets the rest
# Experiment knobs (kept private; the defaults are the measured choice).
_TRAIN_DEPTHWISE = False  # frozen: their backward is slow on CPU; a step is ~20% cheaper
_FLIP = True  # also cache the mirrored image's features and pick one at random per sample
_SHIFT = 1  # random translation of the cached map by up to this many cells
_DROPOUT = 0.2  # on the embedding, before the head
_REFIT_HEAD = True  # refit train_head on the tuned embeddings (else keep the joint head)


class FinetuneCancelled(Exception):
    """``should_stop()`` returned True during fine-tuning."""


@dataclass
class FinetuneConfig:
    """Hyper-parameters; the defaults were chosen on real photos with a 2-core CPU in mind."""

    trainable_blocks: int = 2  # last N of the backbone's `blocks` stages (+ conv_head/bn2)
    steps: int = 60
    batch_size: int = 32
    lr_backbone: float = 3e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.1  # multiclass only
    seed: int = 0


@dataclass
class FinetuneResult:
    """The fine-tuned embedding model (uint8 NHWC -> [N,1280], eval, CPU) and its head."""

    model: nn.Module
    head: HeadParams
    seconds: float
    device: str


class _Cache:
    """Frozen feature maps of the training images (and of their mirror images)."""

    def __init__(self, maps: torch.Tensor, mirrored: torch.Tensor | None) -> None:
        self.maps = maps
        self.mirrored = mirrored

    def __len__(self) -> int:
        return int(self.maps.shape[0])


def _split(backbone: nn.Module, trainable_blocks: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Views of the timm model: frozen lower part and trainable top (modules are shared)."""
    blocks = list(backbone.blocks)  # type: ignore[arg-type]
    if not 1 <= trainable_blocks <= len(blocks):
        raise ValueError(f"trainable_blocks must lie in [1, {len(blocks)}], got {trainable_blocks}")
    cut = len(blocks) - trainable_blocks
    lower = nn.Sequential(backbone.conv_stem, backbone.bn1, *blocks[:cut])  # type: ignore[arg-type]
    top = nn.Sequential(
        *blocks[cut:],
        backbone.conv_head,  # type: ignore[arg-type]
        backbone.bn2,  # type: ignore[arg-type]
        backbone.global_pool,  # type: ignore[arg-type]
    )
    return lower, top


def _trainable(top: nn.Sequential) -> list[nn.Parameter]:
    params = []
    for module in top.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not _TRAIN_DEPTHWISE:
            continue
        params.extend(module.parameters(recurse=False))
    return params


def should_try_finetune(y: np.ndarray, task: Task, num_classes: int) -> bool:
    """Whether every class has at least FINETUNE_MIN_LABELS_PER_CLASS labels (positives)."""
    y = np.asarray(y)
    if task == "multiclass":
        counts = np.bincount(y.astype(np.int64).ravel(), minlength=num_classes)[:num_classes]
    else:
        counts = (y.reshape(-1, num_classes) > 0).sum(axis=0)
    return bool(len(y) > 0 and counts.min() >= FINETUNE_MIN_LABELS_PER_CLASS)


def _check_images(images: np.ndarray) -> None:
    expected = (INPUT_SIZE, INPUT_SIZE, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(
            f"images must be uint8 [N,{INPUT_SIZE},{INPUT_SIZE},3] from to_model_input, "
            f"got {images.dtype} {images.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError("fine-tuning needs at least one image")


def _check_config(config: FinetuneConfig) -> None:
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError(
            f"steps and batch_size must be >= 1, got {config.steps}, {config.batch_size}"
        )
    rates = (config.lr_backbone, config.lr_head, config.weight_decay)
    if not all(math.isfinite(v) and v >= 0 for v in rates):
        raise ValueError("learning rates and weight_decay must be finite and >= 0")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {config.label_smoothing}")


def _poll(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise FinetuneCancelled


def _autocast(device: torch.device) -> torch.autocast | nullcontext[None]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _precompute(
    lower: nn.Module,
    top: nn.Module,
    images: np.ndarray,
    device: torch.device,
    progress: Callable[[float], None] | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[_Cache, np.ndarray]:
    """Frozen maps (float16) of each image and its mirror, and the frozen embeddings."""
    preprocess = Preprocess().to(device)
    maps: list[torch.Tensor] = []
    mirrored: list[torch.Tensor] = []
    embeddings: list[torch.Tensor] = []
    n = len(images)
    for start in range(0, n, _PRECOMPUTE_BATCH):
        _poll(should_stop)
        with torch.inference_mode():
            x = preprocess(torch.from_numpy(images[start : start + _PRECOMPUTE_BATCH]).to(device))
            fmap = lower(x)
            embeddings.append(top(fmap).float().cpu())
            maps.append(fmap.half())
            if _FLIP:
                mirrored.append(lower(x.flip(3)).half())
        if progress is not None:
            progress(_PRECOMPUTE_SHARE * min(start + _PRECOMPUTE_BATCH, n) / n)
    cache = _Cache(torch.cat(maps), torch.cat(mirrored) if mirrored else None)
    return cache, torch.cat(embeddings).numpy()


def _batch(
    cache: _Cache, idx: torch.Tensor, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Augmented float32 feature maps for the sample indices ``idx``."""
    x = cache.maps[idx]
    if cache.mirrored is not None:
        pick = (torch.rand(len(idx), generator=gen) < 0.5).to(x.device)
        x = torch.where(pick.view(-1, 1, 1, 1), cache.mirrored[idx], x)
    x = x.to(device=device, dtype=torch.float32)
    if _SHIFT > 0:
        s = _SHIFT
        size = x.shape[-1]
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        offsets = torch.randint(0, 2 * s + 1, (len(idx), 2), generator=gen).tolist()
        x = torch.stack(
            [
                p[:, dy : dy + size, dx : dx + size]
                for p, (dy, dx) in zip(padded, offsets, strict=True)
            ]
        )
    return x


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(_WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(
    top: nn.Sequential,
    head: nn.Linear,
    cache: _Cache,
    y: np.ndarray,
    task: Task,
    config: FinetuneConfig,
    device: torch.device,
    progress: Callable[[float], None] | None,
    should_stop: Callable[[], bool] | None,
) -> None:
    """Train the top blocks (BatchNorm statistics frozen) and the head in place."""
    gen = torch.Generator().manual_seed(config.seed)
    target = torch.as_tensor(y, dtype=torch.long if task == "multiclass" else torch.float32)
    backbone_params = _trainable(top)
    for p in backbone_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": config.lr_backbone},
            {"params": list(head.parameters()), "lr": config.lr_head},
        ],
        weight_decay=config.weight_decay,
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    top.eval()  # BatchNorm keeps its pretrained statistics: batches of few labels are noisy
    order = torch.empty(0, dtype=torch.long)
    for step in range(config.steps):
        if step % _POLL_EVERY == 0:
            _poll(should_stop)
        while len(order) < config.batch_size:  # reshuffle once an epoch is used up
            order = torch.cat([order, torch.randperm(len(cache), generator=gen)])
        idx, order = order[: config.batch_size], order[config.batch_size :]
        x = _batch(cache, idx, gen, device)
        keep = (torch.rand(len(idx), EMBED_DIM, generator=gen) >= _DROPOUT).to(device)
        t = target[idx].to(device)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * _lr_factor(step, config.steps)
        with _autocast(device):
            emb = top(x) * keep / (1.0 - _DROPOUT)
            scores = head(emb).float()
        if task == "multiclass":
            loss = F.cross_entropy(scores, t, label_smoothing=config.label_smoothing)
        else:
            loss = F.binary_cross_entropy_with_logits(scores, t)
        if not torch.isfinite(loss):
            raise ValueError("fine-tuning diverged: the loss became NaN or infinite")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            share = 1.0 - _PRECOMPUTE_SHARE
            progress(min(_PRECOMPUTE_SHARE + share * (step + 1) / config.steps, 0.99))
    for p in backbone_params:
        p.requires_grad_(False)


def _embed_cached(top: nn.Module, cache: _Cache, device: torch.device) -> np.ndarray:
    with torch.inference_mode():
        parts = [
            top(cache.maps[i : i + _PRECOMPUTE_BATCH].to(device, torch.float32)).float().cpu()
            for i in range(0, len(cache), _PRECOMPUTE_BATCH)
        ]
    return torch.cat(parts).numpy()


def finetune(
    images: np.ndarray,
    y: np.ndarray,
    task: Task,
    num_classes: int,
    device: torch.device,
    config: FinetuneConfig | None = None,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune the top ``trainable_blocks`` stages and a linear head on ``images``.

    ``images`` are uint8 [N,224,224,3] from ``to_model_input``; ``y`` is [N] class ids or [N,C]
    in {0,1}. The head starts from ``train_head`` on the frozen embeddings. Raises ValueError on
    degenerate input (train_head's rules) and FinetuneCancelled when ``should_stop()`` is True.
    """
    config = config or FinetuneConfig()
    _check_config(config)
    images = np.asarray(images)
    y = np.asarray(y)
    _check_images(images)
    _validate(np.zeros((len(images), 1), np.float32), y, task, num_classes)
    start = time.perf_counter()
    torch_device = torch.device(device)

    backbone = load_backbone()
    backbone.requires_grad_(False)
    lower, top = _split(backbone, config.trainable_blocks)
    backbone.to(torch_device)
    # One intra-op thread on CPU: on the shared 2-core box two threads were 2x slower to train.
    with _single_thread_on_cpu(torch_device):
        cache, frozen = _precompute(lower, top, images, torch_device, progress, should_stop)
        warm = train_head(frozen, y, task, num_classes, torch_device)
        head = nn.Linear(EMBED_DIM, num_classes).to(torch_device)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(warm.weight))
            head.bias.copy_(torch.from_numpy(warm.bias))
        _train(top, head, cache, y, task, config, torch_device, progress, should_stop)
        tuned = _embed_cached(top, cache, torch_device) if _REFIT_HEAD else None

    activation: Literal["softmax", "sigmoid"] = "softmax" if task == "multiclass" else "sigmoid"
    if tuned is not None:
        params = train_head(tuned, y, task, num_classes, torch_device)
    else:
        params = HeadParams(
            weight=head.weight.detach().float().cpu().numpy(),
            bias=head.bias.detach().float().cpu().numpy(),
            activation=activation,
        )
    if not (np.isfinite(params.weight).all() and np.isfinite(params.bias).all()):
        raise ValueError("fine-tuning diverged: the head weights became NaN or infinite")
    model = EmbeddingModel(backbone=backbone.cpu().eval()).eval()
    if progress is not None:
        progress(1.0)
    return FinetuneResult(
        model=model, head=params, seconds=time.perf_counter() - start, device=str(torch_device)
    )


def export_embedding_onnx(model: nn.Module, path: Path) -> None:
    """Export an embedding model like ``export_backbone_onnx``: "image" uint8 -> "embedding"."""
    export_embedding_model(copy.deepcopy(model).cpu().eval(), path)
