"""Train the FCOS detector: warm-up + cosine schedule over the epoch cap or the time budget,
validation mAP@.5 after every epoch (or every N steps), early stopping, best weights kept.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.detection_data import DetectionDataset, collate
from models.detection_eval import detection_metrics
from models.detection_types import DetectionSample
from models.detector import DetectorConfig, autocast, build_detector, predict_detections

logger = logging.getLogger(__name__)

_POLL_EVERY = 5  # steps between should_stop() polls


class DetectorTrainingCancelled(Exception):
    """``should_stop()`` returned True during detector training."""


@dataclass
class TrainConfig:
    """Optimisation settings; ``time_budget_s`` and ``max_epochs`` both cap the run."""

    max_epochs: int = 30
    time_budget_s: float | None = 600.0
    batch_size: int = 4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # FPN and head
    backbone_lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    grad_clip: float = 10.0
    patience: int = 5  # evaluations without a better val mAP@.5 before stopping
    eval_every_steps: int | None = None  # None: after every epoch
    threads: int | None = None  # CPU intra-op threads during training (None: leave as is)
    seed: int = 0


@dataclass
class EvalRecord:
    """One validation point: where in training, mean training loss since the previous point."""

    epoch: float
    step: int
    loss: float
    val_map50: float | None
    val_map: float | None
    seconds: float  # since the start of training


@dataclass
class DetectorTrainResult:
    """Best weights (CPU state dict) by val mAP@.5, their config and how the run went."""

    state_dict: dict[str, torch.Tensor]
    config: DetectorConfig
    history: list[EvalRecord]
    device: str
    epochs: float  # epochs run (fractional when stopped mid-epoch)
    best_epoch: float
    best_map50: float | None
    seconds: float
    stop_reason: Literal["max_epochs", "time_budget", "early_stop"]


@contextmanager
def _cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    if device.type != "cpu" or threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_inputs(
    train: Sequence[DetectionSample], config: DetectorConfig, settings: TrainConfig
) -> None:
    if not train:
        raise ValueError("detector training needs at least one training image")
    if settings.max_epochs < 1 or settings.batch_size < 1:
        raise ValueError("max_epochs and batch_size must be >= 1")
    for i, sample in enumerate(train):
        if sample.labels.size and int(sample.labels.max()) >= config.num_classes:
            raise ValueError(
                f"training image {i} has label {int(sample.labels.max())} but the detector "
                f"has {config.num_classes} classes (labels are 0-based)"
            )
    if all(sample.labels.size == 0 for sample in train):
        raise ValueError("no training image has a box: nothing to learn")


def _optimizer(model: torch.nn.Module, settings: TrainConfig) -> torch.optim.Optimizer:
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.body.") else rest).append(param)
    groups = [
        {"params": backbone, "lr": settings.backbone_lr},
        {"params": rest, "lr": settings.lr},
    ]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {settings.optimizer!r}")


def _lr_factor(step: int, fraction: float, warmup_steps: int) -> float:
    """Linear warm-up over steps, then cosine decay over the run's fraction done."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(fraction, 1.0)))


