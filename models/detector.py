"""FCOS object detector on the pretrained EfficientNet-Lite0 backbone with an FPN.

torchvision's FCOS is anchor-free, handles images without boxes, and exports to ONNX with its
resizing and NMS inside the graph (DESIGN.md section 2). Its classifier is one sigmoid per class
with no background column, so labels stay 0-based class indices everywhere.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from models.backbone import load_backbone
from models.constants import MEAN, STD
from models.detection_types import Detections, DetectionSample

_ARCH = "efficientnet_lite0"
_BN_EPS = 1e-3  # the pretrained weights' BatchNorm eps (see backbone.py)
_OUT_INDICES = (2, 3, 4)  # strides 8/16/32, 40/112/320 channels
# Stem and the first two stages (strides 2 and 4) stay frozen, like torchvision's default of
# three trainable ResNet stages: their backward pass is the costliest on CPU and low-level
# features transfer well.
_FROZEN_PREFIXES = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector; ``to_dict`` / ``from_dict`` round-trip via JSON.

    Images are resized so the short side is ``min_size`` unless the long side would exceed
    ``max_size``. ``levels`` 3 uses FPN P3-P5, 5 adds P6-P7. ``anchor_sizes`` (one per level,
    default the level strides) set FCOS's scale ranges: a location on a level with size s learns
    objects whose largest centre-to-side distance lies in (4s, 8s).
    """

    num_classes: int
    # 320 px beat 416 and 512 on bccd within a fixed 300 s CPU budget (models/README.md).
    min_size: int = 320
    max_size: int = 544
    levels: int = 5
    fpn_channels: int = 64
    head_convs: int = 4
    anchor_sizes: tuple[int, ...] | None = None
    center_sampling_radius: float = 1.5
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    topk_candidates: int = 1000

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.levels not in (3, 5):
            raise ValueError(f"levels must be 3 (P3-P5) or 5 (P3-P7), got {self.levels}")
        if not 32 <= self.min_size <= self.max_size:
            raise ValueError(
                f"need 32 <= min_size <= max_size, got {self.min_size}, {self.max_size}"
            )
        if self.fpn_channels % 32 or self.fpn_channels < 32:
            # FCOSHead uses GroupNorm with 32 groups.
            raise ValueError(f"fpn_channels must be a multiple of 32, got {self.fpn_channels}")
        if self.anchor_sizes is not None:
            self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
            if len(self.anchor_sizes) != self.levels:
                raise ValueError(
                    f"anchor_sizes needs one size per level ({self.levels}), "
                    f"got {self.anchor_sizes}"
                )
        if not (0.0 <= self.score_thresh < 1.0 and 0.0 < self.nms_thresh <= 1.0):
            raise ValueError("score_thresh must lie in [0, 1) and nms_thresh in (0, 1]")

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Anchor size of each level (default: its stride, 8 * 2**i)."""
        return self.anchor_sizes or tuple(8 * 2**i for i in range(self.levels))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.anchor_sizes is not None:
            out["anchor_sizes"] = list(self.anchor_sizes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DetectorConfig fields: {unknown}")
        return cls(**data)


class BackboneFPN(nn.Module):
    """EfficientNet-Lite0 stages at strides 8/16/32 + FPN; BatchNorm statistics stay frozen."""

    def __init__(self, config: DetectorConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.body = timm.create_model(
            _ARCH, pretrained=False, features_only=True, out_indices=_OUT_INDICES, bn_eps=_BN_EPS
        )
        if pretrained:
            full = load_backbone().state_dict()  # the offline weights, mapped onto timm names
            self.body.load_state_dict({k: full[k] for k in self.body.state_dict()}, strict=True)
        for name, param in self.body.named_parameters():
            if name.startswith(_FROZEN_PREFIXES):
                param.requires_grad_(False)
        channels = self.body.feature_info.channels()
        extra = (
            LastLevelP6P7(config.fpn_channels, config.fpn_channels) if config.levels == 5 else None
        )
        self.fpn = FeaturePyramidNetwork(channels, config.fpn_channels, extra_blocks=extra)
        self.out_channels = config.fpn_channels

    def train(self, mode: bool = True) -> BackboneFPN:
        super().train(mode)
        # Detection batches are a few images: batch statistics would be noise, so BatchNorm keeps
        # the pretrained running statistics (torchvision freezes them likewise).
        for module in self.body.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


class _Transform(GeneralizedRCNNTransform):
    """torchvision's detection transform with a resize whose output size eager PyTorch and the
    exported graph compute identically.

    torchvision's traced resize computes the size in its own float32 arithmetic: 400 px at
    scale 0.8 came out as 319 rows in ONNX but 320 in eager PyTorch, a different sampling of the
    whole image (boxes then differed by ~0.5 px). Here both paths run the same float32 ops.
    """

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        height, width = image.shape[-2:]
        image = resize_image(image, self.min_size[-1], self.max_size)
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (height, width), image.shape[-2:])
        return image, target


def resize_image(image: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """Bilinear resize of a [C,H,W] float image: short side ``min_size``, long side at most
    ``max_size``; the same arithmetic in eager mode and in the exported graph."""
    if torchvision._is_tracing():
        shape = torch._shape_as_tensor(image)[-2:].to(torch.float32)
    else:
        shape = torch.tensor(image.shape[-2:], dtype=torch.float32)
    scale = torch.min(min_size / shape.min(), max_size / shape.max())
    # The small margin keeps exact ratios (400 px * 0.8) from flooring to one pixel less.
    size = torch.floor(shape * scale + 1e-3).to(torch.int64)
    out_size = (size[0], size[1]) if torchvision._is_tracing() else (int(size[0]), int(size[1]))
    return F.interpolate(
        image[None],
        size=out_size,  # type: ignore[arg-type]  # traced 0-d tensors during ONNX export
        mode="bilinear",
        align_corners=False,
    )[0]


def build_detector(config: DetectorConfig, pretrained: bool = True) -> FCOS:
    """FCOS for ``config.num_classes`` classes; takes float RGB [3,H,W] images in [0, 1].

    ``pretrained=False`` skips loading the ImageNet weights (use it before loading a state dict).
    """
    backbone = BackboneFPN(config, pretrained=pretrained)
    sizes = config.level_sizes
    anchors = AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))
    head = FCOSHead(backbone.out_channels, 1, config.num_classes, num_convs=config.head_convs)
    model = FCOS(
        backbone,
        num_classes=config.num_classes,
        min_size=config.min_size,
        max_size=config.max_size,
        image_mean=list(MEAN),
        image_std=list(STD),
        anchor_generator=anchors,
        head=head,
        center_sampling_radius=config.center_sampling_radius,
        score_thresh=config.score_thresh,
        nms_thresh=config.nms_thresh,
        detections_per_img=config.detections_per_img,
        topk_candidates=config.topk_candidates,
    )
    model.transform = _Transform(config.min_size, config.max_size, list(MEAN), list(STD))
    return model


# Objects this small (longer side at the input size, a class's median) need the half-stride
# anchor sizes: platelets in bccd (~26 px at 320) went from AP@.5 0.30 to 0.79, while cards
# (~110 px) lost 10 points mAP@.5 with them (models/README.md).
SMALL_OBJECT_PX = 40.0


def config_for(
    train: Sequence[DetectionSample], num_classes: int, **overrides: Any
) -> DetectorConfig:
    """A DetectorConfig whose anchor sizes suit the training boxes.

    When some class's median object is under SMALL_OBJECT_PX at the input size, each level's
    anchor size is half its stride (4..64): the small objects then get FCOS's finest levels to
    themselves. Otherwise the torchvision default (the strides) is kept.
    """
    config = DetectorConfig(num_classes=num_classes, **overrides)
    if "anchor_sizes" in overrides:
        return config
    sides: dict[int, list[float]] = {}
    for sample in train:
        height, width = sample.image.shape[:2]
        scale = min(config.min_size / min(height, width), config.max_size / max(height, width))
        longer = np.maximum(
            sample.boxes[:, 2] - sample.boxes[:, 0], sample.boxes[:, 3] - sample.boxes[:, 1]
        )
        for label, side in zip(sample.labels.tolist(), (longer * scale).tolist(), strict=True):
            sides.setdefault(label, []).append(side)
    medians = [float(np.median(v)) for v in sides.values()]
    if medians and min(medians) < SMALL_OBJECT_PX:
        config.anchor_sizes = tuple(4 * 2**i for i in range(config.levels))
    return config


def load_detector(config: DetectorConfig, state_dict: dict[str, torch.Tensor]) -> FCOS:
    """Rebuild a trained detector (eval mode, CPU) from its config and state dict."""
    model = build_detector(config, pretrained=False)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def predict_detections(
    model: FCOS,
    images: Sequence[np.ndarray],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
) -> list[Detections]:
    """Run the detector (eval mode) on RGB uint8 [H,W,3] images; boxes in original pixels."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out: list[Detections] = []
    try:
        for start in range(0, len(images), batch_size):
            # torch.tensor copies: decoded images are often read-only numpy views.
            batch = [
                torch.tensor(image, device=device).permute(2, 0, 1).float() / 255.0
                for image in images[start : start + batch_size]
            ]
            # float32 even on CUDA: bf16 box regression would cost ~0.4% of a box's size, and
            # the metrics must describe the float32 graph that is exported.
            with torch.inference_mode():
                results = model(batch)
            out.extend(
                Detections(
                    boxes=r["boxes"].float().cpu().numpy(),
                    scores=r["scores"].float().cpu().numpy(),
                    labels=r["labels"].cpu().numpy().astype(np.int64),
                )
                for r in results
            )
    finally:
        model.train(was_training)
    return out


def autocast(device: torch.device) -> torch.autocast | nullcontext[None]:
    """bf16 (fp16 where bf16 is unsupported) autocast on CUDA; nothing on CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
