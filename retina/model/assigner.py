"""Target assignment for a whole batch: pad ground truth, match (``matcher.py``; ATSS:
``atss.py``), encode (``box_coder.py``). No loop over anchors or boxes; one loop over images
only to pad.

The result is what the loss reads, in detectron2's label encoding: per anchor ``gt_classes``
-1 ignored, 0..K-1 the class of its box (foreground), K background. The matcher's own
-1/0/1 labels stay inside this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from retina.model.box_coder import BoxCoder
from retina.model.matcher import BACKGROUND, FOREGROUND, AnchorMatcher


@dataclass
class PaddedTargets:
    boxes: Tensor  # (N, M, 4) XYXY, zeros in padding
    labels: Tensor  # (N, M) int64
    valid: Tensor  # (N, M) bool
    crowd: Tensor  # (N, M) bool


@dataclass
class AssignedTargets:
    gt_classes: Tensor  # (N, R) int64: -1 ignored, 0..K-1 foreground class, K background
    gt_deltas: Tensor  # (N, R, 4) encoded matched boxes (meaningful where foreground)


def pad_targets(targets: list[dict], device: torch.device) -> PaddedTargets:
    """Stack per-image ``boxes`` (M_i, 4), ``labels`` (M_i,), optional ``iscrowd`` to (N, M)."""
    n = len(targets)
    m = max([len(t["boxes"]) for t in targets] + [1])
    boxes = torch.zeros((n, m, 4), dtype=torch.float32, device=device)
    labels = torch.zeros((n, m), dtype=torch.int64, device=device)
    valid = torch.zeros((n, m), dtype=torch.bool, device=device)
    crowd = torch.zeros((n, m), dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        k = len(t["boxes"])
        boxes[i, :k] = t["boxes"].to(device, torch.float32)
        labels[i, :k] = t["labels"].to(device)
        valid[i, :k] = True
        if "iscrowd" in t:
            crowd[i, :k] = t["iscrowd"].to(device, torch.bool)
    return PaddedTargets(boxes, labels, valid, crowd)


class TargetAssigner:
    def __init__(self, matcher: AnchorMatcher, box_coder: BoxCoder, num_classes: int) -> None:
        self.matcher = matcher
        self.box_coder = box_coder
        self.num_classes = num_classes

    def __call__(self, gt: PaddedTargets, anchors: Tensor,
                 num_per_level: Sequence[int] | None = None) -> AssignedTargets:
        """Assign (R, 4) anchors to padded ground truth of N images; ``num_per_level`` (the
        anchors of each level, in order) is passed to the matcher (ATSS needs it)."""
        if gt.valid.shape[1] == 0:  # M = 0: one invalid row keeps the gathers below in range
            n = gt.valid.shape[0]
            gt = PaddedTargets(gt.boxes.new_zeros((n, 1, 4)), gt.labels.new_zeros((n, 1)),
                               gt.valid.new_zeros((n, 1)), gt.crowd.new_zeros((n, 1)))
        matched_idx, labels = self.matcher(gt.boxes, gt.valid, anchors, gt.crowd, num_per_level)  # (N, R)
        matched_boxes = torch.gather(gt.boxes, 1, matched_idx[..., None].expand(-1, -1, 4))  # (N, R, 4)
        gt_classes = torch.gather(gt.labels, 1, matched_idx)  # (N, R)
        gt_classes = torch.where(labels == FOREGROUND, gt_classes,
                                 torch.where(labels == BACKGROUND, self.num_classes, -1))  # (N, R)
        gt_deltas = self.box_coder.encode(matched_boxes, anchors[None].expand_as(matched_boxes))
        return AssignedTargets(gt_classes, gt_deltas)
