"""Tests for retina.model.box_coder: hand-computed deltas, weights, the dw/dh clamp, round trip, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from retina.model.box_coder import BoxCoder

LOG2 = math.log(2.0)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize(
    "anchor, box, deltas",
    [
        # anchor centre (5, 5), w = h = 10; box centre (10, 10), w = h = 10:
        # dx = (10 - 5) / 10 = 0.5, dy = 0.5, dw = log(10 / 10) = 0, dh = 0
        ([0, 0, 10, 10], [5, 5, 15, 15], [0.5, 0.5, 0.0, 0.0]),
        # same centre, box twice the size: dx = dy = 0, dw = dh = log(20 / 10) = log 2
        ([0, 0, 10, 10], [-5, -5, 15, 15], [0.0, 0.0, LOG2, LOG2]),
        # anchor centre (5, 10), w 10, h 20; box centre (4, 8), w 4, h 8:
        # dx = (4 - 5) / 10 = -0.1, dy = (8 - 10) / 20 = -0.1, dw = log(4 / 10), dh = log(8 / 20)
        ([0, 0, 10, 20], [2, 4, 6, 12], [-0.1, -0.1, math.log(0.4), math.log(0.4)]),
        # identical boxes: all zero
        ([3, 7, 19, 11], [3, 7, 19, 11], [0.0, 0.0, 0.0, 0.0]),
    ],
)
def test_encode_decode_hand_table(anchor, box, deltas):
    coder = BoxCoder()
    assert_close(coder.encode(t(box), t(anchor)), t(deltas))
    assert_close(coder.decode(t(deltas), t(anchor)), t(box))


def test_weights_scale_the_deltas():
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    anchor, box = t([0, 0, 10, 10]), t([0, 0, 20, 20])
    # unweighted: dx = (10 - 5) / 10 = 0.5, dw = log 2; weighted: 10 * 0.5 = 5, 5 * log 2
    expected = t([5.0, 5.0, 5 * LOG2, 5 * LOG2])
    assert_close(coder.encode(box, anchor), expected)
    assert_close(coder.decode(expected, anchor), box)


def test_decode_clamps_dw_dh_at_log_1000_over_16():
    coder = BoxCoder()
    anchor = t([0, 0, 16, 16])  # centre 8, w 16
    # dw = 10 > log(1000 / 16): width = 16 * 1000 / 16 = 1000 -> x from 8 - 500 to 8 + 500
    assert_close(coder.decode(t([0, 0, 10.0, 10.0]), anchor), t([-492.0, -492.0, 508.0, 508.0]))
    # a huge delta stays finite
    assert torch.isfinite(coder.decode(t([0, 0, 1e4, 1e4]), anchor)).all()
    # the clamp applies after dividing by the weight: 5 * 10 / 5 = 10 -> still clamped
    weighted = BoxCoder(weights=(1.0, 1.0, 5.0, 5.0))
    assert_close(weighted.decode(t([0, 0, 50.0, 50.0]), anchor), t([-492.0, -492.0, 508.0, 508.0]))
    # negative deltas are not clamped: w = 16 * exp(-log 16) = 1 -> 7.5 .. 8.5
    assert_close(coder.decode(t([0, 0, -math.log(16), -math.log(16)]), anchor), t([7.5, 7.5, 8.5, 8.5]))


def test_leading_shapes_broadcast_elementwise():
    coder = BoxCoder()
    anchors = t([0, 0, 10, 10], [0, 0, 10, 20], [3, 7, 19, 11])
    boxes = t([5, 5, 15, 15], [2, 4, 6, 12], [3, 7, 19, 11])
    flat = coder.encode(boxes, anchors)  # (3, 4)
    batched = coder.encode(boxes.expand(2, 3, 4), anchors.expand(2, 3, 4))  # (2, 3, 4)
    assert batched.shape == (2, 3, 4)
    assert_close(batched[0], flat)
    assert_close(batched[1], flat)


def test_degenerate_target_is_finite():
    coder = BoxCoder()
    deltas = coder.encode(t([5, 5, 5, 9]), t([0, 0, 10, 10]))  # zero width
    assert torch.isfinite(deltas).all()
    # dy = (7 - 5) / 10 = 0.2, dh = log(4 / 10)
    assert_close(deltas[0, 1::2], torch.tensor([0.2, math.log(0.4)]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    coder = BoxCoder()
    # Coordinates near 2000 are exact in fp16 but their centres (2000.5) are not: fp16 spacing
    # is 1 there. In fp32: bx = 2000.5, ax = 2001, dx = (2000.5 - 2001) / 2 = -0.25,
    # dw = log(1 / 2).  (bf16 cannot hold 2001 either, so use values it can hold for bf16.)
    if dtype == torch.float16:
        box, anchor = t([2000, 2000, 2001, 2001]), t([2000, 2000, 2002, 2002])
        expected = t([-0.25, -0.25, -LOG2, -LOG2])
    else:
        # bf16 holds integers up to 256 exactly; box centre 128.5, anchor centre 129, w 2:
        # dx = (128.5 - 129) / 2 = -0.25, dw = log(1 / 2)
        box, anchor = t([128, 128, 129, 129]), t([128, 128, 130, 130])
        expected = t([-0.25, -0.25, -LOG2, -LOG2])
    deltas = coder.encode(box.to(dtype), anchor.to(dtype))
    assert deltas.dtype == torch.float32
    assert_close(deltas, expected)
    # decode of low-precision deltas on fp32 anchors gives fp32 boxes: centre 2001 - 0.25 * 2
    decoded = coder.decode(t([-0.25, -0.25, -LOG2, -LOG2]).to(dtype), anchor)
    assert decoded.dtype == torch.float32
    # log 2 is not exact in low precision: compare with the decode of the rounded deltas in fp32
    rounded = t([-0.25, -0.25, -LOG2, -LOG2]).to(dtype).float()
    assert_close(decoded, coder.decode(rounded, anchor))
    assert_close(decoded, box, atol=0.02, rtol=0)


coord = st.floats(-200.0, 1000.0, allow_nan=False, width=32)
side = st.floats(1.0, 500.0, allow_nan=False, width=32)
anchor_side = st.floats(10.0, 512.0, allow_nan=False, width=32)  # box/anchor <= 50 < 1000/16


@settings(max_examples=60, deadline=None)
@given(bx=coord, by=coord, bw=side, bh=side, ax=coord, ay=coord, aw=anchor_side, ah=anchor_side,
       weighted=st.booleans())
def test_decode_encode_round_trip(bx, by, bw, bh, ax, ay, aw, ah, weighted):
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0) if weighted else (1.0, 1.0, 1.0, 1.0))
    box = t([bx, by, bx + bw, by + bh])
    anchor = t([ax, ay, ax + aw, ay + ah])
    assert_close(coder.decode(coder.encode(box, anchor), anchor), box, atol=2e-3, rtol=1e-5)


def test_decode_keeps_fp64():
    # anchor [1e6, 1e6, 1e6 + 10, 1e6 + 10] (centre 1e6 + 5), dx = 1e-7: the box moves by
    # 1e-7 * 10 = 1e-6 px, below fp32's spacing at 1e6 (0.0625) but kept in fp64
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    anchor = torch.tensor([1e6, 1e6, 1e6 + 10, 1e6 + 10], dtype=torch.float64)
    box = coder.decode(torch.tensor([1e-7, 0.0, 0.0, 0.0], dtype=torch.float64), anchor)
    assert box.dtype == torch.float64
    assert_close(box[0] - 1e6, torch.tensor(1e-6, dtype=torch.float64), rtol=0, atol=1e-9)
