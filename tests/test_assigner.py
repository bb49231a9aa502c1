"""Tests for retina.model.assigner: padding, classes K off the foreground, encoded deltas, no leaks."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from retina.model.assigner import TargetAssigner, pad_targets
from retina.model.box_coder import BoxCoder
from retina.model.matcher import FOREGROUND, Matcher

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
    # anchor 0: IoU 1 with box 0; anchor 1: IoU 100 / 200 = 0.5 with box 0; anchor 2: nothing;
    # anchor 3: IoU 1 with box 1
    assert torch.equal(out.labels, torch.tensor([[1, 1, 0, 1]], dtype=torch.int8))
    assert torch.equal(out.classes, torch.tensor([[2, 2, K, 0]]))
    # anchor 1: centre (5, 10), w 10, h 20; box centre (5, 5), w 10, h 10:
    # dx = 10 * 0 = 0, dy = 10 * (5 - 10) / 20 = -2.5, dw = 5 * log 1 = 0, dh = 5 * log(10 / 20)
    assert_close(out.box_deltas[0, 1], torch.tensor([0.0, -2.5, 0.0, 5 * math.log(0.5)]))
    assert_close(out.box_deltas[0, 0], torch.zeros(4))
    assert_close(out.box_deltas[0, 3], torch.zeros(4))
    assert_close(out.matched_boxes[0, [0, 1, 3]],
                 torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [100, 100, 110, 110]]))


def test_deltas_equal_encode_of_matched_box_for_fg():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(40, 2, generator=g) * 60
    anchors = torch.cat([xy, xy + 8 + torch.rand(40, 2, generator=g) * 20], dim=1)
    gts = [target(anchors[[3, 17]] + 1.0, [1, 2]), target(anchors[[5]] - 0.5, [0])]
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    out = TargetAssigner(Matcher(), coder, K)(pad_targets(gts, CPU), anchors)
    fg = out.labels == FOREGROUND
    assert fg[0, 3] and fg[0, 17] and fg[1, 5]
    expected = coder.encode(out.matched_boxes, anchors.expand(2, -1, -1))
    assert_close(out.box_deltas[fg], expected[fg])
    for i, t in enumerate(gts):
        # every fg anchor's matched box is one of the image's own boxes
        matched = out.matched_boxes[i][fg[i]]  # (F, 4)
        assert (matched[:, None, :] == t["boxes"][None]).all(-1).any(-1).all()


def test_padding_does_not_leak():
    # image 1 has no boxes, image 2 one box; image 0's extra rows are padding for them
    ts = [target([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]], [0, 1, 2]),
          target([], []), target([[100, 100, 110, 110]], [1])]
    out = assigner()(pad_targets(ts, CPU), ANCHORS)
    assert torch.equal(out.labels[1], torch.zeros(4, dtype=torch.int8))
    assert torch.equal(out.classes[1], torch.full((4,), K))
    # image 2: only anchor 3 is fg (label 1); padding rows (zeros) claim nothing
    assert torch.equal(out.labels[2], torch.tensor([0, 0, 0, 1], dtype=torch.int8))
    assert torch.equal(out.classes[2], torch.tensor([K, K, K, 1]))
    # batched == per image
    for i, t in enumerate(ts):
        single = assigner()(pad_targets([t], CPU), ANCHORS)
        assert torch.equal(out.labels[i], single.labels[0])
        assert torch.equal(out.classes[i], single.classes[0])
        fg = single.labels[0] == FOREGROUND
        assert_close(out.box_deltas[i][fg], single.box_deltas[0][fg])
    assert torch.isfinite(out.box_deltas).all()  # degenerate padding boxes stay finite


def test_crowd_anchor_gets_class_k():
    ts = [target([[0, 0, 10, 10], [100, 100, 110, 110]], [1, 2], crowd=[1, 0])]
    out = assigner()(pad_targets(ts, CPU), ANCHORS)
    # anchor 0: IoU 1 with the crowd box -> ignored; anchor 1: crowd IoU 0.5 -> ignored
    assert torch.equal(out.labels[0], torch.tensor([-1, -1, 0, 1], dtype=torch.int8))
    assert torch.equal(out.classes[0], torch.tensor([K, K, K, 2]))


def test_no_gt_rows_at_all():
    # PaddedTargets with M = 0 (not from pad_targets, which keeps one padding row)
    gt = pad_targets([target([], [])] * 2, CPU)
    gt.boxes, gt.labels, gt.valid, gt.crowd = (x[:, :0] for x in (gt.boxes, gt.labels, gt.valid, gt.crowd))
    assert gt.boxes.shape == (2, 0, 4)
    out = assigner()(gt, ANCHORS)
    assert torch.equal(out.labels, torch.zeros(2, 4, dtype=torch.int8))
    assert torch.equal(out.classes, torch.full((2, 4), K))
    assert out.box_deltas.shape == (2, 4, 4) and torch.isfinite(out.box_deltas).all()
