"""Classification and box subnets, shared across pyramid levels (Sec. 4, Fig. 3), and their
initialisation: Gaussian weights, the class-logit prior bias (``prior_bias``, Sec. 4.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def prior_bias(prior_prob: float) -> float:
    """Class-logit bias so every anchor starts at foreground probability pi (Sec. 4.1):
    -log((1 - pi) / pi); pi = 0 means no prior, bias 0."""
    return -math.log((1 - prior_prob) / prior_prob) if prior_prob > 0 else 0.0


def to_n_hwa_c(x: Tensor, c: int) -> Tensor:
    """(N, A*C, H, W) -> (N, H*W*A, C), the anchor order of ``anchors.py``."""
    n, _, h, w = x.shape
    return x.view(n, -1, c, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, c)


def group_count(channels: int) -> int:
    """GroupNorm's groups for a tower ``channels`` wide: 32 (GN paper, torchvision's v2 head),
    fewer when 32 does not divide the width (48 -> 16), and at least 2 channels per group (32 ->
    16, 16 -> 8): a group of one channel normalises a 1x1 level (P7 of a small image) to its
    bias alone, and torch refuses it for a single image. 64 channels and wider keep 32 groups."""
    groups = math.gcd(32, channels)
    return groups // 2 if groups > 1 and channels // groups < 2 else groups


def _tower(channels: int, num_convs: int, norm: str, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=bias))
        if norm == "gn":
            layers.append(nn.GroupNorm(group_count(channels), channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RetinaHead(nn.Module):
    """Two towers of ``num_convs`` 3x3 convs, then K*A class logits and 4*A box deltas."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 norm: str = "none", prior_prob: float = 0.01, conv_bias: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_tower = _tower(channels, num_convs, norm, conv_bias)
        self.box_tower = _tower(channels, num_convs, norm, conv_bias)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.box_deltas = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)  # Sec. 4.1: Gaussian sigma = 0.01, bias 0
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # pi = 0.01 prior, Sec. 4.1: keeps early CE from being swamped by background.
        nn.init.constant_(self.cls_logits.bias, prior_bias(prior_prob))

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Features per level (N, C, H_l, W_l) -> logits (N, R, K) and deltas (N, R, 4)."""
        logits = [to_n_hwa_c(self.cls_logits(self.cls_tower(f)), self.num_classes) for f in features]
        deltas = [to_n_hwa_c(self.box_deltas(self.box_tower(f)), 4) for f in features]
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)  # (N, R, K), (N, R, 4)
