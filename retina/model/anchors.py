"""Anchor generation. This module owns anchor order: level, then H, then W, then A (row-major).

Within a cell the A = len(scales) * len(ratios) anchors go scale-major, ratio-minor. Anchors are
built once per set of feature-map sizes and cached; the whole batch shares them (images are padded
to one size).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


def cell_anchors(size: float, scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """The (A, 4) XYXY anchors of one cell centred at (0, 0); ratio = height / width.

    An anchor of scale s and ratio r has area (size * s)^2, width sqrt(area / r), height r * width.
    """
    side = torch.tensor([size * s for s in scales], dtype=torch.float64)  # (S,)
    r = torch.tensor(list(ratios), dtype=torch.float64)  # (Q,)
    area = (side**2)[:, None]  # (S, 1)
    w = torch.sqrt(area / r[None, :])  # (S, Q)
    h = w * r[None, :]
    return (torch.stack((-w, -h, w, h), dim=-1) / 2).reshape(-1, 4).float()  # (S*Q, 4)


class AnchorGenerator(nn.Module):
    """Anchors for feature maps of the given strides; ``forward`` returns (R, 4) XYXY."""

    def __init__(self, strides: Sequence[int], sizes: Sequence[float], scales: Sequence[float],
                 ratios: Sequence[float], offset: float = 0.0) -> None:
        super().__init__()
        if len(strides) != len(sizes):
            raise ValueError(f"need one anchor size per level: {len(sizes)} sizes, {len(strides)} levels")
        self.strides = list(strides)
        self.offset = offset
        self.num_anchors = len(scales) * len(ratios)  # A
        self.cell = [cell_anchors(s, scales, ratios) for s in sizes]  # each (A, 4)
        self._cache: dict[tuple, Tensor] = {}

    def level_anchors(self, level: int, height: int, width: int, device: torch.device) -> Tensor:
        """(H * W * A, 4) anchors of one level, ordered H, W, A."""
        stride = self.strides[level]
        ys = (torch.arange(height, dtype=torch.float32, device=device) + self.offset) * stride
        xs = (torch.arange(width, dtype=torch.float32, device=device) + self.offset) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
        shifts = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        return (shifts + self.cell[level].to(device)[None]).reshape(-1, 4)  # (H*W*A, 4)

    def forward(self, feature_sizes: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
        key = (tuple(feature_sizes), str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = torch.cat([self.level_anchors(i, h, w, device)
                                 for i, (h, w) in enumerate(feature_sizes)])  # (R, 4)
            if len(self._cache) > 32:  # many input sizes (eval at original size): bound memory
                self._cache.clear()
            self._cache[key] = anchors
        return anchors

    def num_anchors_per_level(self, feature_sizes: Sequence[tuple[int, int]]) -> list[int]:
        return [h * w * self.num_anchors for h, w in feature_sizes]


def default_sizes(min_level: int, max_level: int) -> list[float]:
    """4 x stride on each level: 32^2..512^2 on P3..P7 (Sec. 4)."""
    return [4.0 * 2**level for level in range(min_level, max_level + 1)]


def prior_bias(prior_prob: float) -> float:
    """Class-logit bias so every anchor starts at foreground probability pi (Sec. 4.1)."""
    return -math.log((1 - prior_prob) / prior_prob) if prior_prob > 0 else 0.0
