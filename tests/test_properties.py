"""Property tests (hypothesis) for the box coder and the matcher on degenerate and extreme boxes.

Boxes here are zero-width or zero-height, 1e-3 px, 1e4 px, far from every anchor, inverted;
deltas are extreme (1e6, +-inf for dw/dh). The laws:
- encode is finite for any finite box against a positive-area anchor;
- decode(encode(b)) == b where the width and height ratios box / anchor are within the clamp
  (<= 1000 / 16), and otherwise the clamped side is exactly anchor x 1000 / 16, centre kept;
- decode is finite, with non-negative sides of at most anchor x 1000 / 16, for any dw, dh;
- the matcher's labels follow their definition, checked against an IoU computed here in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retina.model.box_coder import BoxCoder
from retina.model.matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
MAX_RATIO = 1000.0 / 16  # exp(scale_clamp)

# float64 draws; every box and delta is rounded to float32 when it becomes a tensor
f32 = dict(allow_nan=False, allow_infinity=False)
position = st.floats(-2e4, 2e4, **f32)
# zero, tiny, huge, and everything between
side = st.one_of(st.sampled_from([0.0, 1e-3, 1.0, 1e4]), st.floats(1e-3, 1e4, **f32))
anchor_side = st.one_of(st.sampled_from([1e-3, 16.0, 1e4]), st.floats(1e-3, 1e4, **f32))
weights = st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])


def xyxy(x: float, y: float, w: float, h: float) -> torch.Tensor:
    return torch.tensor([x, y, x + w, y + h], dtype=torch.float32)


# Anchors have positive area in float32 (a 1e-3 px side at x = 2e4, where the float32 spacing is
# 2e-3, would round to nothing: such draws are filtered out).
anchor_box = st.tuples(position, position, anchor_side, anchor_side).map(lambda t: xyxy(*t)) \
    .filter(lambda a: bool((a[2:] > a[:2]).all()))


# ------------------------------------------------------------------------------- box coder
@settings(max_examples=150, deadline=None)
@given(box=st.tuples(position, position, side, side), a=anchor_box, w=weights)
def test_round_trip_or_clamp_for_extreme_boxes(box, a, w):
    coder = BoxCoder(weights=w)
    b = xyxy(*box)
    deltas = coder.encode(b, a)
    assert torch.isfinite(deltas).all()
    decoded = coder.decode(deltas, a)
    assert torch.isfinite(decoded).all()

    b64, a64, d64 = b.double(), a.double(), decoded.double()
    # fp32 error bound: about 5 roundings of the largest coordinate S in the centres, and
    # (|log ratio| <= 16 + 3) relative roundings of each side in log/exp: 64 eps S covers both.
    scale = max(1.0, float(torch.cat([b64, a64]).abs().max()))
    atol = 64 * EPS32 * scale
    for lo, hi in ((0, 2), (1, 3)):  # x, then y
        b_side, a_side, d_side = b64[hi] - b64[lo], a64[hi] - a64[lo], d64[hi] - d64[lo]
        # centre always kept (to fp32 precision)
        assert abs((d64[lo] + d64[hi]) / 2 - (b64[lo] + b64[hi]) / 2) <= atol
        if b_side <= MAX_RATIO * a_side * (1 - 1e-5):
            # within the clamp: sides match; a zero side comes back as 1e-6 (encode's floor)
            assert abs(d_side - b_side) <= atol + 1e-6
        elif b_side >= MAX_RATIO * a_side * (1 + 1e-5):
            # beyond: the side is the anchor's x 1000 / 16
            assert abs(d_side - MAX_RATIO * a_side) <= atol + 1e-5 * MAX_RATIO * a_side


@settings(max_examples=100, deadline=None)
@given(x1=position, y1=position, x2=position, y2=position, a=anchor_box, w=weights)
def test_encode_finite_for_inverted_and_degenerate_boxes(x1, y1, x2, y2, a, w):
    # x2 < x1 (inverted) or x2 == x1: the side is floored at 1e-6 before the log.
    deltas = BoxCoder(weights=w).encode(torch.tensor([x1, y1, x2, y2]), a)
    assert torch.isfinite(deltas).all()


centre_delta = st.floats(-1e6, 1e6, **f32)
size_delta = st.one_of(st.floats(allow_nan=False),  # +-inf, and +-1e308 -> +-inf in float32
                       st.sampled_from([math.inf, -math.inf, 1e30, 10.0]))  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(deltas=st.lists(st.tuples(centre_delta, centre_delta, size_delta, size_delta),
                       min_size=1, max_size=8), a=anchor_box, w=weights)  # fmt: skip
def test_decode_finite_for_extreme_deltas(deltas, a, w):
    coder = BoxCoder(weights=w)
    boxes = coder.decode(torch.tensor(deltas, dtype=torch.float32), a.expand(len(deltas), 4))
    assert torch.isfinite(boxes).all()
    sides = (boxes[:, 2:] - boxes[:, :2]).double()  # (n, 2)
    anchor_sides = (a[2:] - a[:2]).double()
    assert (sides >= 0).all()
    # exp(clamp) = 1000 / 16 times the anchor at most (fp32 rounding of exp and the subtraction)
    scale = max(1.0, float(boxes.double().abs().max()))
    assert (sides <= MAX_RATIO * anchor_sides * (1 + 1e-5) + 4 * EPS32 * scale).all()


# --------------------------------------------------------------------------------- matcher
def iou64(gt: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(M, R) IoU in float64; 0 where the union is 0 (two empty boxes)."""
    gt, anchors = gt[:, None, :], anchors[None, :, :]  # (M, 1, 4), (1, R, 4)
    lo, hi = np.maximum(gt[..., :2], anchors[..., :2]), np.minimum(gt[..., 2:], anchors[..., 2:])
    inter = np.clip(hi - lo, 0, None).prod(axis=-1)  # (M, R)

    def area(b: np.ndarray) -> np.ndarray:
        return np.clip(b[..., 2:] - b[..., :2], 0, None).prod(axis=-1)

    union = area(gt) + area(anchors) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@st.composite
