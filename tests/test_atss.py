"""Tests for retina.model.atss: candidates per level, the adaptive threshold (IoUs derived by hand),
the centre-inside rule, several boxes on one anchor, crowd boxes, padding, and the config path."""

from __future__ import annotations

import math

import pytest
import torch

from retina.config import ConfigError, config_from_dict, find_config, load_config
from retina.model import build_model
from retina.model.atss import ATSSMatcher
from retina.model.matcher import BACKGROUND, FOREGROUND, IGNORE


def grid_anchors(side: int = 4, stride: float = 10.0, size: float = 10.0) -> torch.Tensor:
    """(side * side, 4) square anchors of ``size`` centred at (x, y) = (col, row) * stride,
    ordered row, col (H, W; one anchor per location): index = 4 * row + col for side 4."""
    ys, xs = torch.meshgrid(torch.arange(side) * stride, torch.arange(side) * stride, indexing="ij")
    centers = torch.stack([xs, ys], -1).reshape(-1, 2).float()
    return torch.cat([centers - size / 2, centers + size / 2], 1)


def match(gt, anchors, topk, crowd=None, num_per_level=None, a=1):
    """One image: gt (M, 4) -> matched_idx (R,), labels (R,)."""
    gt = torch.tensor(gt, dtype=torch.float32).reshape(-1, 4)
    valid = torch.ones(1, len(gt), dtype=torch.bool)
    crowd = None if crowd is None else torch.tensor(crowd)[None]
    per_level = num_per_level or [anchors.shape[0]]
    idx, labels = ATSSMatcher(topk, a)(gt[None], valid, anchors, crowd, per_level)
    return idx[0], labels[0]


