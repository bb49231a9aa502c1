"""ATSS matching (Zhang et al. 2020, "Bridging the Gap Between Anchor-based and Anchor-free
Detection via Adaptive Training Sample Selection", Sec. 3.1, Algorithm 1), for a whole batch.

The same contract as ``matcher.Matcher``: (N, M) padded ground truth in, (N, R) matched box index
and labels in {-1, 0, 1} out. Instead of fixed IoU thresholds each box chooses its own: its
candidates are the anchors of the ``topk`` locations nearest its centre on every level (all A
anchors of a location, as the authors' code takes ``topk * A``), its threshold is the mean plus
the standard deviation (unbiased, ``torch.std``) of their IoU, and a candidate becomes foreground
when its IoU reaches that threshold and its centre lies inside the box (more than 0.01 px from
every side, the authors' margin). An anchor claimed by several boxes takes the one it overlaps
most (the lowest index among equal IoU). Every other anchor is background: ATSS has no ignore
band, except around crowd (or VOC ``difficult``) boxes, whose background anchors of IoU >=
``crowd_iou_thresh`` are ignored as ``Matcher`` ignores them.

Shape legend: N images, M boxes (padded), R anchors, L levels, P_l locations of level l, A
anchors per location, C = sum_l min(topk, P_l) * A candidates per box. One loop over the L levels
(a handful); none over anchors or boxes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from retina.model.boxes import pairwise_matched_iou
from retina.model.matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher

# The authors' margin: a centre on the box's edge is not inside it.
INSIDE_EPS = 0.01


class ATSSMatcher:
    def __init__(self, topk: int = 9, anchors_per_location: int = 9, crowd_iou_thresh: float = 0.4) -> None:
        if topk < 1 or anchors_per_location < 1:
            raise ValueError(f"ATSS needs topk >= 1 and anchors_per_location >= 1, got {topk}, "
                             f"{anchors_per_location}")
        self.topk = topk
        self.anchors_per_location = anchors_per_location
        # the IoU matcher with no real box: its labels are IGNORE exactly near a crowd box
        self.crowd_matcher = Matcher(1.0, crowd_iou_thresh, allow_low_quality=False)

    def candidates(self, gt_centers: Tensor, anchor_centers: Tensor, num_per_level: Sequence[int]) -> Tensor:
        """(N, M, C) indices into R of each box's candidates: on every level the A anchors of the
        ``topk`` locations whose centres are nearest the box's centre (Euclidean; ties to the
        lower index). gt_centers (N, M, 2), anchor_centers (R, 2); anchors ordered level, H, W,
        A (``anchors.py``), so the A anchors of a location are consecutive and share a centre."""
        a = self.anchors_per_location
        n = gt_centers.shape[0]
        per_level, start = [], 0
        for count in num_per_level:  # L levels
            if count % a:
                raise ValueError(f"a level has {count} anchors, not a multiple of {a} per location")
            loc = anchor_centers[start:start + count:a]  # (P_l, 2): one centre per location
            dist = torch.cdist(gt_centers, loc.expand(n, -1, -1),
                               compute_mode="donot_use_mm_for_euclid_dist")  # (N, M, P_l), exact
            k = min(self.topk, loc.shape[0])
            nearest = dist.topk(k, dim=2, largest=False, sorted=True).indices  # (N, M, k)
            offsets = torch.arange(a, device=nearest.device)  # (A,)
            per_level.append((start + nearest[..., None] * a + offsets).flatten(2))  # (N, M, k * A)
            start += count
        if start != anchor_centers.shape[0]:
            raise ValueError(f"num_per_level sums to {start}, but there are "
                             f"{anchor_centers.shape[0]} anchors")
        return torch.cat(per_level, dim=2)  # (N, M, C)

    def __call__(self, gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor,
                 gt_crowd: Tensor | None = None,
                 num_per_level: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Match anchors to padded ground truth (``Matcher.__call__``'s arguments and results);
        ``num_per_level``: the anchors of each level, in order (R in all), required."""
        if num_per_level is None:
            raise ValueError("ATSS matching needs the number of anchors on each level (num_per_level)")
        n, m = gt_valid.shape
        r = anchors.shape[0]
        if gt_crowd is None:
            gt_crowd = torch.zeros_like(gt_valid)
        matched_idx = torch.zeros((n, r), dtype=torch.int64, device=anchors.device)
        labels = torch.full((n, r), BACKGROUND, dtype=torch.int8, device=anchors.device)
        if m == 0:
            return matched_idx, labels
        gt_boxes, anchors = gt_boxes.float(), anchors.float()
        real = gt_valid & ~gt_crowd  # (N, M)
        gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (N, M, 2)
        anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # (R, 2)
        cand = self.candidates(gt_centers, anchor_centers, num_per_level)  # (N, M, C)
        c = cand.shape[2]
        cand_boxes = anchors[cand]  # (N, M, C, 4)
        iou = pairwise_matched_iou(gt_boxes[:, :, None].expand_as(cand_boxes).reshape(-1, 4),
                                   cand_boxes.reshape(-1, 4)).view(n, m, c)  # (N, M, C)
        spread = iou.std(dim=2, keepdim=True) if c > 1 else torch.zeros_like(iou)  # C = 1: no spread
        thresh = iou.mean(dim=2, keepdim=True) + spread  # (N, M, 1)
        centers = anchor_centers[cand]  # (N, M, C, 2)
        inside = torch.cat([centers - gt_boxes[:, :, None, :2],
                            gt_boxes[:, :, None, 2:] - centers], dim=-1).amin(dim=-1) > INSIDE_EPS
        positive = (iou >= thresh) & inside & real[..., None]  # (N, M, C)

        # Each anchor's best positive box: the largest IoU over the boxes that chose it.
        flat = cand.view(n, m * c)  # (N, M * C) anchor indices
        score = torch.where(positive, iou, -1.0).view(n, m * c)
        best = torch.full((n, r), -1.0, device=anchors.device).scatter_reduce(1, flat, score, "amax")
        wins = positive.view(n, m * c) & (score == best.gather(1, flat))  # (N, M * C)
        box_idx = torch.arange(m, device=anchors.device).repeat_interleave(c).expand(n, -1)  # (N, M * C)
        matched_idx = matched_idx.fill_(m).scatter_reduce(
            1, flat, torch.where(wins, box_idx, m), "amin")  # (N, R); m where no box won
        fg = matched_idx < m
        labels[fg] = FOREGROUND
        matched_idx = matched_idx.masked_fill(~fg, 0)

        if gt_crowd.any():  # background near a crowd box is ignored, as the IoU matcher does
            _, crowd_labels = self.crowd_matcher(gt_boxes, gt_valid & gt_crowd, anchors, gt_crowd)
            labels[(labels == BACKGROUND) & (crowd_labels == IGNORE)] = IGNORE
        return matched_idx, labels
