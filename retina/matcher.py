"""IoU matching of anchors to ground truth, for a whole batch at once.

This module owns the labels: ``-1`` ignored, ``0`` background, ``1`` foreground (Sec. 4: IoU >= 0.5
foreground, < 0.4 background, in between ignored). Ground truth arrives padded to (N, M) with a
validity mask, so one call serves the batch and images without boxes need no special case.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

IGNORE, BACKGROUND, FOREGROUND = -1, 0, 1


class Matcher:
    def __init__(self, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                 allow_low_quality: bool = True) -> None:
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality = allow_low_quality

    def __call__(self, gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor,
                 gt_crowd: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Match anchors to padded ground truth.

        Args:
            gt_boxes: (N, M, 4) XYXY; padding rows are ignored through ``gt_valid``.
            gt_valid: (N, M) bool, real boxes.
            anchors: (R, 4) XYXY, shared by the batch.
            gt_crowd: (N, M) bool, crowd regions: never foreground; anchors that would have
                matched one (IoU >= bg_iou_thresh) are ignored instead of background.
        Returns:
            matched_idx: (N, R) int64 index into M of each anchor's best box (0 where none).
            labels: (N, R) int8 in {-1, 0, 1}.
        """
        n, m = gt_valid.shape
        r = anchors.shape[0]
        if gt_crowd is None:
            gt_crowd = torch.zeros_like(gt_valid)
        if m == 0:
            zeros = torch.zeros((n, r), dtype=torch.int64, device=anchors.device)
            return zeros, zeros.to(torch.int8)
        iou = box_iou(gt_boxes.reshape(-1, 4).float(), anchors.float()).view(n, m, r)  # (N, M, R)
        real = gt_valid & ~gt_crowd  # (N, M)
        iou_real = iou.masked_fill(~real[:, :, None], -1.0)
        best_iou, matched_idx = iou_real.max(dim=1)  # (N, R)

        labels = torch.full((n, r), IGNORE, dtype=torch.int8, device=anchors.device)
        labels[best_iou < self.bg_iou_thresh] = BACKGROUND
        labels[best_iou >= self.fg_iou_thresh] = FOREGROUND

        if self.allow_low_quality:
            # Each GT box also claims the anchors of its highest IoU (ties included), so a box
            # that no anchor overlaps by 0.5 still trains (Faster R-CNN's rule, in detectron2).
            best_per_gt = iou_real.max(dim=2, keepdim=True).values  # (N, M, 1)
            is_best = (iou_real == best_per_gt) & real[:, :, None] & (best_per_gt > 0)  # (N, M, R)
            claimed = is_best.any(dim=1)  # (N, R)
            labels[claimed] = FOREGROUND
            # The anchor keeps its overall best box when several claim it, as in detectron2.

        crowd_iou = iou.masked_fill(~(gt_valid & gt_crowd)[:, :, None], -1.0).max(dim=1).values
        labels[(labels == BACKGROUND) & (crowd_iou >= self.bg_iou_thresh)] = IGNORE
        return matched_idx, labels
