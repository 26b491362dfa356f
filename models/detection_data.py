"""Detection training data (box-aware augmentation) and a Pascal VOC reader.

Training images are resized once, up front, to the detector's input size with the same
interpolation the model's own transform uses; augmentation then works on the small copies and the
model's resize is the identity. Evaluation and export feed original images: the model resizes.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from models.constants import MEAN
from models.detection_types import DetectionSample
from models.detector import resize_image

Target = dict[str, torch.Tensor]
_EXIF_ORIENTATION = 0x0112
_CORNERS = ("xmin", "ymin", "xmax", "ymax")
# Augmentation strengths: mild, because the sets are small and training is short.
_SCALE = (0.75, 1.25)
_TRANSLATE = (0.1, 0.1)
_FILL = [round(255 * m) for m in MEAN]  # canvas revealed by zooming out: the mean colour


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) that the detector's transform resizes an image of (height, width) to."""
    shape = torch.tensor([height, width], dtype=torch.float32)
    scale = torch.min(min_size / shape.min(), max_size / shape.max())
    size = torch.floor(shape * scale + 1e-3).to(torch.int64)
    return int(size[0]), int(size[1])


def _resize(image: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """uint8 [3,H,W] -> uint8 resized exactly like the detector's own transform (bilinear)."""
    out = resize_image(image.float(), min_size, max_size)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def augmentation() -> v2.Compose:
    """Box-aware training augmentation: flip, scale/translate jitter, photometric jitter."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(0.5),
            v2.RandomAffine(degrees=0.0, translate=_TRANSLATE, scale=_SCALE, fill=_FILL),
            v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.02),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=2.0),  # drops boxes pushed out of the frame
        ]
    )


class DetectionDataset(Dataset[tuple[torch.Tensor, Target]]):
    """Samples as (float image [3,h,w] in [0,1], {"boxes": [K,4] xyxy, "labels": [K]}).

    Images are stored resized to the model's input size (uint8); boxes are clipped to the image
    and scaled with it. ``augment`` applies ``augmentation()`` on every access.
    """

    def __init__(
        self,
        samples: Sequence[DetectionSample],
        min_size: int,
        max_size: int,
        augment: bool = False,
    ) -> None:
        self.images: list[torch.Tensor] = []
        self.boxes: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        for sample in samples:
            height, width = sample.image.shape[:2]
            image = _resize(torch.tensor(sample.image).permute(2, 0, 1), min_size, max_size)
            boxes = torch.from_numpy(sample.boxes).clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width) * (image.shape[2] / width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height) * (image.shape[1] / height)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            self.images.append(image)
            self.boxes.append(boxes[keep])
            self.labels.append(torch.from_numpy(sample.labels)[keep])
        self.transform = augmentation() if augment else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image = self.images[index]
        boxes = tv_tensors.BoundingBoxes(
            self.boxes[index], format="XYXY", canvas_size=tuple(image.shape[-2:])
        )
        labels = self.labels[index]
        if self.transform is not None:
            out = self.transform(
                {"image": tv_tensors.Image(image), "boxes": boxes, "labels": labels}
            )
            image, boxes, labels = out["image"], out["boxes"], out["labels"]
        target = {
            "boxes": boxes.as_subclass(torch.Tensor).float().reshape(-1, 4),
            "labels": labels.as_subclass(torch.Tensor).long(),
        }
        return image.as_subclass(torch.Tensor).float().div_(255.0), target


def collate(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """Keep images as a list: the detector batches (and pads) them itself."""
    return [image for image, _ in batch], [target for _, target in batch]


# --- Pascal VOC -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RejectedObject:
    """A VOC object that was skipped, and why."""

    file: str
    index: int  # position of the <object> in the file, 0-based
    name: str
    reason: str


@dataclass(frozen=True)
class VocAnnotation:
    """One VOC file: boxes as 0-based xyxy float pixels, 0-based labels, skipped objects."""

    xml_path: Path
    image_path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [K,4]
    labels: np.ndarray  # int64 [K]
    rejected: tuple[RejectedObject, ...]


def _image_path(xml_path: Path, filename: str) -> Path:
    candidates = [xml_path.parent / filename, xml_path.parent.parent / "JPEGImages" / filename]
    for path in candidates:
        if filename and path.is_file():
            return path
    for folder in (xml_path.parent, xml_path.parent.parent / "JPEGImages"):
        found = sorted(p for p in folder.glob(f"{xml_path.stem}.*") if p.suffix.lower() != ".xml")
        if found:
            return found[0]
    raise FileNotFoundError(f"{xml_path}: image {filename!r} not found beside it or in JPEGImages")


def _box_problem(corners: list[float], width: int, height: int) -> str | None:
    xmin, ymin, xmax, ymax = corners
    if not all(math.isfinite(v) for v in corners):
        return f"non-finite coordinates {corners}"
    if xmax <= xmin or ymax <= ymin:
        what = "zero area" if xmax == xmin or ymax == ymin else "inverted corners"
        return f"{what}: xmin={xmin:g} xmax={xmax:g} ymin={ymin:g} ymax={ymax:g}"
    outside = xmax <= 0 or ymax <= 0 or xmin - 1 >= width or ymin - 1 >= height
    if width > 0 and height > 0 and outside:
        return f"outside the {width}x{height} image: {corners}"
    return None


def read_voc(xml_path: Path | str, classes: Sequence[str]) -> VocAnnotation:
    """Parse one VOC file. Objects with an unknown class, a missing or degenerate box (zero area,
    inverted corners, non-finite, fully outside the image) are listed in ``rejected``, never raised.

    VOC corners are 1-based inclusive pixels: (xmin, ymin, xmax, ymax) -> (xmin-1, ymin-1, xmax,
    ymax) in 0-based continuous coordinates, clipped to the image.
    """
    xml_path = Path(xml_path)
    root = ET.parse(xml_path).getroot()
    width = int(float(root.findtext("size/width") or 0))
    height = int(float(root.findtext("size/height") or 0))
    index_of = {name: i for i, name in enumerate(classes)}
    boxes: list[list[float]] = []
    labels: list[int] = []
    rejected: list[RejectedObject] = []
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        try:
            corners = [float(obj.findtext(f"bndbox/{k}") or "") for k in _CORNERS]
        except ValueError:
            rejected.append(RejectedObject(str(xml_path), i, name, "missing or non-numeric bndbox"))
            continue
        problem = _box_problem(corners, width, height)
        if problem is None and name not in index_of:
            problem = f"unknown class {name!r} (known: {list(classes)})"
        if problem is not None:
            rejected.append(RejectedObject(str(xml_path), i, name, problem))
            continue
        x1, y1, x2, y2 = corners[0] - 1.0, corners[1] - 1.0, corners[2], corners[3]
        if width > 0 and height > 0:
            x1, x2 = max(x1, 0.0), min(x2, float(width))
            y1, y2 = max(y1, 0.0), min(y2, float(height))
        boxes.append([x1, y1, x2, y2])
        labels.append(index_of[name])
    return VocAnnotation(
        xml_path=xml_path,
        image_path=_image_path(xml_path, (root.findtext("filename") or "").strip()),
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        rejected=tuple(rejected),
    )


def load_voc_image(annotation: VocAnnotation) -> np.ndarray:
    """RGB uint8 [H,W,3] in the frame the boxes refer to.

    That is the EXIF-rotated (displayed) image, unless the annotated size matches only the raw
    pixels (a 90-degree EXIF orientation that the labelling tool ignored).
    """
    with Image.open(annotation.image_path) as raw:
        raw.load()
        orientation = int(raw.getexif().get(_EXIF_ORIENTATION, 1))
        shown = ImageOps.exif_transpose(raw)
        size = (annotation.width, annotation.height)
        use_raw = orientation in (5, 6, 7, 8) and size == raw.size != shown.size
        return np.asarray((raw if use_raw else shown).convert("RGB"))


def load_voc_samples(
    xml_paths: Iterable[Path | str], classes: Sequence[str]
) -> tuple[list[DetectionSample], list[RejectedObject]]:
    """Read VOC files and their images into samples; return the skipped objects beside them."""
    samples: list[DetectionSample] = []
    rejected: list[RejectedObject] = []
    for path in xml_paths:
        annotation = read_voc(path, classes)
        samples.append(
            DetectionSample(load_voc_image(annotation), annotation.boxes, annotation.labels)
        )
        rejected.extend(annotation.rejected)
    return samples, rejected
