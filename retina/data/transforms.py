"""Training augmentation: random horizontal flip and multi-scale resize, boxes moved to match.

Built on torchvision.transforms.v2: boxes travel as ``tv_tensors.BoundingBoxes`` so every
geometric op moves them with the pixels.

This is where a training image's size is decided: the shorter side is drawn from ``min_sizes``
and the image resized by the rule of ``retina.model.resize`` (sides rounded), which the model
then keeps as it is. Every draw uses torch's RNG, which the training sample stream
(``retina.engine.sampler.SeededDataset``) seeds per sample, so a resumed run draws the same
flips and sizes. Evaluation uses no transform: the model resizes at inference and maps boxes
back to the original image, whose size each target keeps in ``orig_size``.

Shape legend: M ground-truth boxes of one image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from retina.model.resize import resized_size

Target = dict[str, Any]
Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]


def _boxes(image: Tensor, target: Target) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror a (3, H, W) image and its XYXY boxes: x1' = W - x2, x2' = W - x1."""
    boxes = TF.horizontal_flip(_boxes(image, target))  # (M, 4)
    return TF.horizontal_flip(image), {**target, "boxes": boxes.as_subclass(Tensor)}


def resize(image: Tensor, target: Target, min_size: int, max_size: int) -> tuple[Tensor, Target]:
    """Resize a uint8 (3, H, W) image (bilinear) to ``resized_size`` (sides rounded); boxes scaled
    by the same per-axis factors. An unchanged size (a scale within 1e-3 of 1) leaves both as they are."""
    height, width = image.shape[-2:]
    size = list(resized_size(height, width, min_size, max_size))
    if size == [height, width]:
        return image, target
    boxes = TF.resize(_boxes(image, target), size)  # scaled per axis by new / old size
    image = TF.resize(image, size, antialias=False)  # (3, H', W') uint8, bilinear
    return image, {**target, "boxes": boxes.as_subclass(Tensor)}


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
