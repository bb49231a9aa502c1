"""Tests for retina.model.assigner: padding, the label encoding of the loss (-1 ignored, 0..K-1
foreground class, K background), encoded deltas, no leaks."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from retina.model.assigner import TargetAssigner, pad_targets
from retina.model.box_coder import BoxCoder
from retina.model.matcher import Matcher

K = 3
CPU = torch.device("cpu")
ANCHORS = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],
    [0.0, 0.0, 10.0, 20.0],
    [50.0, 50.0, 60.0, 60.0],
    [100.0, 100.0, 110.0, 110.0],
])


def target(boxes, labels, crowd=None):
    t = {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "labels": torch.tensor(labels, dtype=torch.int64)}
    if crowd is not None:
        t["iscrowd"] = torch.tensor(crowd, dtype=torch.int64)
    return t


def assigner(weights=(1.0, 1.0, 1.0, 1.0)):
    return TargetAssigner(Matcher(), BoxCoder(weights), K)


def test_pad_targets_shapes_and_masks():
    ts = [target([[0, 0, 10, 10], [1, 2, 3, 4]], [2, 0], crowd=[0, 1]), target([], []),
          target([[5, 5, 9, 9]], [1])]
    gt = pad_targets(ts, CPU)
    assert gt.boxes.shape == (3, 2, 4) and gt.boxes.dtype == torch.float32
    assert torch.equal(gt.valid, torch.tensor([[True, True], [False, False], [True, False]]))
    assert torch.equal(gt.crowd, torch.tensor([[False, True], [False, False], [False, False]]))
    assert torch.equal(gt.labels, torch.tensor([[2, 0], [0, 0], [1, 0]]))
    assert torch.equal(gt.boxes[1], torch.zeros(2, 4))
    assert torch.equal(gt.boxes[2, 0], torch.tensor([5.0, 5, 9, 9]))
    # all images empty: M is still 1 (one padding row), nothing valid
    gt = pad_targets([target([], []), target([], [])], CPU)
    assert gt.boxes.shape == (2, 1, 4) and not gt.valid.any()


def test_hand_case_classes_and_deltas():
    gt = pad_targets([target([[0, 0, 10, 10], [100, 100, 110, 110]], [2, 0])], CPU)
    out = assigner(weights=(10.0, 10.0, 5.0, 5.0))(gt, ANCHORS)
    # anchor 0: IoU 1 with box 0 (class 2); anchor 1: IoU 100 / 200 = 0.5 with box 0 (class 2);
    # anchor 2: nothing -> background K; anchor 3: IoU 1 with box 1 (class 0)
    assert out.gt_classes.dtype == torch.int64
    assert torch.equal(out.gt_classes, torch.tensor([[2, 2, K, 0]]))
    # anchor 1: centre (5, 10), w 10, h 20; box centre (5, 5), w 10, h 10:
    # dx = 10 * 0 = 0, dy = 10 * (5 - 10) / 20 = -2.5, dw = 5 * log 1 = 0, dh = 5 * log(10 / 20)
    assert_close(out.gt_deltas[0, 1], torch.tensor([0.0, -2.5, 0.0, 5 * math.log(0.5)]))
    assert_close(out.gt_deltas[0, 0], torch.zeros(4))  # anchor == box
    assert_close(out.gt_deltas[0, 3], torch.zeros(4))


def test_fg_deltas_decode_to_a_box_of_the_own_image_with_its_class():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(40, 2, generator=g) * 60
    anchors = torch.cat([xy, xy + 8 + torch.rand(40, 2, generator=g) * 20], dim=1)
    gts = [target(anchors[[3, 17]] + 1.0, [1, 2]), target(anchors[[5]] - 0.5, [0])]
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    out = TargetAssigner(Matcher(), coder, K)(pad_targets(gts, CPU), anchors)
    fg = (out.gt_classes >= 0) & (out.gt_classes < K)  # (N, R)
    assert fg[0, 3] and fg[0, 17] and fg[1, 5]
    assert out.gt_classes[0, 3] == 1 and out.gt_classes[0, 17] == 2 and out.gt_classes[1, 5] == 0
    for i, t in enumerate(gts):
        # decode(encode(b)) == b: every fg anchor regresses to one of the image's own boxes,
        # the one whose label it carries
        decoded = coder.decode(out.gt_deltas[i][fg[i]], anchors[fg[i]])  # (F, 4)
        hit = (decoded[:, None, :] - t["boxes"][None]).abs().amax(-1) < 1e-3  # (F, M_i)
        assert (hit.sum(-1) == 1).all()
        assert torch.equal(t["labels"][hit.int().argmax(-1)], out.gt_classes[i][fg[i]])


def test_padding_does_not_leak():
    # image 1 has no boxes, image 2 one box; image 0's extra rows are padding for them
    ts = [target([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]], [0, 1, 2]),
          target([], []), target([[100, 100, 110, 110]], [1])]
    out = assigner()(pad_targets(ts, CPU), ANCHORS)
    assert torch.equal(out.gt_classes[1], torch.full((4,), K))  # no boxes: all background
    # image 2: only anchor 3 is fg (class 1); padding rows (zeros) claim nothing
    assert torch.equal(out.gt_classes[2], torch.tensor([K, K, K, 1]))
    # batched == per image
    for i, t in enumerate(ts):
        single = assigner()(pad_targets([t], CPU), ANCHORS)
        assert torch.equal(out.gt_classes[i], single.gt_classes[0])
        fg = (single.gt_classes[0] >= 0) & (single.gt_classes[0] < K)
        assert_close(out.gt_deltas[i][fg], single.gt_deltas[0][fg])
    assert torch.isfinite(out.gt_deltas).all()  # degenerate padding boxes stay finite


def test_crowd_anchors_are_ignored():
    ts = [target([[0, 0, 10, 10], [100, 100, 110, 110]], [1, 2], crowd=[1, 0])]
    out = assigner()(pad_targets(ts, CPU), ANCHORS)
    # anchor 0: IoU 1 with the crowd box -> ignored (-1); anchor 1: crowd IoU 0.5 -> ignored;
    # anchor 2: background K; anchor 3: IoU 1 with box 1 -> its class 2
    assert torch.equal(out.gt_classes[0], torch.tensor([-1, -1, K, 2]))


def test_no_gt_rows_at_all():
    # PaddedTargets with M = 0 (not from pad_targets, which keeps one padding row)
    gt = pad_targets([target([], [])] * 2, CPU)
    gt.boxes, gt.labels, gt.valid, gt.crowd = (x[:, :0] for x in (gt.boxes, gt.labels, gt.valid, gt.crowd))
    assert gt.boxes.shape == (2, 0, 4)
    out = assigner()(gt, ANCHORS)
    assert torch.equal(out.gt_classes, torch.full((2, 4), K))
    assert out.gt_deltas.shape == (2, 4, 4) and torch.isfinite(out.gt_deltas).all()
