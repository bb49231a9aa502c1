"""Tests for retina.model.matcher: thresholds, ties, low-quality matches, empty and crowd ground truth,
batched == per-image."""

from __future__ import annotations

import torch

from retina.model.matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def match(gt, anchors, valid=None, crowd=None, **kw):
    """One image: gt (M, 4) -> matched_idx (R,), labels (R,)."""
    gt = gt.reshape(-1, 4)
    valid = torch.ones(len(gt), dtype=torch.bool) if valid is None else valid
    crowd = None if crowd is None else crowd[None]
    idx, labels = Matcher(**kw)(gt[None], valid[None], anchors, crowd)
    return idx[0], labels[0]


def labels_t(*values):
    return torch.tensor(values, dtype=torch.int8)


GT = boxes([0, 0, 10, 10])  # area 100
ANCHORS = boxes(
    [0, 0, 10, 10],  # IoU 1
    [0, 0, 10, 20],  # IoU = 100 / (100 + 200 - 100) = 0.5 -> fg (>= 0.5)
    [0, 0, 10, 22],  # IoU = 100 / 220 = 0.4545 -> ignored
    [0, 0, 10, 25],  # IoU = 100 / 250 = 0.4 -> ignored (not < 0.4)
    [0, 0, 10, 26],  # IoU = 100 / 260 = 0.3846 -> background
    [5, 0, 15, 10],  # IoU = 50 / (100 + 100 - 50) = 1/3 -> background
    [50, 50, 60, 60],  # IoU 0 -> background
)


def test_thresholds_hand_ious():
    idx, labels = match(GT, ANCHORS)
    assert labels.dtype == torch.int8
    assert torch.equal(labels, labels_t(1, 1, -1, -1, 0, 0, 0))
    assert torch.equal(idx, torch.zeros(7, dtype=torch.int64))
    assert (FOREGROUND, BACKGROUND, IGNORE) == (1, 0, -1)


def test_custom_thresholds():
    # fg at >= 0.45, bg below 0.35: 0.4545 becomes fg, 0.4 and 0.3846 ignored, 1/3 background
    _, labels = match(GT, ANCHORS, fg_iou_thresh=0.45, bg_iou_thresh=0.35)
    assert torch.equal(labels, labels_t(1, 1, 1, -1, -1, 0, 0))


def test_tie_between_two_gts_lowest_index_wins():
    anchor = boxes([0, 0, 10, 10])
    a = boxes([0, 0, 10, 20])  # IoU = 100 / 200 = 0.5
    b = boxes([0, -10, 10, 10])  # IoU = 100 / 200 = 0.5
    idx, labels = match(torch.cat([a, b]), anchor)
    # Documented behaviour: on equal IoU the anchor goes to the lower GT index (torch.max's
    # first maximum); the result does not depend on which box is listed first otherwise.
    assert idx.tolist() == [0] and labels.tolist() == [FOREGROUND]
    idx, labels = match(torch.cat([b, a]), anchor)
    assert idx.tolist() == [0] and labels.tolist() == [FOREGROUND]
    # three-way tie with a padded (invalid) row first: the first *valid* box wins
    gt = torch.cat([boxes([0, 0, 10, 10]), a, b])
    idx, _ = match(gt, anchor, valid=torch.tensor([False, True, True]))
    assert idx.tolist() == [1]


def test_low_quality_match_gives_best_anchors_including_ties():
    anchors = boxes(
        [5, 0, 15, 10],  # IoU = 50 / 150 = 1/3: the GT's best (tied)
        [0, 5, 10, 15],  # IoU = 50 / 150 = 1/3: tied best
        [0, 0, 5, 5],  # IoU = 25 / 100 = 0.25
        [20, 20, 30, 30],  # IoU 0
    )
    _, labels = match(GT, anchors)
    assert torch.equal(labels, labels_t(1, 1, 0, 0))
    _, labels = match(GT, anchors, allow_low_quality=False)
    assert torch.equal(labels, labels_t(0, 0, 0, 0))


def test_low_quality_match_turns_ignored_anchor_fg():
    # the GT's best anchor has IoU 0.4545 (ignore band): it becomes fg
    _, labels = match(GT, ANCHORS[2:])
    assert torch.equal(labels, labels_t(1, -1, 0, 0, 0))
    _, labels = match(GT, ANCHORS[2:], allow_low_quality=False)
    assert torch.equal(labels, labels_t(-1, -1, 0, 0, 0))


def test_low_quality_claimed_anchor_keeps_its_overall_best_box():
    anchors = boxes([5, 0, 15, 10], [10, 0, 40, 10])  # X (area 100), Y (area 300)
    a = boxes([0, 0, 10, 10])  # IoU(a, X) = 50 / 150 = 1/3 (a's best), IoU(a, Y) = 0
    b = boxes([5, 0, 30, 10])  # IoU(b, X) = 100 / 250 = 0.4, IoU(b, Y) = 200 / 350 = 0.571
    idx, labels = match(torch.cat([a, b]), anchors)
    # X is claimed by a (its best anchor) -> fg, but its matched box stays the anchor's
    # highest-IoU box b, as in detectron2 / torchvision.
    assert torch.equal(labels, labels_t(1, 1))
    assert idx.tolist() == [1, 1]


