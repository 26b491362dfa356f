"""Head-first training: the FPN and FCOS head learn on cached features of a frozen backbone.

On the CPU most of a detector training step is the backbone (forward and backward). With the
backbone frozen, its features for a few augmented copies of every training image can be computed
once; the FPN and head then train on them two to three times faster per step. Fine-tuning the
backbone follows in ``detection_train``, starting from the weights this phase found best.
Measured (models/README.md), 300 s on one thread: cards at 100 images mAP@.5 0.29 end to end,
0.36 with this phase first, 0.50 with this phase alone; bccd needs the fine-tuning (0.86).
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList

from models.detection_data import DetectionDataset, Target
from models.detector import autocast

_STRIDE = 32  # the transform pads images to a multiple of the coarsest backbone stride


@dataclass
class CachedView:
    """Backbone features of one augmented training image, with its target."""

    features: list[torch.Tensor]  # [1,C,h,w] per backbone level, half precision
    target: Target
    image_size: tuple[int, int]  # (h, w) before padding
    padded_size: tuple[int, int]  # (H, W), multiples of 32


@dataclass
class FeatureCache:
    """Augmented views per training image (each image has at least one)."""

    views: list[list[CachedView]]
    seconds: float

    @property
    def variants(self) -> int:
        """Views per image (the fewest any image has)."""
        return min(len(v) for v in self.views)


def cache_features(
    model: FCOS,
    data: DetectionDataset,
    device: torch.device,
    variants: int,
    max_seconds: float | None,
    max_bytes: int,
) -> FeatureCache:
    """Backbone features of up to ``variants`` augmented views of each image, one round over all
    images at a time, stopping after a round once ``max_seconds`` or ``max_bytes`` is used up."""
    start = time.perf_counter()
    views: list[list[CachedView]] = [[] for _ in range(len(data))]
    used = 0
    body = model.backbone.body
    with torch.inference_mode():
        for _ in range(max(1, variants)):
            for i in range(len(data)):
                image, target = data[i]
                batch, targets = model.transform([image.to(device)],
                                                 [{k: v.to(device) for k, v in target.items()}])
                with autocast(device):
                    features = [f.half() for f in body(batch.tensors)]
                used += sum(f.numel() * f.element_size() for f in features)
                padded = batch.tensors.shape[-2:]
                views[i].append(CachedView(features, targets[0], batch.image_sizes[0],
                                           (int(padded[0]), int(padded[1]))))
            spent = time.perf_counter() - start
            if (max_seconds is not None and spent * (1 + 1 / len(views[0])) > max_seconds) or (
                used * (1 + 1 / len(views[0])) > max_bytes
            ):
                break
    return FeatureCache(views, time.perf_counter() - start)


def _batch(views: Sequence[CachedView]) -> tuple[list[torch.Tensor], ImageList]:
    """Zero-pad each level's features to the largest padded size in the batch."""
    height = max(v.padded_size[0] for v in views)
    width = max(v.padded_size[1] for v in views)
    levels = []
    for level in range(len(views[0].features)):
        parts = []
        for v in views:
            f = v.features[level].float()
            stride = v.padded_size[0] // f.shape[-2]
            parts.append(F.pad(f, (0, width // stride - f.shape[-1],
                                   0, height // stride - f.shape[-2])))
        levels.append(torch.cat(parts))
    device = levels[0].device
    # The anchor generator reads only the batch's shape, device and dtype from the tensor.
    shape_only = torch.zeros(1, device=device).expand(len(views), 3, height, width)
    return levels, ImageList(shape_only, [v.image_size for v in views])


def head_loss(model: FCOS, views: Sequence[CachedView]) -> torch.Tensor:
    """FCOS training loss of the FPN + head on cached backbone features."""
    levels, images = _batch(views)
    pyramid = list(model.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(levels)))
                   .values())
    outputs = model.head(pyramid)
    anchors = model.anchor_generator(images, pyramid)
    per_level = [p.size(2) * p.size(3) for p in pyramid]
    parts = model.compute_loss([v.target for v in views], outputs, anchors, per_level)
    return sum(part.float() for part in parts.values())  # type: ignore[return-value]


def batches(cache: FeatureCache, batch_size: int, rng: random.Random) -> list[list[CachedView]]:
    """One pass over the images in random order, a random cached view of each."""
    order = list(range(len(cache.views)))
    rng.shuffle(order)
    full = len(order) - len(order) % batch_size if len(order) > batch_size else len(order)
    return [[rng.choice(cache.views[i]) for i in order[s:s + batch_size]]
            for s in range(0, full, batch_size)]


def cosine(step: int, fraction: float, warmup_steps: int) -> float:
    """Linear warm-up over steps, then cosine decay over the fraction of the phase done."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(fraction, 1.0)))


def freeze_backbone(model: FCOS) -> Callable[[], None]:
    """Freeze every backbone weight; the returned function restores the previous flags."""
    flags = {name: p.requires_grad for name, p in model.backbone.body.named_parameters()}
    for p in model.backbone.body.parameters():
        p.requires_grad_(False)

    def restore() -> None:
        for name, p in model.backbone.body.named_parameters():
            p.requires_grad_(flags[name])

    return restore
