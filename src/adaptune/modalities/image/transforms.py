"""The model's input transform, and cached images turned into the model's input tensors.

Images are cached by ``prepare_data`` as raw RGB bytes (see :mod:`.sources`); each batch is then
resized, cropped and normalised as the model's pretrained configuration says (timm's
``resolve_data_config``, torchvision's ``weights.transforms()``), with the train-time
augmentations drawn from the run's generator.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from adaptune.modalities.base import Examples


@dataclass(frozen=True)
class ImageTransform:
    """How the model expects its input: resize the shorter side to ``resize_size``, centre-crop
    ``input_size`` (height, width), scale to [0, 1] and normalise with ``mean`` and ``std``."""

    input_size: tuple[int, int]
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def at_size(self, side: int) -> ImageTransform:
        """The same transform for a square ``side`` x ``side`` input (the resize keeps the
        pretrained crop ratio); ``side=0`` leaves it as it is."""
        if not side:
            return self
        ratio = self.resize_size / min(self.input_size)
        return replace(self, input_size=(side, side), resize_size=math.floor(side * ratio))

    @property
    def mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, not tuples), as ``data.json`` stores it."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageTransform:
        return cls(
            input_size=tuple(values["input_size"]),  # type: ignore[arg-type]
            resize_size=int(values["resize_size"]),
            mean=tuple(values["mean"]),  # type: ignore[arg-type]
            std=tuple(values["std"]),  # type: ignore[arg-type]
            interpolation=values.get("interpolation", "bilinear"),
        )


def cached_image(data: bytes, height: int, width: int) -> torch.Tensor:
    """A cached image (raw RGB bytes of ``height`` x ``width``) as a uint8 tensor (3, H, W)."""
    image = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(height, width, 3)
    return image.permute(2, 0, 1)


def resized_for_model(
    data: bytes, height: int, width: int, transform: ImageTransform
) -> np.ndarray:
    """A cached image resized as the model's evaluation transform resizes it (shorter side
    ``resize_size``, before the centre crop): RGB uint8 (H, W, 3)."""
    image = F.resize(
        cached_image(data, height, width),
        transform.resize_size,
        interpolation=transform.mode,
        antialias=True,
    )
    return image.permute(1, 2, 0).contiguous().numpy()


def resized_pixels(data: bytes, height: int, width: int, side: int) -> torch.Tensor:
    """A cached image resized (antialiased) to ``side`` x ``side``, uint8 (3, side, side)."""
    return F.resize(cached_image(data, height, width), [side, side], antialias=True)


def _random_crop_box(
    height: int, width: int, generator: torch.Generator, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (top, left, h, w): area ``scale`` of the image, aspect ratio
    log-uniform in [3/4, 4/3], drawn from ``generator``."""
    area = height * width
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int((height - h) * u[2])
            left = int((width - w) * float(torch.rand(1, generator=generator)))
            return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def image_tensor(
    data: bytes,
    height: int,
    width: int,
    transform: ImageTransform,
    augment: Sequence[str] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One cached image as the model's normalised float input (3, H, W).

    Without augmentation: the model's evaluation transform (resize the shorter side, centre
    crop). ``random_resized_crop`` takes a random 35-100% area crop instead, resized to the input
    size; ``horizontal_flip`` mirrors half of the images.
    """
    image = cached_image(data, height, width)
    if augment and generator is None:
        generator = torch.Generator().manual_seed(0)
    if "random_resized_crop" in augment:
        top, left, h, w = _random_crop_box(height, width, generator, (0.35, 1.0))
        image = F.resized_crop(
            image, top, left, h, w, list(transform.input_size), transform.mode, antialias=True
        )
    else:
        image = F.resize(image, transform.resize_size, interpolation=transform.mode, antialias=True)
        image = F.center_crop(image, list(transform.input_size))
    if "horizontal_flip" in augment and float(torch.rand(1, generator=generator)) < 0.5:
        image = F.horizontal_flip(image)
    return F.normalize(image.float() / 255.0, list(transform.mean), list(transform.std))


class ImageExamples(Examples):
    """Cached images of a split, decoded and transformed one at a time (in data-loading workers
    where there are some). With ``augment``, each example's random draws come from a generator
    seeded by (seed, epoch, index) alone: the same for a seed whatever the workers do."""

    def __init__(
        self, frame: pd.DataFrame, transform: ImageTransform, augment: Sequence[str], seed: int
    ) -> None:
        super().__init__(frame["label_id"].to_numpy())
        self.images = frame["image"].tolist()
        self.heights = frame["height"].to_numpy()
        self.widths = frame["width"].to_numpy()
        self.transform, self.augment, self.seed = transform, tuple(augment), seed

    def generator(self, index: int) -> torch.Generator | None:
        if not self.augment:
            return None
        key = hashlib.sha256(f"{self.seed}:{self.epoch}:{index}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))

    def inputs(self, index: int) -> dict[str, torch.Tensor]:
        height, width = int(self.heights[index]), int(self.widths[index])
        pixels = image_tensor(
            self.images[index], height, width, self.transform, self.augment, self.generator(index)
        )
        return {"pixel_values": pixels}