def matching_problem(draw):
    """(gt_boxes (N, M, 4), gt_valid (N, M), gt_crowd (N, M), anchors (R, 4)), float32 boxes.

    Anchors and half of the GT boxes are often shifted / rescaled copies of an earlier anchor,
    so that IoUs fall on both sides of the thresholds and a GT overlaps several anchors.
    """

    def near(a: torch.Tensor, spread: float) -> torch.Tensor:
        aw, ah = float(a[2] - a[0]), float(a[3] - a[1])
        j = st.floats(-spread, spread, **f32)
        return xyxy(float(a[0]) + draw(j) * aw, float(a[1]) + draw(j) * ah,
                    aw * (1 + draw(j)), ah * (1 + draw(j)))  # fmt: skip

    anchors = [draw(anchor_box)]
    for _ in range(draw(st.integers(0, 11))):
        copy = near(anchors[draw(st.integers(0, len(anchors) - 1))], 0.5)
        anchors.append(copy if draw(st.booleans()) and bool((copy[2:] > copy[:2]).all())
                       else draw(anchor_box))  # fmt: skip
    n, m = draw(st.integers(1, 2)), draw(st.integers(0, 5))
    gt = []
    for _ in range(n * m):
        if draw(st.booleans()):  # near an anchor: exercises the thresholds
            gt.append(near(anchors[draw(st.integers(0, len(anchors) - 1))], 0.5))
        else:  # anywhere: far away, zero-area, huge, tiny
            gt.append(xyxy(*draw(st.tuples(position, position, side, side))))
    gt_boxes = torch.stack(gt).view(n, m, 4) if m else torch.zeros(n, 0, 4)
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=n * m, max_size=n * m)),
                         dtype=torch.bool)
    crowd = torch.tensor(draw(st.lists(st.sampled_from([False, False, False, True]),
                                       min_size=n * m, max_size=n * m)), dtype=torch.bool)
    return gt_boxes, valid.view(n, m), crowd.view(n, m), torch.stack(anchors)


def close_or_above(x: np.ndarray, ref: float) -> np.ndarray:
    """x >= ref up to fp32 IoU rounding (relative 1e-5)."""
    return x >= ref - 1e-5 * max(ref, 1e-30)


@settings(max_examples=120, deadline=None)
@given(problem=matching_problem(), low_quality=st.booleans(),
       thresh=st.sampled_from([(0.5, 0.4), (0.5, 0.5), (0.7, 0.3)]))  # fmt: skip
