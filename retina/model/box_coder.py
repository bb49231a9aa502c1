"""Box <-> regression-target coding: (dx, dy, dw, dh) relative to anchors (R-CNN parameterisation).

This module owns the deltas, their weights and the ``log(1000 / 16)`` clamp on dw, dh that keeps
``exp`` from overflowing on a wild prediction. Boxes are absolute XYXY pixels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class BoxCoder:
    """Encode boxes as deltas to anchors and decode them back; any leading shape ``(..., 4)``."""

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = math.log(1000.0 / 16),
    ) -> None:
        self.weights = weights
        self.scale_clamp = scale_clamp

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Deltas (..., 4) that take ``anchors`` (..., 4) to ``boxes`` (..., 4); computed in fp32,
        or fp64 when either input is fp64."""
        dtype = _compute_dtype(boxes, anchors)
        boxes, anchors = boxes.to(dtype), anchors.to(dtype)
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        bw = boxes[..., 2] - boxes[..., 0]
        bh = boxes[..., 3] - boxes[..., 1]
        bx = boxes[..., 0] + 0.5 * bw
        by = boxes[..., 1] + 0.5 * bh
        # A degenerate target (w or h 0) would give log(0); its anchor is never foreground in
        # practice, but keep the value finite so masked-out entries cannot poison a sum.
        bw, bh = bw.clamp(min=1e-6), bh.clamp(min=1e-6)
        return torch.stack(
            (wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah)),
            dim=-1,
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes (..., 4) XYXY from ``deltas`` (..., 4) applied to ``anchors`` (..., 4); fp32, or
        fp64 when either input is fp64 (half precision is computed in fp32)."""
        dtype = _compute_dtype(deltas, anchors)
        deltas, anchors = deltas.to(dtype), anchors.to(dtype)
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        cx, cy = dx * aw + ax, dy * ah + ay
        w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def _compute_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """fp32 for half-precision (and fp32) inputs, fp64 when either is fp64."""
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
