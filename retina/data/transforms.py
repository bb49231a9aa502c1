"""Training augmentation: random horizontal flip and multi-scale resize, boxes moved to match.

Evaluation uses no transform: the model resizes at inference and maps boxes back to the original
image, whose size each target keeps in ``orig_size``. Randomness comes from torch's global RNG,
so ``torch.manual_seed`` (and the DataLoader's per-worker seeding) makes it reproducible.

Shape legend: M ground-truth boxes of one image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Target = dict[str, Any]
Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror a (3, H, W) image and its XYXY boxes: x1' = W - x2, x2' = W - x1."""
    width = image.shape[-1]
    boxes = target["boxes"]  # (M, 4)
    flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    return image.flip(-1), {**target, "boxes": flipped}


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Scale bringing the shorter side to ``min_size`` unless the longer would pass ``max_size``.

    The same rule as the model's own resize, so the model keeps images resized here as they are.
    """
    return min(min_size / min(height, width), max_size / max(height, width))


def resize(image: Tensor, target: Target, min_size: int, max_size: int) -> tuple[Tensor, Target]:
    """Resize a uint8 (3, H, W) image (bilinear) to ``resize_scale``; boxes scaled by the same
    factor. A scale within 1e-3 of 1 leaves both untouched."""
    height, width = image.shape[-2:]
    scale = resize_scale(height, width, min_size, max_size)
    if abs(scale - 1) < 1e-3:
        return image, target
    size = (round(height * scale), round(width * scale))
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                            antialias=False)[0]  # fmt: skip
    image = resized.round_().clamp_(0, 255).to(torch.uint8)  # (3, H', W')
    return image, {**target, "boxes": target["boxes"] * scale}


@dataclass(frozen=True)
class TrainTransform:
    """Flip with probability ``hflip_prob``, then resize with a shorter side drawn from
    ``min_sizes`` (Sec. 4.1 trains with flips; multi-scale training is a detectron2 option)."""

    min_sizes: tuple[int, ...]
    max_size: int
    hflip_prob: float

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if self.hflip_prob > 0 and torch.rand(()).item() < self.hflip_prob:
            image, target = hflip(image, target)
        min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()).item())]
        return resize(image, target, min_size, self.max_size)


def identity(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    return image, target


def build_transforms(min_sizes: tuple[int, ...], max_size: int, hflip_prob: float,
                     train: bool) -> Transform:  # fmt: skip
    """Training: ``TrainTransform``; evaluation: the identity (the model resizes)."""
    if not train:
        return identity
    if not min_sizes or min(min_sizes) <= 0 or max_size <= 0:
        raise ValueError(f"min_sizes={min_sizes} and max_size={max_size} must be positive")
    return TrainTransform(tuple(int(s) for s in min_sizes), int(max_size), float(hflip_prob))
