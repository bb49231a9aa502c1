"""Inference post-processing: per-level top-k above a score threshold, decoding, class-wise NMS
(Sec. 5.1: top 1000 per level with score > 0.05, NMS 0.5, keep 100). Runs in fp32. Test-time
augmentation wraps the model instead (``retina.model.tta``)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from retina.model.box_coder import BoxCoder

# torchvision's batched_nms switches from one NMS over offset boxes to one NMS per group above
# this many boxes on the CPU (its own threshold, 4000 coordinates); so does ``grouped_nms``.
CPU_OFFSET_TRICK_MAX_BOXES = 1000


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_thresh: float) -> Tensor:
    """``torchvision.ops.batched_nms`` with the same result (indices kept, by decreasing score),
    faster for many boxes on the CPU.

    There torchvision runs one NMS per group, finding each group's boxes with a full-length
    comparison and ``nonzero`` (two passes over all boxes per group: N images x K classes
    groups). Here the boxes are sorted by group once (stable, so each group's boxes keep their
    order and each NMS sees exactly torchvision's input) and each group is a slice. Elsewhere
    (CUDA, few boxes) it is ``batched_nms``.
    """
    if boxes.device.type != "cpu" or len(boxes) <= CPU_OFFSET_TRICK_MAX_BOXES:
        return batched_nms(boxes, scores, groups, iou_thresh)
    order = torch.argsort(groups, stable=True)  # (B,)
    counts = torch.bincount(groups[order]).tolist()  # boxes per group id; one host read
    kept, start = [], 0
    for count in counts:  # one NMS per (image, class) group, as torchvision's CPU path
        if count:
            idx = order[start:start + count]
            kept.append(idx[nms(boxes[idx], scores[idx], iou_thresh)])
        start += count
    keep = torch.cat(kept).sort().values  # ascending index, then by score as torchvision orders
    return keep[scores[keep].sort(descending=True)[1]]


def top_candidates(pred_logits: Tensor, pred_deltas: Tensor, anchors: Tensor, num_anchors_per_level: list,
                   box_coder: BoxCoder, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each image's ``topk`` best (anchor, class) pairs of every level, decoded: boxes (N, C, 4)
    XYXY (not clipped), scores (N, C) (sigmoid, fp32), labels (N, C); C candidates per image.

    pred_logits (N, R, K), pred_deltas (N, R, 4), anchors (R, 4); ``num_anchors_per_level``: R
    split by level (ints, or symbolic sizes when exported: ``torch.sym_min`` serves both)."""
    n, _, k = pred_logits.shape
    boxes_all, scores_all, labels_all = [], [], []
    start = 0
    for count in num_anchors_per_level:  # one top-k per level for the whole batch
        logits = pred_logits[:, start:start + count]  # (N, R_l, K)
        # Two-stage top-k, the same set as one top-k over R_l * K: each of the top ``topk``
        # (anchor, class) pairs lies in an anchor whose best class is among the top ``topk``
        # anchors. A max over K and two small top-ks cost less than a top-k over the whole level.
        num_anchors = torch.sym_min(topk, count)
        top_anchor = logits.amax(dim=2).topk(num_anchors, dim=1).indices  # (N, A')
        cand = torch.gather(logits, 1, top_anchor[..., None].expand(-1, -1, k))  # (N, A', K)
        num = torch.sym_min(topk, num_anchors * k)
        top_logits, flat_idx = cand.float().reshape(n, -1).topk(num, dim=1)  # (N, num)
        anchor_idx = torch.gather(top_anchor, 1, flat_idx // k) + start  # (N, num)
        deltas = torch.gather(pred_deltas, 1, anchor_idx[..., None].expand(-1, -1, 4))
        boxes_all.append(box_coder.decode(deltas, anchors[anchor_idx]))  # (N, num, 4)
        scores_all.append(torch.sigmoid(top_logits))
        labels_all.append(flat_idx % k)
        start = start + count
    return torch.cat(boxes_all, dim=1), torch.cat(scores_all, dim=1), torch.cat(labels_all, dim=1)


def scored_candidates(boxes: Tensor, scores: Tensor, labels: Tensor, sizes: Tensor, score_thresh: float
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``top_candidates``' output clipped to the image and kept above ``score_thresh``, flattened
    over the batch: boxes (B, 4), scores (B,), labels (B,), image index (B,) in image-major order.

    boxes (N, C, 4) XYXY, scores / labels (N, C); ``sizes`` the (h, w) to clip to, (N, 1, 2)
    per image or (2,) for the whole batch. The eager post-processor and the exported graph
    (``retina.deploy.graph``) both select with this; they differ only in their NMS call."""
    wh = sizes.flip(-1)
    upper = torch.cat([wh, wh], dim=-1)  # (N, 1, 4) or (4,): w, h, w, h
    boxes = torch.minimum(boxes.clamp(min=0), upper)
    keep_mask = scores > score_thresh  # (N, C)
    image_idx = torch.arange(scores.shape[0], device=boxes.device)[:, None].expand_as(labels)  # (N, C)
    return boxes[keep_mask], scores[keep_mask], labels[keep_mask], image_idx[keep_mask]


class PostProcessor:
    def __init__(self, box_coder: BoxCoder, score_thresh: float = 0.05, topk_candidates: int = 1000,
                 nms_thresh: float = 0.5, detections_per_image: int = 100) -> None:
        self.box_coder = box_coder
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image

    def __call__(self, pred_logits: Tensor, pred_deltas: Tensor, anchors: Tensor,
                 num_anchors_per_level: list[int], image_sizes: list[tuple[int, int]]) -> list[dict]:
        """Detections per image from a batch.

        Args:
            pred_logits: (N, R, K); pred_deltas: (N, R, 4); anchors: (R, 4).
            num_anchors_per_level: R split by level.
            image_sizes: (h, w) of each image before padding; boxes are clipped to it.
        Returns:
            N dicts with ``boxes`` (D, 4) XYXY, ``scores`` (D,), ``labels`` (D,) int64.
        """
        n, _, k = pred_logits.shape
        boxes, scores, labels = top_candidates(pred_logits, pred_deltas, anchors, num_anchors_per_level,
                                               self.box_coder, self.topk_candidates)  # (N, C, .)
        sizes = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)  # (N, 2) h, w
        # One NMS for the whole batch: boxes of different images or classes never suppress
        # each other because they are grouped by (image, class).
        flat_boxes, flat_scores, flat_labels, flat_images = scored_candidates(
            boxes, scores, labels, sizes[:, None, :], self.score_thresh)
        keep = grouped_nms(flat_boxes, flat_scores, flat_images * k + flat_labels, self.nms_thresh)
        # keep is sorted by score; split it by image and cap the count.
        kept_images = flat_images[keep]
        results = []
        for i in range(n):
            sel = keep[kept_images == i][: self.detections_per_image]
            results.append({"boxes": flat_boxes[sel], "scores": flat_scores[sel], "labels": flat_labels[sel]})
        return results
