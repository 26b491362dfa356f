"""Train the FCOS detector in two phases: first the FPN and head on cached features of the frozen
backbone (``detection_warmup``), then the whole network (but the lowest stages) end to end.

Each phase has a warm-up + cosine schedule over its share of the epoch cap or time budget,
validation mAP@.5 after every epoch (or every N steps) and early stopping; the best weights of the
whole run are kept.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.models.detection import FCOS

from models.detection_data import DetectionDataset, collate
from models.detection_eval import detection_metrics
from models.detection_types import DetectionSample
from models.detection_warmup import batches, cache_features, cosine, freeze_backbone, head_loss
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
    # Share of the time budget (or of max_epochs) spent training the FPN and head on cached
    # features of the frozen backbone before fine-tuning (0: fine-tune from the start).
    head_first: float = 0.4
    cached_variants: int = 6  # augmented views of each image cached for that phase
    cache_max_bytes: int = 2 << 30


@dataclass
class EvalRecord:
    """One validation point: where in training, mean training loss since the previous point."""

    epoch: float
    step: int
    loss: float
    val_map50: float | None
    val_map: float | None
    seconds: float  # since the start of training
    phase: Literal["head", "finetune"] = "finetune"


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
    head_epochs: float = 0.0  # passes over the images in the head-first phase (in ``epochs``)
    head_seconds: float = 0.0  # that phase, feature caching included
    cached_variants: int = 0


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


@dataclass
class _Best:
    """The best weights so far and how validation went (shared by both phases)."""

    state: dict[str, torch.Tensor] | None = None
    map50: float | None = None
    epoch: float = 0.0

    def offer(self, model: torch.nn.Module, map50: float | None, epoch: float) -> bool:
        """Keep the model's weights if they beat the best; True when they did."""
        if map50 is not None and self.map50 is not None and map50 <= self.map50:
            return False
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.map50, self.epoch = map50, epoch
        return True


@dataclass
class _Phase:
    """One phase's limits: epochs, and the moment its time is up (None: no budget)."""

    start: float
    end: float | None
    max_epochs: int

    def fraction(self, epochs_done: float) -> float:
        done = epochs_done / self.max_epochs
        if self.end is not None:
            done = max(done, (time.perf_counter() - self.start) / (self.end - self.start))
        return done