def train_detector(
    train: Sequence[DetectionSample],
    val: Sequence[DetectionSample],
    config: DetectorConfig,
    device: torch.device | str = "cpu",
    settings: TrainConfig | None = None,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DetectorTrainResult:
    """Train an FCOS detector from the pretrained backbone; return the best weights by val mAP@.5.

    Images without boxes are negative examples. With an empty ``val`` the last weights are kept.
    The run ends at ``max_epochs``, when ``time_budget_s`` would be exceeded (the last
    validation's duration is reserved for the closing one) or after ``patience`` validations
    without improvement. Raises ``DetectorTrainingCancelled`` when ``should_stop()`` says so.
    """
    settings = settings or TrainConfig()
    _check_inputs(train, config, settings)
    device = torch.device(device)
    start = time.perf_counter()
    torch.manual_seed(settings.seed)  # model init and the augmentations' random draws
    gen = torch.Generator().manual_seed(settings.seed)
    logger.info("training detector on %s: %d train, %d val images", device, len(train), len(val))

    with _cpu_threads(device, settings.threads):
        model = build_detector(config).to(device)
        data = DetectionDataset(train, config.min_size, config.max_size, augment=True)
        loader = DataLoader(
            data,
            batch_size=settings.batch_size,
            shuffle=True,
            collate_fn=collate,
            generator=gen,
            drop_last=len(data) > settings.batch_size,
        )
        return _run(model, loader, val, config, device, settings, start, progress, should_stop)


def _run(
    model: torch.nn.Module,
    loader: DataLoader,
    val: Sequence[DetectionSample],
    config: DetectorConfig,
    device: torch.device,
    settings: TrainConfig,
    start: float,
    progress: Callable[[float], None] | None,
    should_stop: Callable[[], bool] | None,
) -> DetectorTrainResult:
    optimizer = _optimizer(model, settings)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    use_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)  # fp16 only; bf16 needs none
    steps_per_epoch = len(loader)
    total_steps = settings.max_epochs * steps_per_epoch
    budget = settings.time_budget_s
    eval_every = settings.eval_every_steps or steps_per_epoch
    class_ids = [str(c) for c in range(config.num_classes)]

    history: list[EvalRecord] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_map50: float | None = None
    best_epoch = 0.0
    since_best = 0
    eval_seconds = 0.0
    losses: list[float] = []
    step = 0
    stop_reason: Literal["max_epochs", "time_budget", "early_stop"] = "max_epochs"

    def fraction() -> float:
        done = step / total_steps
        if budget:
            done = max(done, (time.perf_counter() - start) / budget)
        return done

    def validate() -> bool:
        """Record a validation point; True when training should stop early."""
        nonlocal best_state, best_map50, best_epoch, since_best, eval_seconds
        began = time.perf_counter()
        map50 = map_ = None
        if val:
            predictions = predict_detections(model, [s.image for s in val], device)
            metrics = detection_metrics(predictions, val, class_ids)
            map50, map_ = metrics["map50"] or 0.0, metrics["map"] or 0.0
        eval_seconds = time.perf_counter() - began
        epoch = step / steps_per_epoch
        history.append(
            EvalRecord(
                epoch=round(epoch, 3),
                step=step,
                loss=float(np.mean(losses)) if losses else float("nan"),
                val_map50=map50,
                val_map=map_,
                seconds=round(time.perf_counter() - start, 2),
            )
        )
        losses.clear()
        logger.info("detector step %d epoch %.2f: %s", step, epoch, history[-1])
        improved = map50 is None or best_map50 is None or map50 > best_map50
        if improved:
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best_map50, best_epoch, since_best = map50, epoch, 0
        else:
            since_best += 1
        return bool(val) and since_best >= settings.patience

    model.train()
    evaluated_at = 0
    done = False
    while not done:
        for images, targets in loader:
            if step % _POLL_EVERY == 0 and should_stop is not None and should_stop():
                raise DetectorTrainingCancelled
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            factor = _lr_factor(step, fraction(), settings.warmup_steps)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            with autocast(device):
                loss_parts = model(images, targets)
            loss = sum(part.float() for part in loss_parts.values())
            if not torch.isfinite(loss):
                raise ValueError("detector training diverged: the loss became NaN or infinite")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            step += 1
            if progress is not None:
                progress(min(fraction(), 0.99))
            if step % eval_every == 0 or step == total_steps:
                evaluated_at = step
                if validate():
                    stop_reason, done = "early_stop", True
                    break
            if step >= total_steps:
                done = True
                break
            if budget and time.perf_counter() - start + eval_seconds >= budget:
                stop_reason, done = "time_budget", True
                break
    if evaluated_at != step:
        validate()
    if progress is not None:
        progress(1.0)
    assert best_state is not None  # validate() ran at least once
    return DetectorTrainResult(
        state_dict=best_state,
        config=config,
        history=history,
        device=str(device),
        epochs=round(step / steps_per_epoch, 3),
        best_epoch=round(best_epoch, 3),
        best_map50=best_map50,
        seconds=round(time.perf_counter() - start, 2),
        stop_reason=stop_reason,
    )
