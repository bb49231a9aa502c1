"""Every loss and its normalisation: sigmoid focal loss (Sec. 3.2), its CE baseline, box loss.

The classification loss is summed over all non-ignored anchors and divided by the number of
anchors assigned to a ground-truth box (Sec. 4); with DDP that count is averaged over ranks so all
ranks share one normaliser. Losses are computed in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from retina.assigner import AssignedTargets
from retina.matcher import FOREGROUND, IGNORE


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: Optional[float] = 0.25,
                       gamma: float = 2.0, reduction: str = "none") -> Tensor:
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), elementwise over any shape.

    alpha_t = alpha for targets 1 and 1 - alpha for targets 0; ``alpha=None`` turns weighting
    off, and with gamma = 0 the result is exactly binary cross-entropy. log(p_t) comes from
    ``binary_cross_entropy_with_logits`` (log-sum-exp form), so it never underflows; inputs of
    any float dtype are computed in fp32.
    """
    x, t = logits.float(), targets.float()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")  # -log(p_t)
    loss = ce
    if gamma != 0:
        p = torch.sigmoid(x)
        one_minus_pt = p + t - 2 * p * t  # 1 - p_t = p (t = 0) or 1 - p (t = 1)
        loss = ce * one_minus_pt.pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction != "none":
        raise ValueError(f"reduction must be none | mean | sum, got {reduction!r}")
    return loss


def box_regression_loss(pred: Tensor, target: Tensor, kind: str, beta: float) -> Tensor:
    """Elementwise smooth L1 (beta) or L1 loss in fp32, shape of ``pred``."""
    pred, target = pred.float(), target.float()
    if kind == "l1" or beta == 0:
        return (pred - target).abs()
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="none")


def _mean_over_ranks(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class RetinaNetLoss(nn.Module):
    """Classification + box loss of a batch from head outputs and assigned targets."""

    def __init__(self, num_classes: int, type: Literal["focal", "ce"] = "focal",
                 alpha: Optional[float] = 0.25, gamma: float = 2.0,
                 box_loss: Literal["smooth_l1", "l1"] = "smooth_l1", smooth_l1_beta: float = 0.1,
                 box_weight: float = 1.0, normalizer: Literal["batch", "ema", "image"] = "batch",
                 ema_momentum: float = 0.9) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.alpha = alpha
        self.gamma = gamma if type == "focal" else 0.0  # ce: alpha-balanced BCE, Table 1a
        self.box_loss = box_loss
        self.beta = smooth_l1_beta
        self.box_weight = box_weight
        self.normalizer = normalizer
        self.ema_momentum = ema_momentum
        # detectron2 starts its running positive count at 100; kept in the state dict.
        self.register_buffer("num_pos_ema", torch.tensor(100.0))

    def forward(self, pred_logits: Tensor, pred_deltas: Tensor,
                targets: AssignedTargets) -> dict[str, Tensor]:
        """pred_logits (N, R, K), pred_deltas (N, R, 4) -> scalar ``loss_cls``, ``loss_box``."""
        fg = targets.labels == FOREGROUND  # (N, R)
        valid = targets.labels != IGNORE  # (N, R)
        k = torch.arange(self.num_classes, device=pred_logits.device)
        onehot = targets.classes[..., None] == k  # (N, R, K) bool; background class K never hits
        cls = sigmoid_focal_loss(pred_logits, onehot, self.alpha, self.gamma)
        cls_per_image = (cls.sum(-1) * valid).sum(-1)  # (N,)
        box = box_regression_loss(pred_deltas, targets.box_deltas, self.box_loss, self.beta)
        box_per_image = (box.sum(-1) * fg).sum(-1)  # (N,)
        pos_per_image = fg.sum(-1).float()  # (N,)

        if self.normalizer == "image":  # torchvision: each image by its own positives, then mean
            norm = pos_per_image.clamp(min=1)
            loss_cls = (cls_per_image / norm).mean()
            loss_box = (box_per_image / norm).mean()
        else:
            num_pos = _mean_over_ranks(pos_per_image.sum())
            if self.normalizer == "ema":
                if self.training:
                    m = self.ema_momentum
                    self.num_pos_ema.copy_(m * self.num_pos_ema + (1 - m) * num_pos.detach())
                num_pos = self.num_pos_ema
            norm = num_pos.clamp(min=1)
            loss_cls = cls_per_image.sum() / norm
            loss_box = box_per_image.sum() / norm
        self.last_num_pos = pos_per_image.sum().detach()  # read by the trainer when it logs
        return {"loss_cls": loss_cls, "loss_box": self.box_weight * loss_box}