class _Validator:
    """Validation points on ``val`` for both phases, early stopping, the run's best weights."""

    def __init__(self, model: torch.nn.Module, val: Sequence[DetectionSample],
                 config: DetectorConfig, device: torch.device, start: float,
                 patience: int) -> None:
        self.model, self.val, self.device, self.start = model, val, device, start
        self.class_ids = [str(c) for c in range(config.num_classes)]
        self.patience = patience
        self.history: list[EvalRecord] = []
        self.best = _Best()
        self.since_best = 0
        self.seconds = 0.0  # duration of the last validation
        self.losses: list[float] = []

    def __call__(self, epoch: float, step: int, phase: Literal["head", "finetune"]) -> bool:
        """Record a validation point; True when the phase should stop early."""
        began = time.perf_counter()
        map50 = map_ = None
        if self.val:
            predictions = predict_detections(self.model, [s.image for s in self.val],
                                             self.device)
            metrics = detection_metrics(predictions, self.val, self.class_ids)
            map50, map_ = metrics["map50"] or 0.0, metrics["map"] or 0.0
        self.seconds = time.perf_counter() - began
        self.history.append(EvalRecord(
            epoch=round(epoch, 3), step=step,
            loss=float(np.mean(self.losses)) if self.losses else float("nan"),
            val_map50=map50, val_map=map_, seconds=round(time.perf_counter() - self.start, 2),
            phase=phase))
        self.losses.clear()
        logger.info("detector %s step %d epoch %.2f: %s", phase, step, epoch, self.history[-1])
        if self.best.offer(self.model, map50, epoch):
            self.since_best = 0
        else:
            self.since_best += 1
        return bool(self.val) and self.since_best >= self.patience


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
    The head-first phase takes ``head_first`` of the budget (time, or ``max_epochs``); each phase
    ends at its epoch cap, when its time would be exceeded (the last validation's duration is
    reserved for the closing one) or after ``patience`` validations without improvement.
    Raises ``DetectorTrainingCancelled`` when ``should_stop()`` says so.
    """
    settings = settings or TrainConfig()
    _check_inputs(train, config, settings)
    if not 0.0 <= settings.head_first < 1.0:
        raise ValueError(f"head_first must lie in [0, 1), got {settings.head_first}")
    device = torch.device(device)
    start = time.perf_counter()
    torch.manual_seed(settings.seed)  # model init and the augmentations' random draws
    gen = torch.Generator().manual_seed(settings.seed)
    logger.info("training detector on %s: %d train, %d val images", device, len(train), len(val))

    def poll(step: int) -> None:
        if step % _POLL_EVERY == 0 and should_stop is not None and should_stop():
            raise DetectorTrainingCancelled

    with _cpu_threads(device, settings.threads):
        model = build_detector(config).to(device)
        data = DetectionDataset(train, config.min_size, config.max_size, augment=True)
        validator = _Validator(model, val, config, device, start, settings.patience)
        budget = settings.time_budget_s
        # the end-to-end phase keeps at least one epoch of the cap
        head_epochs = min(math.ceil(settings.max_epochs * settings.head_first),
                          settings.max_epochs - 1)
        head = _Phase(start, start + budget * settings.head_first if budget else None,
                      head_epochs)
        warm = _HeadOutcome(0.0, 0, 0.0)
        if head_epochs:
            warm = _head_first(model, data, device, settings, head, validator, progress, poll,
                               budget)
        loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True,
                            collate_fn=collate, generator=gen,
                            drop_last=len(data) > settings.batch_size)
        now = time.perf_counter()
        tune = _Phase(now, start + budget if budget else None,
                      settings.max_epochs - head_epochs)
        epochs, stop_reason = _finetune(model, loader, device, settings, tune, warm.epochs,
                                        validator, progress, poll, budget, start)
    if progress is not None:
        progress(1.0)
    best = validator.best
    assert best.state is not None  # validation ran at least once
    return DetectorTrainResult(
        state_dict=best.state,
        config=config,
        history=validator.history,
        device=str(device),
        epochs=round(warm.epochs + epochs, 3),
        best_epoch=round(best.epoch, 3),
        best_map50=best.map50,
        seconds=round(time.perf_counter() - start, 2),
        stop_reason=stop_reason,
        head_epochs=round(warm.epochs, 3),
        head_seconds=round(warm.seconds, 2),
        cached_variants=warm.variants,
    )


class _Stepper:
    """One optimizer update: the schedule's learning rate, a finite-loss check, the (fp16-scaled
    on GPUs without bf16) backward pass, gradient clipping; the loss goes to ``losses``."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device,
                 grad_clip: float, losses: list[float]) -> None:
        self.optimizer, self.grad_clip, self.losses = optimizer, grad_clip, losses
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        use_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)  # bf16 needs none

    def __call__(self, loss: torch.Tensor, lr_factor: float) -> None:
        if not torch.isfinite(loss):
            raise ValueError("detector training diverged: the loss became NaN or infinite")
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * lr_factor
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.losses.append(float(loss.detach()))


class _HeadOutcome(NamedTuple):
    """What the head-first phase did."""

    epochs: float  # passes over the images
    variants: int  # cached views per image
    seconds: float


