"""The resize rule, in one place: the size an image is resized to and how its boxes follow.

Each image is resized once, by one owner: the data pipeline resizes training images
(``retina.data.transforms``, shorter side drawn from ``model.input.min_size`` by the seeded
sample stream; the model takes them as they arrive), and the model resizes eval and predict
inputs (``RetinaNet.inference_size``, the test size). Both ask this module for the new size.

The rule (Sec. 4.1: "shorter side 800 px"; detectron2's ResizeShortestEdge): scale by
``s = min(min_size / min(H, W), max_size / max(H, W))``, then round the sides, or floor them as
torchvision's ``GeneralizedRCNNTransform`` does (``F.interpolate(scale_factor=s,
recompute_scale_factor=True)``). Boxes are scaled per axis by new / old size, so box edges on
the image edges stay on them whatever the rounding.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor

ResizeMode = Literal["round", "torchvision"]

# A scale this close to 1 leaves the image as it is ("round" only): resampling would only blur it.
NO_RESIZE_TOLERANCE = 1e-3


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Scale that brings the shorter side to ``min_size`` without the longer passing ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resized_size(height: int, width: int, min_size: int, max_size: int,
                 mode: ResizeMode = "round") -> tuple[int, int]:  # fmt: skip
    """(H', W') of an H x W image under the rule: sides rounded (``"round"``; unchanged when the
    scale is within ``NO_RESIZE_TOLERANCE`` of 1) or floored (``"torchvision"``); at least 1 px."""
    scale = resize_scale(height, width, min_size, max_size)
    if mode == "torchvision":
        return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
    if abs(scale - 1) < NO_RESIZE_TOLERANCE:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def eval_size(min_sizes: Sequence[int], max_size: int, test_min_size: int | None,
              test_max_size: int | None) -> tuple[int, int]:
    """(shorter side, longer-side cap) at inference: the test keys when set, else the last
    training size and the training cap."""
    return (min_sizes[-1] if test_min_size is None else test_min_size,
            max_size if test_max_size is None else test_max_size)


def axis_scale(new_size: Sequence[int], old_size: Sequence[int]) -> Tensor:
    """(4,) factors (W' / W, H' / H, W' / W, H' / H) that take XYXY boxes of an image of
    ``old_size`` (H, W) to ``new_size``: the sizes' own ratio, not the nominal scale."""
    sy, sx = new_size[0] / old_size[0], new_size[1] / old_size[1]
    return torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
