"""The whole detector as one exportable graph: ``DetectorGraph(model)(images)``.

What ``retina export`` writes (ONNX, TorchScript) is this module, traced by PyTorch's exporters.
It calls the model's own pieces (``to_float``, the pixel mean/std, backbone, FPN, head, the anchor
generator's ``level_anchors``, the box coder, the post-processor's settings) and differs from
``RetinaNet.forward`` only where eager Python decides on values the graph cannot know at export
time:

- the resized size is computed from the input's shape inside the graph, in float64 as Python
  computes ``retina.model.resize.resized_size`` (``resized_size_tensor``; a test holds the two
  equal over a grid of sizes and both modes);
- the top-k, clipping and score threshold are the post-processor's own (``top_candidates``,
  ``scored_candidates``); the top-k counts ``min(topk_candidates, anchors of the level)`` are
  symbolic sizes here (``torch.sym_min``), so one graph serves any image size;
- NMS is torchvision's ``nms`` over boxes offset by group (image, class), the coordinate trick of
  ``torchvision.ops.batched_nms`` with the same offset (largest coordinate + 1); the eager path's
  ``grouped_nms`` keeps the same boxes (see ``retina.model.postprocess``);
- the per-image lists become fixed-size tensors padded to ``detections_per_image``.

Contract of ``forward`` (also the exported file's; ``OUTPUTS``):

- input ``images``: (N, 3, H, W), RGB, NCHW, ``uint8`` 0..255 or float in [0, 1] (the dtype the
  graph was exported with); N >= 1, one H x W for the batch. Each image is resized by the model's
  rule to the test size, normalised and padded inside the graph.
- outputs: ``boxes`` (N, D, 4) float32 XYXY in the input's pixels, ``scores`` (N, D) float32,
  ``labels`` (N, D) int64 in 0..K-1, ``num_detections`` (N,) int64; D = detections_per_image.
  Image i's detections are the first ``num_detections[i]`` rows, by decreasing score; the rest
  are padding (boxes 0, scores 0, labels -1).

Shape legend: N images, R anchors per image, K classes, C candidates per image, B candidates of
the batch above the score threshold, D = detections_per_image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from retina.model.postprocess import scored_candidates, top_candidates
from retina.model.resize import NO_RESIZE_TOLERANCE
from retina.model.retinanet import RetinaNet, to_float

OUTPUTS = ("boxes", "scores", "labels", "num_detections")


def resized_size_tensor(height: Tensor, width: Tensor, min_size: int, max_size: int,
                        mode: str) -> Tensor:
    """``retina.model.resize.resized_size`` on 0-dim int64 tensors: (2,) int64 (H', W').

    The same float64 operations as the Python rule (scale, then ``round`` half to even or
    ``floor``, at least 1 px, unchanged within ``NO_RESIZE_TOLERANCE`` of scale 1), so the
    exported graph resizes every image to exactly the size eager inference does."""
    hw = torch.stack([height, width]).to(torch.float64)  # (2,)
    # tensor / tensor: a Python number / tensor is computed as number * (1 / tensor), which
    # rounds differently and floors 417 * (800 / 417) to 799 where Python gets 800
    limits = torch.tensor([min_size, max_size], dtype=torch.float64)
    scale = torch.minimum(limits[0] / hw.min(), limits[1] / hw.max())
    if mode == "torchvision":
        return torch.floor(hw * scale).clamp(min=1).to(torch.int64)
    rounded = torch.round(hw * scale).clamp(min=1)
    keep = (scale - 1).abs() < NO_RESIZE_TOLERANCE
    return torch.where(keep, hw, rounded).to(torch.int64)


class DetectorGraph(nn.Module):
    """``RetinaNet`` in eval mode as one tensor-in, tensors-out graph (see the module docstring)."""

    def __init__(self, model: RetinaNet) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.model
        h, w = images.shape[2], images.shape[3]
        size = resized_size_tensor(torch.tensor(h), torch.tensor(w), *m.eval_size,
                                   m.input_spec.resize)  # (2,): m.inference_size, in tensors
        # data-dependent ints for F.interpolate: the rule's float64 rounding is not shape arithmetic
        rh, rw = size[0].item(), size[1].item()
        torch._check(rh >= 1)
        torch._check(rw >= 1)
        batch = self._resize_normalise_pad(to_float(images), rh, rw)  # (N, 3, H'', W'')
        features = m.features(batch)
        pred_logits, pred_deltas = m.head(features)  # (N, R, K), (N, R, 4)
        feature_sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        padded = (batch.shape[-2], batch.shape[-1])
        anchors = torch.cat([m.anchor_generator.level_anchors(i, fh, fw, batch.device, padded)
                             for i, (fh, fw) in enumerate(feature_sizes)])  # (R, 4)
        counts = m.anchor_generator.num_anchors_per_level(feature_sizes)
        boxes, scores, labels, num = self._postprocess(pred_logits, pred_deltas, anchors, counts,
                                                       size.to(torch.float32))
        # undo the resize per axis (the rounded size's own ratio, as RetinaNet.forward), clip
        hw_in = torch.tensor([h, w], dtype=torch.float64)
        sy, sx = (size.to(torch.float64) / hw_in).to(torch.float32).unbind()
        boxes = boxes / torch.stack([sx, sy, sx, sy])  # (N, D, 4)
        upper = torch.stack([hw_in[1], hw_in[0], hw_in[1], hw_in[0]]).to(torch.float32)  # w, h, w, h
        boxes = torch.minimum(boxes.clamp(min=0), upper)
        return boxes, scores, labels, num

    def _resize_normalise_pad(self, images: Tensor, height: int, width: int) -> Tensor:
        """(N, 3, H, W) float in [0, 1] -> normalised (N, 3, H'', W''), resized to (height,
        width) and zero-padded to the size divisibility, as ``RetinaNet.preprocess`` does per
        image ("round": resize, then normalise; "torchvision": normalise, then resize)."""
        m = self.model
        mean, std = m.pixel_mean, m.pixel_std  # (3, 1, 1)
        # at an unchanged size bilinear interpolation is the identity (source index = target
        # index), so no branch is needed where eager skips the call
        resize = lambda x: F.interpolate(x, size=(height, width), mode="bilinear",  # noqa: E731
                                         align_corners=False)
        if m.input_spec.resize == "torchvision":
            x = resize((images - mean) / std)
        else:
            x = (resize(images) - mean) / std
        d = m.input_spec.size_divisibility
        ph, pw = (height + d - 1) // d, (width + d - 1) // d
        torch._check(ph >= 1)
        torch._check(pw >= 1)
        return F.pad(x, (0, pw * d - width, 0, ph * d - height))  # (left, right, top, bottom)

    def _postprocess(self, pred_logits: Tensor, pred_deltas: Tensor, anchors: Tensor,
                     counts: list, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``PostProcessor.__call__`` for one image size, as fixed-size tensors.

        pred_logits (N, R, K), pred_deltas (N, R, 4), anchors (R, 4), counts: R split by level,
        size: (2,) the resized (h, w). Returns boxes (N, D, 4) in the resized pixels, scores
        (N, D), labels (N, D) (-1 padding), num_detections (N,)."""
        post = self.model.postprocessor
        n, _, k = pred_logits.shape
        boxes, scores, labels = top_candidates(pred_logits, pred_deltas, anchors, counts, post.box_coder,
                                               post.topk_candidates)  # (N, C, .)
        flat_boxes, flat_scores, flat_labels, flat_images = scored_candidates(
            boxes, scores, labels, size, post.score_thresh)  # (B, 4), (B,), (B,), (B,)
        keep = _batched_nms(flat_boxes, flat_scores, flat_images * k + flat_labels, post.nms_thresh)
        return _pad_per_image(flat_boxes[keep], flat_scores[keep], flat_labels[keep], flat_images[keep],
                              n, post.detections_per_image)