def _head_first(
    model: FCOS,
    data: DetectionDataset,
    device: torch.device,
    settings: TrainConfig,
    phase: _Phase,
    validator: _Validator,
    progress: Callable[[float], None] | None,
    poll: Callable[[int], None],
    budget: float | None,
) -> _HeadOutcome:
    """Train the FPN and head on cached backbone features; the best weights are loaded at the
    end."""
    restore = freeze_backbone(model)
    try:
        # At most a third of the phase goes to computing features.
        cache_s = (phase.end - phase.start) / 3 if phase.end is not None else None
        # Each pass draws one view of each image: views beyond the passes the phase may make
        # would never be used (an epoch-capped CPU run spent most of its head phase on them).
        variants = min(settings.cached_variants, phase.max_epochs)
        cache = cache_features(model, data, device, variants, cache_s, settings.cache_max_bytes)
        logger.info("head-first: %d views of %d images cached in %.1f s", cache.variants,
                    len(data), cache.seconds)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        update = _Stepper(optimizer, device, settings.grad_clip, validator.losses)
        rng = random.Random(settings.seed)
        per_pass = max(1, len(data) // settings.batch_size if len(data) > settings.batch_size
                       else 1)
        # Validate every pass, or every 200 images when passes are shorter: a pass here costs
        # about what validating 43 images does.
        eval_every = max(per_pass, math.ceil(200 / settings.batch_size))
        step, evaluated_at, done = 0, -1, False
        while not done:
            for views in batches(cache, settings.batch_size, rng):
                poll(step)
                with autocast(device):
                    loss = head_loss(model, views)
                update(loss, cosine(step, phase.fraction(step / per_pass), settings.warmup_steps))
                step += 1
                if progress is not None and budget:
                    progress(min((time.perf_counter() - phase.start) / budget, 0.99))
                if step % eval_every == 0:
                    evaluated_at = step
                    if validator(step / per_pass, step, "head"):
                        done = True
                        break
                over = phase.end is not None and (
                    time.perf_counter() + validator.seconds >= phase.end)
                if over or step >= phase.max_epochs * per_pass:
                    done = True
                    break
        if evaluated_at != step:
            validator(step / per_pass, step, "head")
        assert validator.best.state is not None
        model.load_state_dict(validator.best.state)
    finally:
        restore()
    return _HeadOutcome(step / per_pass, cache.variants, time.perf_counter() - phase.start)


def _finetune(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    settings: TrainConfig,
    phase: _Phase,
    offset: float,
    validator: _Validator,
    progress: Callable[[float], None] | None,
    poll: Callable[[int], None],
    budget: float | None,
    start: float,
) -> tuple[float, Literal["max_epochs", "time_budget", "early_stop"]]:
    """Train end to end from the current weights; returns (epochs run, why it stopped)."""
    update = _Stepper(_optimizer(model, settings), device, settings.grad_clip, validator.losses)
    steps_per_epoch = len(loader)
    total_steps = phase.max_epochs * steps_per_epoch
    eval_every = settings.eval_every_steps or steps_per_epoch
    validator.since_best = 0
    stop_reason: Literal["max_epochs", "time_budget", "early_stop"] = "max_epochs"
    model.train()
    step, evaluated_at, done = 0, -1, False
    while not done:
        for images, targets in loader:
            poll(step)
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with autocast(device):
                loss_parts = model(images, targets)
            loss = sum(part.float() for part in loss_parts.values())
            update(loss,  # type: ignore[arg-type]  # sum() of tensors is a tensor
                   cosine(step, phase.fraction(step / steps_per_epoch), settings.warmup_steps))
            step += 1
            if progress is not None:
                done_share = ((time.perf_counter() - start) / budget if budget
                              else step / total_steps)
                progress(min(done_share, 0.99))
            if step % eval_every == 0 or step == total_steps:
                evaluated_at = step
                if validator(offset + step / steps_per_epoch, step, "finetune"):
                    stop_reason, done = "early_stop", True
                    break
            if step >= total_steps:
                done = True
                break
            if phase.end is not None and time.perf_counter() + validator.seconds >= phase.end:
                stop_reason, done = "time_budget", True
                break
    if evaluated_at != step:
        validator(offset + step / steps_per_epoch, step, "finetune")
    return step / steps_per_epoch, stop_reason
