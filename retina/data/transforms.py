"""Training augmentation: photographic augmentations (optional), random horizontal flip and the
resize to a training size, boxes and crowd flags moved to match.

Built on torchvision.transforms.v2: boxes travel as ``tv_tensors.BoundingBoxes`` so every
geometric op moves them with the pixels; no geometry is written here.

The order is torchvision's detection references' (``presets.py``, policy "ssd"): photometric
distortion (``v2.RandomPhotometricDistort``), zoom-out (``v2.RandomZoomOut``, SSD Sec. 3.6),
min-IoU crop (``v2.RandomIoUCrop`` + ``v2.SanitizeBoundingBoxes``), then the flip and the size.
``Augmentation()`` turns every photographic step off: the transform is then the flip and the
resize alone, drawing exactly what it drew before they existed.

This is where a training image's size is decided: the shorter side is drawn from ``min_sizes``
and the image resized by the rule of ``retina.model.resize`` (sides rounded), which the model
then keeps as it is. With large-scale jitter (Ghiasi et al. 2021, "Simple Copy-Paste", Sec. 3;
torchvision's policy "lsj") the image is instead scaled to that size times a factor drawn from
``scale_jitter`` (``v2.ScaleJitter``) and cropped (``v2.RandomCrop``) or padded (``v2.Pad``) back
to it: the model still receives an image of the rule's size.

Randomness: every draw (v2's included) uses torch's global RNG, which the training sample stream
(``retina.data.sampler.SeededDataset``) forks and seeds per sample, so a resumed run and
``retina data show`` draw the same augmentations. Evaluation uses no transform: the model
resizes at inference and maps boxes back to the original image, whose size each target keeps in
``orig_size``.

Boxes cut to under 1 px (crop, jitter) are dropped with their ``labels`` and ``iscrowd``
(``SanitizeBoundingBoxes``, the rule ``CocoDetection`` applies to the annotations); an image left
with no box is kept as a negative. Shape legend: M ground-truth boxes of one image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from retina.model.resize import resized_size

Target = dict[str, Any]
Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]
Sample = tuple[tv_tensors.Image, Target]  # boxes as tv_tensors.BoundingBoxes


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


# ------------------------------------------------------------------- v2 samples and sanitising
def _labels_and_crowd(sample: Sample) -> tuple[Tensor, ...]:
    """What ``SanitizeBoundingBoxes`` drops together with each dropped box: ``labels`` (M,) and
    ``iscrowd`` (M,) (a module function, not a lambda: DataLoader workers may pickle it)."""
    target = sample[1]
    return tuple(target[k] for k in ("labels", "iscrowd") if k in target)


SANITIZE = v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_labels_and_crowd)


def to_sample(image: Tensor, target: Target) -> Sample:
    return tv_tensors.Image(image), {**target, "boxes": _boxes(image, target)}


def from_sample(sample: Sample) -> tuple[Tensor, Target]:
    image, target = sample
    return image.as_subclass(Tensor), {**target, "boxes": target["boxes"].as_subclass(Tensor)}


# --------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Augmentation:
    """Photographic augmentations and large-scale jitter; each is off at its default, so
    ``Augmentation()`` is the flip and the resize alone. The fields are ``data.augment``'s
    (``retina.config.schema.AugmentConfig`` documents them), plus ``fill``: the uint8 RGB of the
    canvas that zoom-out and jitter pad with (``build_dataset`` passes the model's mean pixel)."""

    photometric_prob: float = 0.0
    zoom_out_prob: float = 0.0
    zoom_out_max: float = 4.0
    crop_prob: float = 0.0
    crop_min_ious: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    crop_min_scale: float = 0.3
    scale_jitter: tuple[float, float] = (1.0, 1.0)
    fill: tuple[int, int, int] = (0, 0, 0)

    @property
    def jitters(self) -> bool:
        return tuple(self.scale_jitter) != (1.0, 1.0)

    def photographic_steps(self) -> list[v2.Transform]:
        """The v2 transforms applied before the flip, in order (none when all are off)."""
        steps: list[v2.Transform] = []
        if self.photometric_prob > 0:
            steps.append(v2.RandomPhotometricDistort(p=self.photometric_prob))
        if self.zoom_out_prob > 0:
            steps.append(v2.RandomZoomOut(fill=list(self.fill), side_range=(1.0, self.zoom_out_max),
                                          p=self.zoom_out_prob))  # fmt: skip
        if self.crop_prob > 0:
            crop = v2.RandomIoUCrop(min_scale=self.crop_min_scale, sampler_options=list(self.crop_min_ious))
            steps.append(v2.RandomApply([crop], p=self.crop_prob))
            steps.append(SANITIZE)  # RandomIoUCrop marks the boxes it cuts off as degenerate
        return steps


def jitter_resize(image: Tensor, target: Target, min_size: int, max_size: int,
                  scale_range: tuple[float, float],
                  fill: tuple[int, int, int]) -> tuple[Tensor, Target]:  # fmt: skip
    """Large-scale jitter to the rule's training size (H', W') = ``resized_size(H, W, min_size,
    max_size)``: the image is scaled by ``min(H' / H, W' / W) * s``, ``s`` uniform in
    ``scale_range`` (``v2.ScaleJitter``; sides floored), to (h, w); a random window of
    (min(h, H'), min(w, W')) is cut out of it (``v2.RandomCrop``), and padded with ``fill`` on
    the right and bottom to (H', W') (``v2.Pad``; as the LSJ paper and torchvision's
    ``FixedSizeCrop``): a smaller image is kept whole, a larger one cropped."""
    height, width = image.shape[-2:]
    size = resized_size(height, width, min_size, max_size)
    sample = v2.ScaleJitter((size[1], size[0]), scale_range)(*to_sample(image, target))  # (W, H) order
    h, w = sample[0].shape[-2:]
    sample = v2.Compose([
        v2.RandomCrop((min(h, size[0]), min(w, size[1]))),
        v2.Pad([0, 0, max(size[1] - w, 0), max(size[0] - h, 0)], fill=list(fill)),  # left, top, right, bottom
        SANITIZE,
    ])(*sample)
    return from_sample(sample)


@dataclass(frozen=True)
class TrainTransform:
    """Photographic augmentations (``augment``), flip with probability ``hflip_prob``, then the
    training size: a shorter side drawn from ``min_sizes`` (Sec. 4.1 trains with flips;
    multi-scale training is a detectron2 option), reached by a resize or by large-scale jitter."""

    min_sizes: tuple[int, ...]
    max_size: int
    hflip_prob: float
    augment: Augmentation = Augmentation()
    steps: v2.Compose | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        steps = self.augment.photographic_steps()
        object.__setattr__(self, "steps", v2.Compose(steps) if steps else None)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        image, target = self.photographic(image, target)
        if self.hflip_prob > 0 and torch.rand(()).item() < self.hflip_prob:
            image, target = hflip(image, target)
        min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()).item())]
        if self.augment.jitters:
            return jitter_resize(image, target, min_size, self.max_size, self.augment.scale_jitter,
                                 self.augment.fill)  # fmt: skip
        return resize(image, target, min_size, self.max_size)

    def photographic(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        """The steps before the flip (photometric, zoom-out, crop); the identity when all are off."""
        steps = self.steps
        if steps is None:
            return image, target
        if len(target["boxes"]) == 0 and self.augment.crop_prob > 0:
            # RandomIoUCrop aims at a box and would search forever without one: an image without
            # boxes skips the crop (it is still a negative, distorted and zoomed out).
            steps = v2.Compose([t for t in steps.transforms if not isinstance(t, v2.RandomApply)])
        return from_sample(steps(*to_sample(image, target)))


def identity(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    return image, target


def build_transforms(min_sizes: tuple[int, ...], max_size: int, hflip_prob: float, train: bool,
                     augment: Augmentation = Augmentation()) -> Transform:  # fmt: skip
    """Training: ``TrainTransform``; evaluation: the identity (the model resizes)."""
    if not train:
        return identity
    if not min_sizes or min(min_sizes) <= 0 or max_size <= 0:
        raise ValueError(f"min_sizes={min_sizes} and max_size={max_size} must be positive")
    return TrainTransform(tuple(int(s) for s in min_sizes), int(max_size), float(hflip_prob), augment)
