"""Detection confusion matrix with a background row and column.

Detections scoring >= ``score_thresh`` are matched to ground truth class-agnostically, greedily by
score (COCO's rule): each detection, highest score first, takes the still-unmatched GT box it
overlaps most, if that IoU (``torchvision.ops.box_iou``) is >= ``iou_thresh``. Then

- a matched pair counts at (GT class, predicted class): the diagonal is correct, the rest are
  classification errors;
- an unmatched GT box counts at (GT class, background): missed;
- an unmatched detection counts at (background, predicted class): spurious, which includes
  duplicates of an already matched object and badly localised boxes.

Crowd GT boxes (``iscrowd``) are never matched; an unmatched detection that lies inside one
(intersection >= ``iou_thresh`` x its own area, COCO's crowd rule) is left out rather than
counted as spurious.

Shape legend: D detections of one image, M ground-truth boxes of one image, K classes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torchvision.ops import box_convert, box_iou


def greedy_match(iou: Tensor, iou_thresh: float) -> Tensor:
    """Greedy one-to-one matching of detections (rows, sorted by descending score) to GT.

    Args:
        iou: (D, M) IoU of each detection with each GT box.

    Returns:
        (D,) index of the matched GT box, -1 for an unmatched detection.
    """
    matched = torch.full((iou.shape[0],), -1, dtype=torch.int64)
    if iou.numel() == 0:
        return matched
    free = torch.ones(iou.shape[1], dtype=torch.bool)  # (M,)
    # Greedy matching is sequential by definition: each detection sees what the better-scored
    # ones left. A loop over <= 100 detections per image, at analysis time only.
    for d in range(iou.shape[0]):
        candidates = torch.where(free, iou[d], torch.full_like(iou[d], -1.0))  # (M,)
        best = int(candidates.argmax())
        if candidates[best] >= iou_thresh:
            matched[d] = best
            free[best] = False
    return matched


def _inside_fraction(boxes: Tensor, regions: Tensor) -> Tensor:
    """(D, C) intersection area / box area of XYXY ``boxes`` (D, 4) with ``regions`` (C, 4)."""
    lt = torch.maximum(boxes[:, None, :2], regions[None, :, :2])  # (D, C, 2)
    rb = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])  # (D, C, 2)
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # (D, C)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).clamp(min=1e-9)  # (D,)
    return inter / area[:, None]


def image_confusion(gt_boxes: Tensor, gt_labels: Tensor, gt_crowd: Tensor, det_boxes: Tensor,
                    det_labels: Tensor, det_scores: Tensor, num_classes: int,
                    iou_thresh: float = 0.5) -> Tensor:
    """(K+1, K+1) counts of one image; index K is background.

    Args:
        gt_boxes: (M, 4) XYXY; gt_labels: (M,) in 0..K-1; gt_crowd: (M,) bool.
        det_boxes: (D, 4) XYXY; det_labels: (D,) in 0..K-1; det_scores: (D,), already
            thresholded.
    """
    k = num_classes
    order = torch.argsort(det_scores, descending=True, stable=True)
    det_boxes, det_labels = det_boxes[order], det_labels[order]
    boxes, labels = gt_boxes[~gt_crowd], gt_labels[~gt_crowd]  # (M', 4), (M',)
    matched = greedy_match(box_iou(det_boxes, boxes), iou_thresh)  # (D,)
    hit = matched >= 0
    spurious = ~hit
    if gt_crowd.any() and spurious.any():
        in_crowd = (_inside_fraction(det_boxes, gt_boxes[gt_crowd]) >= iou_thresh).any(dim=1)  # (D,)
        spurious &= ~in_crowd
    missed = torch.ones(len(labels), dtype=torch.bool)
    missed[matched[hit]] = False
    rows = torch.cat([labels[matched[hit]], labels[missed], torch.full((int(spurious.sum()),), k)])
    cols = torch.cat([det_labels[hit], torch.full((int(missed.sum()),), k), det_labels[spurious]])
    return torch.bincount(rows * (k + 1) + cols, minlength=(k + 1) ** 2).view(k + 1, k + 1)


def confusion_matrix(coco_gt: COCO, results: list[dict], cat_ids: Sequence[int],
                     image_ids: Sequence[int], score_thresh: float, iou_thresh: float = 0.5) -> np.ndarray:
    """(K+1, K+1) counts over ``image_ids``: rows GT class then background, columns predicted
    class then background, classes in the order of ``cat_ids``. Detections and GT of other
    categories are left out."""
    k = len(cat_ids)
    index = {int(c): i for i, c in enumerate(cat_ids)}
    dets_per_image: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= score_thresh and int(r["category_id"]) in index:
            dets_per_image.setdefault(int(r["image_id"]), []).append(r)
    total = torch.zeros(k + 1, k + 1, dtype=torch.int64)
    for image_id in image_ids:
        anns = [a for a in coco_gt.imgToAnns.get(int(image_id), []) if int(a["category_id"]) in index]
        dets = dets_per_image.get(int(image_id), [])
        total += image_confusion(
            _xyxy([a["bbox"] for a in anns]),
            torch.tensor([index[int(a["category_id"])] for a in anns], dtype=torch.int64),
            torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
            _xyxy([d["bbox"] for d in dets]),
            torch.tensor([index[int(d["category_id"])] for d in dets], dtype=torch.int64),
            torch.tensor([float(d["score"]) for d in dets], dtype=torch.float64),
            k, iou_thresh)
    return total.numpy()


def _xyxy(boxes_xywh: list) -> Tensor:
    """COCO [x, y, w, h] list -> (B, 4) XYXY float64."""
    boxes = torch.tensor(boxes_xywh, dtype=torch.float64).reshape(-1, 4)
    return box_convert(boxes, "xywh", "xyxy")