def _batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_thresh: float) -> Tensor:
    """torchvision's ``batched_nms`` by its coordinate trick: boxes of different groups are moved
    apart by group * (largest coordinate + 1), so one ``nms`` never lets them suppress each other.
    Indices kept, by decreasing score. The maximum over the boxes and a 0 keeps an empty set legal."""
    largest = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = groups.to(boxes) * (largest + 1)  # (B,)
    return nms(boxes + offsets[:, None], scores, iou_thresh)


def _pad_per_image(boxes: Tensor, scores: Tensor, labels: Tensor, images: Tensor, n: int,
                   per_image: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Detections of the batch sorted by decreasing score, with their image index (B',) ->
    the first ``per_image`` of each image in rows of (N, D, .), padded; and the counts (N,)."""
    onehot = (images[:, None] == torch.arange(n, device=images.device)[None]).long()  # (B', N)
    rank = (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1  # (B',) place within its image
    sel = rank < per_image
    images, rank = images[sel], rank[sel]
    out_boxes = boxes.new_zeros((n, per_image, 4)).index_put((images, rank), boxes[sel])
    out_scores = scores.new_zeros((n, per_image)).index_put((images, rank), scores[sel])
    out_labels = labels.new_full((n, per_image), -1).index_put((images, rank), labels[sel])
    return out_boxes, out_scores, out_labels, onehot.sum(dim=0).clamp(max=per_image)
