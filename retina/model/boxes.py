"""Box geometry shared by matching and the losses: the IoU of matched pairs of XYXY boxes.

``torchvision.ops.box_iou`` gives the IoU of every box with every other (a P x P matrix); the
ATSS matcher (a box with each of its candidate anchors) and the quality focal loss (a predicted
box with its ground truth) need only P matched pairs, its diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pairwise_matched_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(P,) IoU of boxes1[i] with boxes2[i], both (P, 4) XYXY; 0 for two empty boxes (the union
    is clamped at the dtype's eps)."""
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])  # (P, 2)
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])  # (P, 2)
    inter = (rb - lt).clamp(min=0).prod(-1)  # (P,)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(inter.dtype).eps)
