"""Test-time augmentation: a wrapper around a detector, as detectron2's ``GeneralizedRCNNWithTTA``
wraps its model. The detector itself detects each image once; eval and predict wrap it when
``model.inference.hflip_tta`` is set (``retina.model.with_test_time_augmentation``), and export
refuses that setting (the exported graph detects each image once).

``HorizontalFlipTTA``: each image and its mirror image go through the detector as one batch, and
each image's two sets of detections are merged by class-wise NMS (``merge_mirrored``).

Shape legend: N images, D detections of one image.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.ops import batched_nms
from torchvision.transforms.v2 import functional as TF


def merge_mirrored(detections: Sequence[dict], mirrored: Sequence[dict], sizes: Sequence[tuple[int, int]],
                   nms_thresh: float, detections_per_image: int) -> list[dict]:
    """Horizontal-flip test-time augmentation: each image's detections and those of its mirror
    image (boxes in the mirror's pixels, mapped back by the flip the training pipeline uses,
    ``v2``'s x -> W - x), merged by class-wise NMS and capped at ``detections_per_image``, best
    first (mmdet's ``DetTTAModel`` merges a flip the same way; ultralytics' ``augment``).

    ``detections``, ``mirrored``: N dicts of ``boxes`` (D, 4) XYXY, ``scores`` (D,), ``labels``
    (D,); ``sizes``: the N input sizes (H, W). Returns N dicts of the same keys."""
    merged = []
    for det, mir, size in zip(detections, mirrored, sizes):  # N images, <= 2 x detections_per_image boxes each
        back = TF.horizontal_flip_bounding_boxes(mir["boxes"], tv_tensors.BoundingBoxFormat.XYXY, tuple(size))
        boxes = torch.cat([det["boxes"], back])
        scores = torch.cat([det["scores"], mir["scores"]])
        labels = torch.cat([det["labels"], mir["labels"]])
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_image]
        merged.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return merged


class HorizontalFlipTTA(nn.Module):
    """``detector`` run on each image and its mirror image, the detections merged: the eval-mode
    contract of ``RetinaNet`` (``model(images)`` -> N dicts of ``boxes`` (D, 4) XYXY in each
    input's pixels, ``scores`` (D,), ``labels`` (D,)) at twice the inference time.

    ``nms_thresh`` and ``detections_per_image`` are the merge's (the detector's own:
    ``model.inference.nms_thresh`` and ``detections_per_image``). Inference only: training goes to
    the detector itself. The wrapper starts in the detector's mode."""

    def __init__(self, detector: nn.Module, nms_thresh: float, detections_per_image: int) -> None:
        super().__init__()
        self.detector = detector
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.train(detector.training)  # in the detector's mode (an eval-mode detector stays so)

    def forward(self, images: Sequence[Tensor]) -> list[dict]:
        if self.training:
            raise ValueError("test-time augmentation runs in eval mode; train the wrapped detector")
        n = len(images)
        both = self.detector([*images, *(image.flip(-1) for image in images)])  # 2N results
        return merge_mirrored(both[:n], both[n:], [tuple(image.shape[-2:]) for image in images],
                              self.nms_thresh, self.detections_per_image)
