"""IoU matching of anchors to ground truth, for a whole batch at once.

This module owns the labels: ``-1`` ignored, ``0`` background, ``1`` foreground (Sec. 4: IoU >= 0.5
foreground, < 0.4 background, in between ignored). Ground truth arrives padded to (N, M) with a
validity mask, so one call serves the batch and images without boxes need no special case.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor

from retina.model.blocking import block_rows

IGNORE, BACKGROUND, FOREGROUND = -1, 0, 1


class AnchorMatcher(Protocol):
    """What the assigner calls: ``Matcher`` (IoU thresholds) or ``atss.ATSSMatcher``. Given
    padded ground truth (N, M, .) and (R, 4) anchors (``num_per_level``: R split by level),
    returns the matched box index (N, R) and the label (N, R) in this module's -1/0/1."""

    def __call__(self, gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor, gt_crowd: Tensor | None = None,
                 num_per_level: Sequence[int] | None = None) -> tuple[Tensor, Tensor]: ...


def _signed_iou(gt_boxes: Tensor, anchor_coords: Tensor, sign: Tensor, scratch: Tensor) -> Tensor:
    """(N, M, B) IoU of gt_boxes (N, M, 4) with anchors given as (4, B) rows x1, y1, x2, y2
    (contiguous rows vectorise the broadcasts), times ``sign`` (N, M, 1): +1 for real boxes, -1
    for crowd boxes, 0 for padding (exact), so a max over M sees the real boxes and a min over M
    the crowd boxes.

    The arithmetic of ``torchvision.ops.box_iou`` (same values), written into ``scratch``
    (3, >= N * M * B) fp32, which is reused block after block: the loop allocates nothing. The
    result is a view of scratch[0]."""
    n, m, _ = gt_boxes.shape
    iw, ih, t = (buf[: n * m * anchor_coords.shape[1]].view(n, m, -1) for buf in scratch)
    g = [gt_boxes[..., i, None] for i in range(4)]  # each (N, M, 1)
    a = anchor_coords.unbind(0)  # each (B,)
    torch.minimum(g[2], a[2], out=iw).sub_(torch.maximum(g[0], a[0], out=t)).clamp_(min=0)
    torch.minimum(g[3], a[3], out=ih).sub_(torch.maximum(g[1], a[1], out=t)).clamp_(min=0)
    inter = iw.mul_(ih)  # (N, M, B)
    area_g = (g[2] - g[0]) * (g[3] - g[1])  # (N, M, 1)
    area_a = (a[2] - a[0]) * (a[3] - a[1])  # (B,)
    return inter.div_(torch.add(area_g, area_a, out=t).sub_(inter)).mul_(sign)


class Matcher:
    def __init__(self, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                 allow_low_quality: bool = True) -> None:
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality = allow_low_quality

    def __call__(self, gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor,
                 gt_crowd: Tensor | None = None,
                 num_per_level: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Match anchors to padded ground truth.

        Args:
            gt_boxes: (N, M, 4) XYXY; padding rows are ignored through ``gt_valid``.
            gt_valid: (N, M) bool, real boxes.
            anchors: (R, 4) XYXY, shared by the batch.
            gt_crowd: (N, M) bool, crowd regions: never foreground; anchors that would have
                matched one (IoU >= bg_iou_thresh) are ignored instead of background.
            num_per_level: unused (the anchors' levels do not matter to IoU thresholds); the
                argument ``atss.ATSSMatcher`` needs.
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
        gt_boxes, anchors = gt_boxes.float(), anchors.float()
        real, crowd = gt_valid & ~gt_crowd, gt_valid & gt_crowd  # (N, M)
        sign = torch.where(real, 1.0, torch.where(crowd, -1.0, 0.0))[..., None]  # (N, M, 1)
        best_iou = anchors.new_empty((n, r))  # (N, R) signed best over M
        matched_idx = torch.empty((n, r), dtype=torch.int64, device=anchors.device)
        lowest = anchors.new_empty((n, r))  # (N, R) signed min over M: -(best crowd IoU)
        best_per_gt = anchors.new_full((n, m), -1.0)  # (N, M) signed best over R
        coords = anchors.t().contiguous()  # (4, R)
        step = block_rows(r, n * m, anchors.device)  # anchors per (N, M, R_block) IoU block
        scratch = anchors.new_empty((3, n * m * step))  # reused by every block
        blocks = [(i, min(i + step, r)) for i in range(0, r, step)]  # cache blocking over R
        for i, j in blocks:
            iou = _signed_iou(gt_boxes, coords[:, i:j], sign, scratch)  # (N, M, B)
            torch.max(iou, dim=1, out=(best_iou[:, i:j], matched_idx[:, i:j]))
            torch.amin(iou, dim=1, out=lowest[:, i:j])
            torch.maximum(best_per_gt, iou.amax(dim=2), out=best_per_gt)
        # As a max over IoU with non-real rows at -1 gives: IoU -1 and index 0 without a real
        # box; at IoU 0 the first real box (a 0 of a crowd or padding row may have come first).
        has_real = real.any(dim=1, keepdim=True)  # (N, 1)
        first_real = torch.where(has_real, real.int().argmax(dim=1, keepdim=True), 0)  # (N, 1)
        matched_idx = torch.where(best_iou > 0, matched_idx, first_real)
        best_iou = torch.where(has_real, best_iou, -1.0)

        labels = torch.full((n, r), IGNORE, dtype=torch.int8, device=anchors.device)
        labels[best_iou < self.bg_iou_thresh] = BACKGROUND
        labels[best_iou >= self.fg_iou_thresh] = FOREGROUND

        if self.allow_low_quality:
            # Each GT box also claims the anchors of its highest IoU (ties included), so a box
            # that no anchor overlaps by 0.5 still trains (Faster R-CNN's rule, in detectron2).
            # Crowd and padding rows (codes <= 0) and boxes no anchor overlaps never claim.
            target = best_per_gt.masked_fill(best_per_gt <= 0, 3.0)[..., None]  # (N, M, 1)
            claimed = torch.empty((n, r), dtype=torch.bool, device=anchors.device)
            is_best = torch.empty(n * m * step, dtype=torch.bool, device=anchors.device)
            for i, j in blocks:  # the per-box best is known only now: IoU again, in cache
                iou = _signed_iou(gt_boxes, coords[:, i:j], sign, scratch)
                eq = torch.eq(iou, target, out=is_best[: iou.numel()].view(iou.shape))
                torch.any(eq, dim=1, out=claimed[:, i:j])
            labels[claimed] = FOREGROUND
            # The anchor keeps its overall best box when several claim it, as in detectron2.

        crowd_iou = torch.where(crowd.any(dim=1, keepdim=True), -lowest, -1.0)  # (N, R)
        labels[(labels == BACKGROUND) & (crowd_iou >= self.bg_iou_thresh)] = IGNORE
        return matched_idx, labels
