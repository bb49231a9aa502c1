"""Tests for retina.model.anchors: cell anchors, anchor order, caching and sizes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from retina.model.anchors import AnchorGenerator, cell_anchors, default_sizes

CPU = torch.device("cpu")


def test_cell_anchor_square():
    # size 32, scale 1, ratio 1: a 32 x 32 box centred on (0, 0)
    assert_close(cell_anchors(32, [1.0], [1.0]), torch.tensor([[-16.0, -16.0, 16.0, 16.0]]))


def test_cell_anchor_ratio_is_height_over_width():
    # ratio 0.5 = h / w, area 32^2 = 1024: w = sqrt(1024 / 0.5) = sqrt(2048) = 45.2548..,
    # h = 0.5 * w = 22.6274..
    w, h = math.sqrt(2048.0), 0.5 * math.sqrt(2048.0)
    assert_close(cell_anchors(32, [1.0], [0.5]), torch.tensor([[-w / 2, -h / 2, w / 2, h / 2]]))
    # ratio 2: the same box transposed
    assert_close(cell_anchors(32, [1.0], [2.0]), torch.tensor([[-h / 2, -w / 2, h / 2, w / 2]]))


def test_cell_anchor_octave_scales_and_order():
    # Paper, Sec. 4: scales 2^(k/3), k = 0, 1, 2; area (32 * 2^(k/3))^2 whatever the ratio.
    scales = [2 ** (k / 3) for k in range(3)]
    ratios = [0.5, 1.0, 2.0]
    a = cell_anchors(32, scales, ratios)
    assert a.shape == (9, 4)
    assert a.dtype == torch.float32
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    expected_area = torch.tensor([(32 * 2 ** (k / 3)) ** 2 for k in range(3) for _ in ratios])
    assert_close(w * h, expected_area)
    # scale-major, ratio-minor: h / w cycles through the ratios within each scale
    assert_close(h / w, torch.tensor(ratios * 3))
    # every anchor is centred on (0, 0)
    assert_close(a[:, 0] + a[:, 2], torch.zeros(9))
    assert_close(a[:, 1] + a[:, 3], torch.zeros(9))


def test_generator_order_hand_values_2x2_stride8():
    gen = AnchorGenerator(strides=[8], sizes=[16], scales=[1.0], ratios=[1.0])
    anchors = gen([(2, 2)], CPU)
    # centres (i + 0) * 8; order H then W (row-major): (y, x) = (0, 0), (0, 8), (8, 0), (8, 8);
    # each anchor is centre +- 8 (size 16)
    expected = torch.tensor([
        [-8.0, -8.0, 8.0, 8.0],
        [0.0, -8.0, 16.0, 8.0],
        [-8.0, 0.0, 8.0, 16.0],
        [0.0, 0.0, 16.0, 16.0],
    ])
    assert_close(anchors, expected)


def test_generator_offset_half():
    gen = AnchorGenerator(strides=[8], sizes=[16], scales=[1.0], ratios=[1.0], offset=0.5)
    anchors = gen([(1, 2)], CPU)
    # centres (0 + 0.5) * 8 = 4 and (1 + 0.5) * 8 = 12 along x, 4 along y
    assert_close(anchors, torch.tensor([[-4.0, -4.0, 12.0, 12.0], [4.0, -4.0, 20.0, 12.0]]))


def test_generator_order_a_innermost_then_levels():
    # A = 2 (scales 1 and 2, size 8): cell anchors +-4 and +-8
    gen = AnchorGenerator(strides=[8, 16], sizes=[8, 8], scales=[1.0, 2.0], ratios=[1.0])
    sizes = [(1, 2), (1, 1)]
    anchors = gen(sizes, CPU)
    # R = sum H * W * A = 1*2*2 + 1*1*2 = 6
    assert anchors.shape == (6, 4)
    expected = torch.tensor([
        [-4.0, -4.0, 4.0, 4.0],  # level 0, y 0, x 0, a 0
        [-8.0, -8.0, 8.0, 8.0],  # level 0, y 0, x 0, a 1
        [4.0, -4.0, 12.0, 4.0],  # level 0, y 0, x 8, a 0
        [0.0, -8.0, 16.0, 8.0],  # level 0, y 0, x 8, a 1
        [-4.0, -4.0, 4.0, 4.0],  # level 1, y 0, x 0, a 0
        [-8.0, -8.0, 8.0, 8.0],  # level 1, y 0, x 0, a 1
    ])
    assert_close(anchors, expected)
    assert gen.num_anchors == 2
    assert gen.num_anchors_per_level(sizes) == [4, 2]


def test_generator_count_and_cache():
    scales = [2 ** (k / 3) for k in range(3)]
    gen = AnchorGenerator([8, 16, 32], [32, 64, 128], scales, [0.5, 1.0, 2.0])
    sizes = [(4, 5), (2, 3), (1, 2)]
    anchors = gen(sizes, CPU)
    # R = (4*5 + 2*3 + 1*2) * 9 = 28 * 9 = 252
    assert anchors.shape == (252, 4)
    assert gen.num_anchors_per_level(sizes) == [180, 54, 18]
    assert gen(sizes, CPU) is anchors  # cached: the same tensor object
    other = gen([(4, 4), (2, 2), (1, 1)], CPU)
    assert other.shape == ((16 + 4 + 1) * 9, 4)
    assert gen(sizes, CPU) is anchors


def test_generator_single_anchor():
    gen = AnchorGenerator([128], [512], [1.0], [1.0])
    assert_close(gen([(1, 1)], CPU), torch.tensor([[-256.0, -256.0, 256.0, 256.0]]))


def test_generator_rejects_size_level_mismatch():
    with pytest.raises(ValueError, match="one anchor size per level"):
        AnchorGenerator([8, 16], [32], [1.0], [1.0])


def test_default_sizes():
    # 4 x stride, stride 2^level: 4 * 8 = 32 .. 4 * 128 = 512
    assert default_sizes(3, 7) == [32.0, 64.0, 128.0, 256.0, 512.0]