def test_matcher_labels_follow_their_definition(problem, low_quality, thresh):
    gt_boxes, valid, crowd, anchors = problem
    fg, bg = thresh
    matched, labels = Matcher(fg, bg, low_quality)(gt_boxes, valid, anchors, crowd)
    n, m = valid.shape
    r = anchors.shape[0]
    assert labels.shape == matched.shape == (n, r) and labels.dtype == torch.int8
    assert set(labels.unique().tolist()) <= {IGNORE, BACKGROUND, FOREGROUND}
    assert ((matched >= 0) & (matched < max(m, 1))).all()

    a64 = anchors.double().numpy()
    for i in range(n):
        iou = iou64(gt_boxes[i].double().numpy().reshape(m, 4), a64)  # (M, R)
        real = (valid[i] & ~crowd[i]).numpy()
        crowd_i = (valid[i] & crowd[i]).numpy()
        best = iou[real].max(axis=0) if real.any() else np.full(r, -1.0)  # (R,)
        crowd_best = iou[crowd_i].max(axis=0) if crowd_i.any() else np.full(r, -1.0)
        # anchors a real GT claims as its best (low-quality matches); a zero-IoU GT claims none
        claimed = np.zeros(r, dtype=bool)
        if low_quality:
            for g in np.flatnonzero(real):
                if iou[g].max() > 0:
                    claimed |= close_or_above(iou[g], iou[g].max())
        for j in range(r):
            label = int(labels[i, j])
            high = bool(close_or_above(best[j], fg))
            if label == FOREGROUND:
                assert high or claimed[j]
                # the matched box is the anchor's best real box
                assert real[int(matched[i, j])]
                assert close_or_above(iou[int(matched[i, j]), j], best[j])
            elif label == BACKGROUND:
                # (not "not high": with bg == fg an IoU within rounding of 0.5 may go either way)
                assert best[j] < bg * (1 + 1e-5) and crowd_best[j] < bg * (1 + 1e-5)
            else:  # ignored: between the thresholds, or on a crowd region
                assert close_or_above(best[j], bg) or close_or_above(crowd_best[j], bg)
                assert best[j] < fg * (1 + 1e-5)
        if low_quality:  # each real GT that overlaps anything gets its clear best anchor
            for g in np.flatnonzero(real):
                top = int(iou[g].argmax())
                runner_up = np.delete(iou[g], top).max(initial=0.0)
                if iou[g, top] > 0 and runner_up < iou[g, top] * (1 - 1e-4):
                    assert int(labels[i, top]) == FOREGROUND


@settings(max_examples=60, deadline=None)
@given(problem=matching_problem(), padding=st.lists(st.tuples(position, position, side, side),
       min_size=1, max_size=3))  # fmt: skip
def test_padding_rows_change_nothing(problem, padding):
    gt_boxes, valid, crowd, anchors = problem
    n = valid.shape[0]
    pad = torch.stack([xyxy(*p) for p in padding])  # (P, 4) garbage, even zero-area
    padded_boxes = torch.cat([gt_boxes, pad.expand(n, -1, 4)], dim=1)
    no = torch.zeros(n, len(padding), dtype=torch.bool)
    matcher = Matcher()
    matched, labels = matcher(gt_boxes, valid, anchors, crowd)
    padded_matched, padded_labels = matcher(padded_boxes, torch.cat([valid, no], 1), anchors,
                                            torch.cat([crowd, no], 1))  # fmt: skip
    assert torch.equal(padded_labels, labels)
    assert torch.equal(padded_matched, matched)  # ties: the first index, as without padding


@settings(max_examples=40, deadline=None)
@given(anchors=st.lists(anchor_box, min_size=1, max_size=8),
       gt=st.lists(st.tuples(position, position, st.sampled_from([0.0, 5.0]), st.just(0.0)),
                   min_size=1, max_size=4))  # fmt: skip
def test_zero_area_gt_is_background_and_no_nan(anchors, gt):
    # Zero-area GT: IoU = 0 / area(anchor) = 0 with every anchor: background, nothing claimed.
    a = torch.stack(anchors)
    g = torch.stack([xyxy(*x) for x in gt])[None]  # (1, M, 4)
    matched, labels = Matcher()(g, torch.ones(1, len(gt), dtype=torch.bool), a)
    assert (labels == BACKGROUND).all()
    assert (matched == 0).all()  # max over all-zero IoUs picks the first box
