"""Anchor generation. This module owns anchor order: level, then H, then W, then A (row-major).

Within a cell the A = len(scales) * len(ratios) anchors go scale-major, ratio-minor by default
(detectron2); ``order="ratio_major"`` gives torchvision's order. Anchors are built once per set of
feature-map sizes (and padded image size, when strides come from it) and cached; the whole batch
shares them (images are padded to one size).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn


def cell_anchors(size: float, scales: Sequence[float], ratios: Sequence[float],
                 order: str = "scale_major", truncate_sizes: bool = False,
                 round_corners: bool = False) -> Tensor:
    """The (A, 4) XYXY anchors of one cell centred at (0, 0); ratio = height / width.

    An anchor of scale s and ratio r has area (size * s)^2, width sqrt(area / r), height r * width.
    ``order``: "scale_major" (scale outer, ratio inner) or "ratio_major" (ratio outer).
    ``truncate_sizes``: side int(size * s), as torchvision's 32, 40, 50. ``round_corners``: the
    corners rounded to whole pixels (half to even), as torchvision's ``base_anchors.round()``.
    """
    sides = [float(int(size * s)) if truncate_sizes else size * s for s in scales]
    if round_corners:
        # torchvision's arithmetic in fp32: w = side / sqrt(r), h = side * sqrt(r), then round,
        # so a corner that lands on .5 rounds the same way.
        side = torch.tensor(sides, dtype=torch.float32)[:, None]  # (S, 1)
        h_ratio = torch.sqrt(torch.tensor(list(ratios), dtype=torch.float32))[None, :]  # (1, Q)
        w, h = side * (1 / h_ratio), side * h_ratio  # (S, Q)
    else:
        side = torch.tensor(sides, dtype=torch.float64)  # (S,)
        r = torch.tensor(list(ratios), dtype=torch.float64)  # (Q,)
        w = torch.sqrt((side**2)[:, None] / r[None, :])  # (S, Q)
        h = w * r[None, :]
    boxes = torch.stack((-w, -h, w, h), dim=-1) / 2  # (S, Q, 4)
    if order == "ratio_major":
        boxes = boxes.transpose(0, 1)  # (Q, S, 4)
    elif order != "scale_major":
        raise ValueError(f"order must be scale_major | ratio_major, got {order!r}")
    if round_corners:
        boxes = boxes.round()
    return boxes.reshape(-1, 4).float()  # (A, 4)


class AnchorGenerator(nn.Module):
    """Anchors for feature maps of the given strides; ``forward`` returns (R, 4) XYXY.

    ``stride_from="image"`` spaces each level's anchors by (padded image size // feature size)
    per axis instead of its nominal stride, as torchvision does; ``forward`` then needs the
    padded image size. ``order``, ``truncate_sizes`` and ``round_corners`` go to ``cell_anchors``.
    """

    def __init__(self, strides: Sequence[int], sizes: Sequence[float], scales: Sequence[float],
                 ratios: Sequence[float], offset: float = 0.0, stride_from: str = "level",
                 order: str = "scale_major", truncate_sizes: bool = False,
                 round_corners: bool = False) -> None:
        super().__init__()
        if len(strides) != len(sizes):
            raise ValueError(f"need one anchor size per level: {len(sizes)} sizes, {len(strides)} levels")
        if stride_from not in ("level", "image"):
            raise ValueError(f"stride_from must be level | image, got {stride_from!r}")
        self.strides = list(strides)
        self.offset = offset
        self.stride_from = stride_from
        self.num_anchors = len(scales) * len(ratios)  # A
        self.cell = [cell_anchors(s, scales, ratios, order, truncate_sizes, round_corners)
                     for s in sizes]  # each (A, 4)
        self._cache: dict[tuple, Tensor] = {}

    def _level_strides(self, level: int, height: int, width: int,
                       image_size: Optional[tuple[int, int]]) -> tuple[int, int]:
        """(stride_y, stride_x) of one level."""
        if self.stride_from == "level":
            return self.strides[level], self.strides[level]
        if image_size is None:
            raise ValueError("stride_from='image' needs the padded image size")
        return image_size[0] // height, image_size[1] // width

    def level_anchors(self, level: int, height: int, width: int, device: torch.device,
                      image_size: Optional[tuple[int, int]] = None) -> Tensor:
        """(H * W * A, 4) anchors of one level, ordered H, W, A."""
        stride_y, stride_x = self._level_strides(level, height, width, image_size)
        ys = (torch.arange(height, dtype=torch.float32, device=device) + self.offset) * stride_y
        xs = (torch.arange(width, dtype=torch.float32, device=device) + self.offset) * stride_x
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
        shifts = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        return (shifts + self.cell[level].to(device)[None]).reshape(-1, 4)  # (H*W*A, 4)

    def forward(self, feature_sizes: Sequence[tuple[int, int]], device: torch.device,
                image_size: Optional[tuple[int, int]] = None) -> Tensor:
        """(R, 4) anchors; ``image_size`` (padded H, W) is used only with stride_from='image'."""
        image_key = tuple(image_size) if self.stride_from == "image" and image_size else None
        key = (tuple(feature_sizes), str(device), image_key)
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = torch.cat([self.level_anchors(i, h, w, device, image_key)
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
