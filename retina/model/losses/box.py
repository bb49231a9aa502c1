"""Box losses: smooth L1 / L1 on the deltas, or 1 - GIoU of the decoded boxes, per image; and the
IoU of each foreground anchor's predicted box with its ground truth (the soft target of the
quality focal loss). Computed in fp32 whatever the input's precision (fp64 stays fp64).

Shape legend: N images, R anchors per image, P foreground anchors of the batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from retina.model.boxes import pairwise_matched_iou
from retina.model.losses.focal import compute_dtype


def decode_foreground(pred_deltas: Tensor, gt_deltas: Tensor, fg: Tensor, anchors: Tensor,
                      decode: Callable[[Tensor, Tensor], Tensor]
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The P foreground anchors' image and anchor indices (P,), (P,) and their predicted and
    ground-truth boxes (P, 4), both decoded from their deltas on the anchor (``decode``: the
    model's box coder; it keeps fp64 and lifts half to fp32)."""
    n, r = fg.nonzero(as_tuple=True)  # (P,), (P,)
    dtype = compute_dtype(pred_deltas)
    a = anchors[r].to(dtype)  # (P, 4)
    return n, r, decode(pred_deltas[n, r].to(dtype), a), decode(gt_deltas[n, r].to(dtype), a)


def iou_targets(pred_deltas: Tensor, gt_deltas: Tensor, fg: Tensor, anchors: Tensor,
                decode: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """(N, R) IoU of each foreground anchor's predicted box with its ground-truth box (0 for the
    other anchors), no gradient: the classification target of ``quality_focal``. fp32."""
    n, r, pred, gt = decode_foreground(pred_deltas.detach(), gt_deltas, fg, anchors, decode)
    out = torch.zeros(fg.shape, dtype=pred.dtype, device=fg.device)  # (N, R)
    out[n, r] = pairwise_matched_iou(pred, gt)
    return out


def box_regression_loss(pred: Tensor, target: Tensor, kind: str, beta: float) -> Tensor:
    """Elementwise smooth L1 (beta) or L1 loss, shape of ``pred``; fp32 (fp64 stays fp64)."""
    dtype = compute_dtype(pred)
    pred, target = pred.to(dtype), target.to(dtype)
    if kind == "l1" or beta == 0:
        return (pred - target).abs()
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="none")


def giou_loss_per_image(pred_deltas: Tensor, gt_deltas: Tensor, fg: Tensor, anchors: Tensor,
                        decode: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """(N,) summed ``1 - GIoU`` (torchvision.ops.generalized_box_iou_loss) of each image's
    foreground anchors (``decode_foreground``). fp32 (fp64 stays fp64)."""
    n, _, pred, gt = decode_foreground(pred_deltas, gt_deltas, fg, anchors, decode)  # (P, 4) each
    loss = generalized_box_iou_loss(pred, gt, reduction="none")  # (P,)
    return torch.zeros(fg.shape[0], dtype=loss.dtype, device=loss.device).index_add_(0, n, loss)