def only(r: int, fg: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected (matched_idx, labels) of R anchors with foreground ``{anchor: box}``."""
    idx = torch.zeros(r, dtype=torch.int64)
    labels = torch.full((r,), BACKGROUND, dtype=torch.int8)
    for anchor, box in fg.items():
        idx[anchor], labels[anchor] = box, FOREGROUND
    return idx, labels


def test_threshold_is_mean_plus_std_of_the_candidates():
    # Box [0, 0, 20, 20] (area 400), centre (10, 10). Nearest locations: (10, 10) = anchor 5 at
    # distance 0, then 1, 4, 6, 9 at 10. Anchor 5 = [5, 5, 15, 15]: IoU 100 / 400 = 0.25; the
    # four neighbours overlap 5 x 10 = 50: IoU 50 / 450 = 1/9. Mean (0.25 + 4/9) / 5 = 0.13889,
    # unbiased std sqrt((0.11111^2 + 4 * 0.02778^2) / 4) = 0.06211: threshold 0.2010, so only
    # anchor 5 passes (the neighbours' centres also sit on the box's edge, not inside it).
    anchors = grid_anchors()
    ious = torch.tensor([0.25] + [1 / 9] * 4)
    assert ious.mean() + ious.std() == pytest.approx(0.13889 + 0.06211, abs=1e-4)
    idx, labels = match([[0, 0, 20, 20]], anchors, topk=5)
    exp_idx, exp_labels = only(16, {5: 0})
    assert torch.equal(labels, exp_labels) and torch.equal(idx, exp_idx)


def test_equal_candidates_all_pass_and_one_candidate_passes_alone():
    # Box [0, 0, 30, 30], centre (15, 15): anchors 5, 6, 9, 10 (centres (10|20, 10|20)) tie at
    # distance 7.07, each IoU 100 / 900; std 0, so each reaches the mean; centres inside.
    idx, labels = match([[0, 0, 30, 30]], grid_anchors(), topk=4)
    assert torch.equal(labels, only(16, {5: 0, 6: 0, 9: 0, 10: 0})[1])
    # topk 1: one candidate, whose std is undefined (C = 1): it is its own threshold.
    _, labels = match([[0, 0, 30, 30]], grid_anchors(), topk=1)
    assert int((labels == FOREGROUND).sum()) == 1


def test_centre_outside_the_box_is_never_foreground():
    # Box [11, 0, 19, 20], centre (15, 10): nearest anchors 5 and 6 (centres x = 10 and 20, both
    # outside 11..19), each IoU 40 / 220 = 0.18 = the threshold (std 0): IoU alone would take them.
    idx, labels = match([[11, 0, 19, 20]], grid_anchors(), topk=2)
    assert torch.equal(labels, only(16, {})[1])


def test_anchor_claimed_twice_takes_the_box_it_overlaps_most():
    # Both boxes' one candidate is anchor 5 = [5, 5, 15, 15]: box 0 [0, 0, 20, 20] IoU 0.25,
    # box 1 [5, 5, 17, 17] (area 144) IoU 100 / 144 = 0.694: box 1 wins.
    idx, labels = match([[0, 0, 20, 20], [5, 5, 17, 17]], grid_anchors(), topk=1)
    assert torch.equal(idx, only(16, {5: 1})[0]) and torch.equal(labels, only(16, {5: 1})[1])
    # equal IoU: the lower box index
    idx, _ = match([[5, 5, 17, 17], [5, 5, 17, 17]], grid_anchors(), topk=1)
    assert idx[5] == 0


def test_crowd_boxes_ignore_their_background_and_are_never_foreground():
    # Crowd box [5, 5, 15, 16]: anchor 5 IoU 100 / 110 = 0.91 >= 0.4 -> ignored; anchor 9
    # [5, 15, 15, 25] overlaps 10 x 1: IoU 10 / 200 = 0.05 -> background. The real box
    # [20, 20, 40, 40] (centre (30, 30) = anchor 15, IoU 100 / 400 = 0.25, alone with topk 1).
    idx, labels = match([[5, 5, 15, 16], [20, 20, 40, 40]], grid_anchors(), topk=1, crowd=[True, False])
    exp_idx, exp_labels = only(16, {15: 1})
    exp_labels[5] = IGNORE
    assert torch.equal(labels, exp_labels) and torch.equal(idx, exp_idx)


def test_candidates_take_all_anchors_of_the_nearest_locations_on_each_level():
    # Level 0: 4 locations (x = 0, 10, 20, 30 on one row), 2 anchors each (indices 0..7);
    # level 1: 1 location, 2 anchors (8, 9). A box centred at x = 12: nearest locations 1 (d 2)
    # and 2 (d 8) -> anchors 2, 3, 4, 5; level 1 has one location -> 8, 9.
    centers0 = torch.tensor([[0.0, 0], [0, 0], [10, 0], [10, 0], [20, 0], [20, 0], [30, 0], [30, 0]])
    centers1 = torch.tensor([[16.0, 0], [16, 0]])
    gt_centers = torch.tensor([[[12.0, 0]]])  # (N, M, 2)
    matcher = ATSSMatcher(topk=2, anchors_per_location=2)
    cand = matcher.candidates(gt_centers, torch.cat([centers0, centers1]), [8, 2])
    assert cand.tolist() == [[[2, 3, 4, 5, 8, 9]]]
    with pytest.raises(ValueError, match="not a multiple of 2"):
        ATSSMatcher(topk=2, anchors_per_location=2).candidates(gt_centers, centers0[:7], [7])
    with pytest.raises(ValueError, match="num_per_level"):
        ATSSMatcher(2, 2)(torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool), torch.zeros(8, 4))


def reference(gt: torch.Tensor, anchors: torch.Tensor, per_level: list[int], topk: int, a: int):
    """ATSS of one image box by box, level by level (the authors' loop), no crowd."""
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = torch.full((len(anchors),), -1.0)
    idx = torch.zeros(len(anchors), dtype=torch.int64)
    for j, box in enumerate(gt):
        c = (box[:2] + box[2:]) / 2
        cand, start = [], 0
        for count in per_level:
            d = (centers[start:start + count:a] - c).pow(2).sum(1).sqrt()
            for loc in d.topk(min(topk, len(d)), largest=False).indices.tolist():
                cand += [start + loc * a + i for i in range(a)]
            start += count
        ious = [float(_iou(box, anchors[i])) for i in cand]
        thr = sum(ious) / len(ious) + (torch.tensor(ious).std().item() if len(ious) > 1 else 0.0)
        for i, v in zip(cand, ious):
            x, y = centers[i].tolist()
            inside = min(x - box[0], y - box[1], box[2] - x, box[3] - y) > 0.01
            if v >= thr and inside and v > best[i]:
                best[i], idx[i] = v, j
    labels = torch.where(best >= 0, FOREGROUND, BACKGROUND).to(torch.int8)
    return idx, labels


def _iou(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    wh = (torch.minimum(b1[2:], b2[2:]) - torch.maximum(b1[:2], b2[:2])).clamp(min=0)
    inter = wh.prod()
    return inter / ((b1[2:] - b1[:2]).prod() + (b2[2:] - b2[:2]).prod() - inter)


def test_batched_with_padding_equals_the_box_by_box_reference():
    from retina.model.anchors import AnchorGenerator
    gen = AnchorGenerator([8, 16], [32.0, 64.0], [1.0, 2 ** 0.5], [0.5, 1.0, 2.0])
    sizes = [(12, 16), (6, 8)]
    anchors, per_level = gen(sizes, torch.device("cpu")), gen.num_anchors_per_level(sizes)
    g = torch.Generator().manual_seed(0)
    gts = []
    for m in (5, 2, 0):
        xy = torch.rand(m, 2, generator=g) * 100
        wh = 10 + torch.rand(m, 2, generator=g) * 60
        gts.append(torch.cat([xy, xy + wh], 1))
    boxes = torch.zeros(3, 5, 4)
    valid = torch.zeros(3, 5, dtype=torch.bool)
    for i, gt in enumerate(gts):
        boxes[i, :len(gt)], valid[i, :len(gt)] = gt, True
    idx, labels = ATSSMatcher(3, gen.num_anchors)(boxes, valid, anchors, None, per_level)
    for i, gt in enumerate(gts):
        ref_idx, ref_labels = reference(gt, anchors, per_level, 3, gen.num_anchors)
        assert torch.equal(labels[i], ref_labels)
        assert torch.equal(idx[i][ref_labels == FOREGROUND], ref_idx[ref_labels == FOREGROUND])
    assert (labels[0] == FOREGROUND).sum() > 5 and not (labels[2] == FOREGROUND).any()


def test_config_builds_atss_and_a_training_step_learns_from_it():
    cfg = load_config(find_config("shapes"), ["model.matcher.type=atss", "model.matcher.topk=4",
                                                  "model.num_classes=3"])
    model = build_model(cfg, pretrained=False).train()
    assert isinstance(model.assigner.matcher, ATSSMatcher) and model.assigner.matcher.topk == 4
    images = [torch.rand(3, 96, 96) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 10, 60, 70]]), "labels": torch.tensor([0])}]
    out = model(images, targets)
    assert out["num_pos"] > 0 and math.isfinite((out["loss_cls"] + out["loss_box"]).item())
    with pytest.raises(ConfigError, match="model.matcher.topk"):
        config_from_dict({"model": {"matcher": {"type": "atss", "topk": 0}}})
    with pytest.raises(ConfigError, match="model.matcher.type"):
        config_from_dict({"model": {"matcher": {"type": "atsss"}}})
    with pytest.raises(ConfigError, match="model.matcher.topk=4 does not apply to model.matcher.type=iou"):
        config_from_dict({"model": {"matcher": {"topk": 4}}})
    with pytest.raises(ConfigError,
                       match="model.matcher.fg_iou_thresh=0.6 does not apply to model.matcher.type=atss"):
        config_from_dict({"model": {"matcher": {"type": "atss", "fg_iou_thresh": 0.6}}})