def test_degenerate_gt_claims_nothing():
    # zero-area GT: IoU 0 with every anchor; it must not claim all anchors as "best" ties
    _, labels = match(boxes([5, 5, 5, 5]), ANCHORS)
    assert torch.equal(labels, torch.zeros(7, dtype=torch.int8))


def test_empty_gt_all_background():
    anchors = ANCHORS
    idx, labels = Matcher()(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), anchors)
    assert idx.shape == (2, 7) and idx.dtype == torch.int64
    assert torch.equal(labels, torch.zeros(2, 7, dtype=torch.int8))
    # all rows invalid (padding only), even where the padding overlaps anchors
    gt = torch.cat([GT, GT])[None]
    idx, labels = Matcher()(gt, torch.zeros(1, 2, dtype=torch.bool), anchors)
    assert torch.equal(labels, torch.zeros(1, 7, dtype=torch.int8))


def test_crowd_never_fg_and_ignores_overlapping_background():
    crowd_box = boxes([0, 0, 10, 10])
    real_box = boxes([100, 100, 110, 110])
    anchors = boxes(
        [0, 0, 10, 10],  # crowd IoU 1 -> ignored (not fg)
        [0, 0, 10, 25],  # crowd IoU 0.4 -> ignored
        [0, 0, 10, 26],  # crowd IoU 0.3846 -> background
        [100, 100, 110, 110],  # real IoU 1 -> fg
        [50, 50, 60, 60],  # nothing -> background
    )
    idx, labels = match(torch.cat([crowd_box, real_box]), anchors, crowd=torch.tensor([True, False]))
    assert torch.equal(labels, labels_t(-1, -1, 0, 1, 0))
    assert idx[3].item() == 1
    # a crowd box alone: nothing is foreground, not even by low-quality matching
    _, labels = match(crowd_box, anchors, crowd=torch.tensor([True]))
    assert torch.equal(labels, labels_t(-1, -1, 0, 0, 0))
    # an invalid (padding) crowd row has no effect
    _, labels = match(crowd_box, anchors, valid=torch.tensor([False]), crowd=torch.tensor([True]))
    assert torch.equal(labels, torch.zeros(5, dtype=torch.int8))


def test_crowd_does_not_demote_fg_of_real_box():
    # a real box and a crowd box on the same spot: the anchor stays fg for the real box
    gt = torch.cat([GT, GT])
    idx, labels = match(gt, ANCHORS[:1], crowd=torch.tensor([True, False]))
    assert labels.tolist() == [FOREGROUND] and idx.tolist() == [1]


def test_one_anchor():
    idx, labels = match(boxes([0, 0, 10, 10], [50, 50, 60, 60]), boxes([48, 48, 60, 60]))
    # IoU with the 2nd box = 100 / 144 = 0.694
    assert idx.tolist() == [1] and labels.tolist() == [FOREGROUND]
    idx, labels = match(boxes([0, 0, 10, 10]), boxes([48, 48, 60, 60]), allow_low_quality=True)
    assert labels.tolist() == [BACKGROUND]


def random_boxes(g: torch.Generator, n: int, lo: float = 0, hi: float = 100) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * (hi - lo) + lo
    wh = torch.rand(n, 2, generator=g) * 40 + 2
    return torch.cat([xy, xy + wh], dim=1).round()  # integer coordinates: ties do happen


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(0)
    anchors = random_boxes(g, 60)
    counts = [3, 0, 5, 1]
    per_image = [random_boxes(g, m) for m in counts]
    crowd_per_image = [torch.rand(m, generator=g) < 0.3 for m in counts]
    mmax = max(counts)
    gt = torch.zeros(len(counts), mmax, 4)
    valid = torch.zeros(len(counts), mmax, dtype=torch.bool)
    crowd = torch.zeros(len(counts), mmax, dtype=torch.bool)
    for i, (b, c) in enumerate(zip(per_image, crowd_per_image)):
        gt[i, : len(b)], valid[i, : len(b)], crowd[i, : len(b)] = b, True, c
    gt[~valid] = torch.tensor([10.0, 10.0, 60.0, 60.0])  # junk in the padding must not leak
    idx, labels = Matcher()(gt, valid, anchors, crowd)
    assert (labels == FOREGROUND).any() and (labels == IGNORE).any()
    for i, (b, c) in enumerate(zip(per_image, crowd_per_image)):
        if len(b) == 0:
            assert torch.equal(labels[i], torch.zeros(60, dtype=torch.int8))
            continue
        idx_i, labels_i = match(b, anchors, crowd=c)
        assert torch.equal(labels[i], labels_i)
        assert torch.equal(idx[i], idx_i)


def test_low_precision_gt_same_result():
    gt = torch.cat([GT, boxes([3, 3, 9, 14])])[None]
    valid = torch.ones(1, 2, dtype=torch.bool)
    ref = Matcher()(gt, valid, ANCHORS)
    for dtype in (torch.float16, torch.bfloat16):
        out = Matcher()(gt.to(dtype), valid, ANCHORS.to(dtype))
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
