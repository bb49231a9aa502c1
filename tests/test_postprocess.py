"""Tests for retina.model.postprocess: threshold, per-level top-k, decoding, clipping, class-wise NMS,
the per-image cap, batched == per-image and empty outputs; the mirror merge of flip TTA."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from torchvision.ops import batched_nms

from retina.model.box_coder import BoxCoder
from retina.model.postprocess import PostProcessor, grouped_nms, scored_candidates
from retina.model.tta import merge_mirrored

NEG = -20.0  # sigmoid(-20) ~ 2e-9: far below any threshold


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def post(**kw) -> PostProcessor:
    return PostProcessor(BoxCoder(), **kw)


def run(pp, logits, deltas, anchors, per_level=None, sizes=None):
    n = logits.shape[0]
    per_level = [anchors.shape[0]] if per_level is None else per_level
    sizes = [(1000, 1000)] * n if sizes is None else sizes
    return pp(logits, deltas, anchors, per_level, sizes)


def test_decode_and_clip_hand_case():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    logits = torch.tensor([[[NEG, logit(0.9)]]])  # (N=1, R=1, K=2)
    # centre (5, 5) + (0.5 * 10, 0.5 * 10) = (10, 10); w = 10 * e^(log 2) = 20, h = 10 * e^0 = 10
    deltas = torch.tensor([[[0.5, 0.5, math.log(2.0), 0.0]]])
    (det,) = run(post(), logits, deltas, anchors)
    assert_close(det["boxes"], torch.tensor([[0.0, 5.0, 20.0, 15.0]]))
    assert_close(det["scores"], torch.tensor([0.9]))
    assert torch.equal(det["labels"], torch.tensor([1]))
    # clipped to an image of h = 12, w = 18 (x to [0, 18], y to [0, 12])
    (det,) = run(post(), logits, deltas, anchors, sizes=[(12, 18)])
    assert_close(det["boxes"], torch.tensor([[0.0, 5.0, 18.0, 12.0]]))
    # boxes leaving the image on the top-left are clamped at 0
    (det,) = run(post(), logits, torch.tensor([[[-1.0, -1.0, 0.0, 0.0]]]), anchors)
    assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 0.0, 0.0]]))  # [-10, -10, 0, 0]


def test_score_threshold_is_strict():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20, 0, 30, 10], [40, 0, 50, 10]])
    # scores 0.5, 0.04 (below 0.05) and 0.06 (above)
    logits = torch.tensor([[[0.0], [logit(0.04)], [logit(0.06)]]])
    (det,) = run(post(), logits, torch.zeros(1, 3, 4), anchors)
    assert_close(det["scores"], torch.tensor([0.5, 0.06]))
    assert_close(det["boxes"], anchors[[0, 2]])
    (det,) = run(post(score_thresh=0.5), logits, torch.zeros(1, 3, 4), anchors)
    assert det["scores"].shape == (0,)  # 0.5 is not > 0.5


def test_classwise_nms():
    # IoU of the two anchors = 90 / (100 + 100 - 90) = 0.818 > 0.5
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
    same = torch.tensor([[[logit(0.9), NEG], [logit(0.8), NEG]]])  # both class 0
    (det,) = run(post(), same, torch.zeros(1, 2, 4), anchors)
    assert_close(det["scores"], torch.tensor([0.9]))  # the lower score is suppressed
    assert_close(det["boxes"], anchors[:1])
    assert torch.equal(det["labels"], torch.tensor([0]))
    different = torch.tensor([[[logit(0.9), NEG], [NEG, logit(0.8)]]])  # classes 0 and 1
    (det,) = run(post(), different, torch.zeros(1, 2, 4), anchors)
    assert_close(det["scores"], torch.tensor([0.9, 0.8]))
    assert torch.equal(det["labels"], torch.tensor([0, 1]))
    # nms_thresh above the IoU keeps both of the same class
    (det,) = run(post(nms_thresh=0.85), same, torch.zeros(1, 2, 4), anchors)
    assert_close(det["scores"], torch.tensor([0.9, 0.8]))


def test_per_level_topk():
    # level 0: two anchors scoring 0.9, 0.8; level 1: one anchor scoring 0.3 (no overlaps)
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 60, 20]])
    logits = torch.tensor([[[logit(0.9)], [logit(0.8)], [logit(0.3)]]])
    (det,) = run(post(topk_candidates=1), logits, torch.zeros(1, 3, 4), anchors, per_level=[2, 1])
    # top 1 per level: 0.9 from level 0 and 0.3 from level 1; 0.8 is dropped although it
    # outscores level 1's best
    assert_close(det["scores"], torch.tensor([0.9, 0.3]))
    assert_close(det["boxes"], anchors[[0, 2]])
    # top-k counts (anchor, class) pairs: K = 2 with 2 anchors on one level, k = 3
    logits2 = torch.tensor([[[logit(0.9), logit(0.7)], [logit(0.8), logit(0.6)]]])
    (det,) = run(post(topk_candidates=3), logits2, torch.zeros(1, 2, 4), anchors[:2], per_level=[2])
    assert_close(det["scores"], torch.tensor([0.9, 0.8, 0.7]))
    assert torch.equal(det["labels"], torch.tensor([0, 0, 1]))
    assert_close(det["boxes"], anchors[[0, 1, 0]])


def test_detections_per_image_cap():
    anchors = torch.tensor([[20.0 * i, 0, 20 * i + 10, 10] for i in range(5)])
    probs = [0.3, 0.9, 0.5, 0.7, 0.1]
    logits = torch.tensor([[[logit(p)] for p in probs]])
    (det,) = run(post(detections_per_image=3), logits, torch.zeros(1, 5, 4), anchors)
    assert_close(det["scores"], torch.tensor([0.9, 0.7, 0.5]))  # sorted, highest 3
    assert_close(det["boxes"], anchors[[1, 3, 2]])


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(0)
    n, k = 3, 3
    xy = torch.rand(30, 2, generator=g) * 80
    anchors = torch.cat([xy, xy + 16], dim=1)  # (R = 30, 4), many overlaps
    logits = torch.randn(n, 30, k, generator=g) * 2
    deltas = torch.randn(n, 30, 4, generator=g) * 0.2
    sizes = [(90, 100), (64, 80), (100, 70)]
    pp = post(topk_candidates=8, detections_per_image=6)
    whole = pp(logits, deltas, anchors, [20, 10], sizes)
    assert any(len(d["scores"]) == 6 for d in whole)  # the cap is exercised
    for i in range(n):
        (single,) = pp(logits[i:i + 1], deltas[i:i + 1], anchors, [20, 10], [sizes[i]])
        assert torch.equal(whole[i]["labels"], single["labels"])
        assert_close(whole[i]["scores"], single["scores"])
        assert_close(whole[i]["boxes"], single["boxes"])
        h, w = sizes[i]
        assert (whole[i]["boxes"][:, 2] <= w).all() and (whole[i]["boxes"][:, 3] <= h).all()


def test_empty_results_shapes_and_dtypes():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
    logits = torch.full((2, 2, 3), NEG)
    for det in run(post(), logits, torch.zeros(2, 2, 4), anchors):
        assert det["boxes"].shape == (0, 4) and det["boxes"].dtype == torch.float32
        assert det["scores"].shape == (0,) and det["scores"].dtype == torch.float32
        assert det["labels"].shape == (0,) and det["labels"].dtype == torch.int64


def test_one_image_empty_other_not():
    anchors = torch.tensor([[0.0, 0, 10, 10]])
    logits = torch.tensor([[[NEG]], [[0.0]]])
    dets = run(post(), logits, torch.zeros(2, 1, 4), anchors)
    assert dets[0]["boxes"].shape == (0, 4)
    assert_close(dets[1]["scores"], torch.tensor([0.5]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    logits = torch.tensor([[[0.0]]], dtype=dtype)
    deltas = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]], dtype=dtype)
    (det,) = run(post(), logits, deltas, anchors)
    assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32
    assert_close(det["boxes"], torch.tensor([[5.0, 5.0, 15.0, 15.0]]))  # shifted by half a side
    assert_close(det["scores"], torch.tensor([0.5]))


@pytest.mark.parametrize("num_boxes", [300, 5000])  # below and above torchvision's per-group switch
def test_grouped_nms_equals_torchvision_batched_nms(num_boxes):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(num_boxes, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(num_boxes, 2, generator=g) * 60], dim=1)
    scores = (torch.rand(num_boxes, generator=g) * 20).round() / 20  # many exact ties
    groups = torch.randint(0, 37, (num_boxes,), generator=g)
    keep = grouped_nms(boxes, scores, groups, 0.5)
    expected = batched_nms(boxes, scores, groups, 0.5)
    assert len(keep) < num_boxes  # something was suppressed
    assert torch.equal(keep, expected)
    assert torch.equal(grouped_nms(boxes[:0], scores[:0], groups[:0], 0.5), expected[:0])


def test_scored_candidates_clip_threshold_flatten():
    # two images of (h, w) = (10, 20) and (30, 5); C = 2 candidates each
    boxes = torch.tensor([[[-3.0, 2.0, 25.0, 12.0], [1.0, 1.0, 2.0, 2.0]],
                          [[4.0, -1.0, 9.0, 40.0], [0.0, 0.0, 1.0, 1.0]]])  # (2, 2, 4)
    scores = torch.tensor([[0.9, 0.05], [0.06, 0.5]])  # 0.05 is not above the threshold
    labels = torch.tensor([[3, 1], [0, 2]])
    sizes = torch.tensor([[10.0, 20.0], [30.0, 5.0]])[:, None, :]  # (N, 1, 2) h, w
    b, s, l, i = scored_candidates(boxes, scores, labels, sizes, 0.05)
    # clipped to [0, w] x [0, h]: (-3, 2, 25, 12) in 20 x 10 -> (0, 2, 20, 10);
    # (4, -1, 9, 40) in 5 x 30 -> (4, 0, 5, 30)
    assert torch.equal(b, torch.tensor([[0.0, 2.0, 20.0, 10.0], [4.0, 0.0, 5.0, 30.0], [0.0, 0.0, 1.0, 1.0]]))
    assert torch.equal(s, torch.tensor([0.9, 0.06, 0.5]))
    assert l.tolist() == [3, 0, 2] and i.tolist() == [0, 1, 1]
    # one (h, w) for the whole batch, as the exported graph clips: (2,)
    b2, *_ = scored_candidates(boxes, scores, labels, torch.tensor([10.0, 20.0]), 0.05)
    assert torch.equal(b2[1], torch.tensor([4.0, 0.0, 9.0, 10.0]))


def test_merge_mirrored_maps_the_mirror_back_and_keeps_the_best_of_each_overlap():
    w = 100
    size = [(80, w)]  # (H, W): the flip reads W
    det = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0], [50.0, 50.0, 60.0, 60.0]]),
            "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([0, 1])}]
    # in the mirror's pixels: [70, 20, 90, 40] is [10, 20, 30, 40] back in the image (x -> 100 - x)
    mir = [{"boxes": torch.tensor([[70.0, 20.0, 90.0, 40.0], [40.0, 50.0, 50.0, 60.0], [0.0, 0.0, 10.0, 10.0]]),
            "scores": torch.tensor([0.8, 0.6, 0.5]), "labels": torch.tensor([0, 0, 2])}]
    out = merge_mirrored(det, mir, size, nms_thresh=0.5, detections_per_image=100)[0]
    # [10,20,30,40] from both: the 0.8 copy (IoU 1) is suppressed by the 0.9 one. [40,50,50,60]
    # maps to [50,50,60,60], the other box's place, but as class 0 it does not suppress class 1.
    assert_close(out["boxes"], torch.tensor([[10.0, 20.0, 30.0, 40.0], [50.0, 50.0, 60.0, 60.0],
                                             [90.0, 0.0, 100.0, 10.0], [50.0, 50.0, 60.0, 60.0]]))
    assert_close(out["scores"], torch.tensor([0.9, 0.6, 0.5, 0.3]))
    assert out["labels"].tolist() == [0, 0, 2, 1]
    capped = merge_mirrored(det, mir, size, nms_thresh=0.5, detections_per_image=2)[0]
    assert capped["scores"].tolist() == pytest.approx([0.9, 0.6])
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert merge_mirrored([empty], [empty], size, 0.5, 100)[0]["boxes"].shape == (0, 4)
