"""Every loss and its normalisation: sigmoid focal loss (Sec. 3.2), its baselines, box loss.

The loss is a function of tensors and one settings object, the config's own ``loss`` section
(``LossConfig``, declared once in ``retina.config.schema``; only its fields are read, so any
object with them serves): ``retinanet_losses(pred_logits,
pred_deltas, gt_classes, gt_deltas, settings)`` with ``gt_classes`` (N, R) in detectron2's
encoding {-1 ignored, 0..K-1 foreground class, K background}. It returns the losses and the batch's positive count;
it keeps no state. The classification loss is summed over all non-ignored anchors and divided by
the number of anchors assigned to a ground-truth box (Sec. 4); with DDP that count is averaged
over ranks so all ranks share one normaliser. Losses are computed in fp32 whatever the autocast
dtype (fp64 inputs stay fp64).

``type`` picks the classification loss of the paper's ablations:

- ``focal``: FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (Sec. 3.2, Table 1b).
- ``ce``: alpha-balanced sigmoid cross-entropy (Table 1a): FL computed the same way; the config
  refuses a gamma other than 0 for it (``retina/config/rules.py``), the loss uses what it is given.
- ``focal_star``: FL* = -log(sigmoid(gamma x_t + beta)) / gamma with x_t = +x for a positive,
  -x for a negative (appendix A, Eq. 6-7), alpha_t-weighted like FL when ``alpha`` is set.
- ``quality_focal``: QFL (GFL, Li et al. 2020): FL whose positive target is the IoU of the
  anchor's predicted box with its ground truth (``iou_targets``, no gradient through it) instead
  of 1, so that the score ranks boxes by how well they fit; gamma is its beta, no alpha. The box
  loss is unchanged. Computed by the fused FL with soft foreground targets.
- ``ohem``: sigmoid CE (alpha_t-weighted when set) on the anchors ``ohem_select`` keeps per
  image: ranked by loss, NMS over the anchor boxes, the top ``batch_size`` (Sec. 5.1, Table 1d,
  after Shrivastava et al. 2016). The kept anchors' summed CE is divided by the number of
  positives like every type (``ohem.normalizer`` positives), so only the selection differs, or by
  the number kept (``selected``: the mean over the minibatch, as OHEM [31] and Fast R-CNN average
  over their B RoIs). The box loss stays on all positives, divided by their count.

The pieces live in this package: ``focal`` (FL, its fused form, QFL, FL*), ``ohem`` (the
selection), ``box`` (smooth L1 / L1 / GIoU and the IoU targets); here the batch is assembled and
normalised.

Shape legend: N images, R anchors per image, K classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from retina.model.losses.box import box_regression_loss, giou_loss_per_image, iou_targets
from retina.model.losses.focal import focal_loss_per_image, focal_star_loss, sigmoid_focal_loss
from retina.model.losses.ohem import ohem_selected

if TYPE_CHECKING:  # the settings are the config's section; the loss reads only its fields
    from retina.config.schema import LossConfig

# detectron2 starts its running positive count (normalizer "ema") at 100.
EMA_INIT = 100.0


class LossOutput(NamedTuple):
    """What ``retinanet_losses`` returns."""

    losses: dict[str, Tensor]  # "loss_cls", "loss_box": scalars whose sum is trained
    num_pos: Tensor  # () float: positive anchors of the batch (this rank), no gradient
    num_pos_ema: Optional[Tensor]  # () the updated running normaliser (normalizer "ema"), else None


def _mean_over_ranks(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def _cls_loss_per_image(pred_logits: Tensor, gt_classes: Tensor, valid: Tensor, fg: Tensor,
                        s: LossConfig, anchors: Optional[Tensor],
                        fg_targets: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """(N,) summed classification loss of each image, and for OHEM with the ``selected``
    normaliser the number of anchors kept (else None). ``fg_targets`` (N, R): the soft targets
    of ``quality_focal``."""
    if s.type in ("focal", "ce", "quality_focal"):  # fused: no one-hot target, one (N, R, K) kept
        return focal_loss_per_image(pred_logits, gt_classes, valid, s.alpha, s.gamma, fg_targets), None
    k = torch.arange(pred_logits.shape[-1], device=pred_logits.device)  # (K,)
    onehot = gt_classes[..., None] == k  # (N, R, K) bool; -1 (ignored) and K (background) never hit
    if s.type == "focal_star":
        cls = focal_star_loss(pred_logits, onehot, s.focal_star.gamma, s.focal_star.beta, s.alpha)
        return (cls.sum(-1) * valid).sum(-1), None
    cls_per_anchor = sigmoid_focal_loss(pred_logits, onehot, s.alpha, s.gamma).sum(-1)  # (N, R)
    kept = ohem_selected(cls_per_anchor, fg, valid, anchors, s.ohem)  # (N, R) bool
    num_kept = kept.sum().float() if s.ohem.normalizer == "selected" else None
    return (cls_per_anchor * kept).sum(-1), num_kept


def retinanet_losses(pred_logits: Tensor, pred_deltas: Tensor, gt_classes: Tensor, gt_deltas: Tensor,
                     settings: LossConfig, anchors: Optional[Tensor] = None,
                     num_pos_ema: Optional[Tensor] = None,
                     decode: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> LossOutput:
    """Classification + box loss of a batch, one call for the whole batch.

    Args:
        pred_logits: (N, R, K) class logits; pred_deltas: (N, R, 4) box deltas.
        gt_classes: (N, R) int64, -1 ignored anchor, 0..K-1 its box's class, K background.
        gt_deltas: (N, R, 4) encoded boxes the foreground anchors regress to (others unread).
        settings: the loss type and its settings: the config's ``loss`` section (``LossConfig``).
        anchors: (R, 4) XYXY, needed by ``ohem`` (its NMS) and box loss ``giou``.
        num_pos_ema: () running positive count before this batch; needed by normalizer ``ema``
            (start at ``EMA_INIT``). The updated value comes back in ``num_pos_ema``: the caller
            stores it (the model keeps it as a buffer).
        decode: ``(deltas (P, 4), anchors (P, 4)) -> boxes (P, 4)``, the box coder's inverse;
            needed by box loss ``giou`` (which compares boxes, not deltas).
    Returns:
        ``LossOutput(losses={"loss_cls", "loss_box"}, num_pos, num_pos_ema)``.
    """
    s = settings
    valid = gt_classes >= 0  # (N, R)
    fg = valid & (gt_classes < pred_logits.shape[-1])  # (N, R)
    if (s.box_loss == "giou" or s.type == "quality_focal") and (anchors is None or decode is None):
        what = "box loss 'giou'" if s.box_loss == "giou" else "loss type 'quality_focal'"
        raise ValueError(f"{what} needs the anchors (R, 4) and the box coder's decode")
    fg_targets = None
    if s.type == "quality_focal":
        fg_targets = iou_targets(pred_deltas, gt_deltas, fg, anchors, decode)  # (N, R)
    cls_per_image, num_kept = _cls_loss_per_image(pred_logits, gt_classes, valid, fg, s, anchors,
                                                  fg_targets)  # (N,)
    if s.box_loss == "giou":
        box_per_image = giou_loss_per_image(pred_deltas, gt_deltas, fg, anchors, decode)  # (N,)
    else:
        box = box_regression_loss(pred_deltas, gt_deltas, s.box_loss, s.smooth_l1_beta)  # (N, R, 4)
        box_per_image = (box.sum(-1) * fg).sum(-1)  # (N,)
    pos_per_image = fg.sum(-1).float()  # (N,)
    new_ema = None
    if s.normalizer == "image":  # torchvision: each image by its own positives, then mean
        norm = pos_per_image.clamp(min=1)
        loss_cls = (cls_per_image / norm).mean()
        loss_box = (box_per_image / norm).mean()
    else:
        num_pos = _mean_over_ranks(pos_per_image.sum())
        if s.normalizer == "ema":  # detectron2: a running mean of the positive count
            if num_pos_ema is None:
                raise ValueError("loss normalizer 'ema' needs num_pos_ema, the running positive count")
            num_pos = new_ema = s.ema_momentum * num_pos_ema + (1 - s.ema_momentum) * num_pos
        norm = num_pos.clamp(min=1)
        loss_cls = cls_per_image.sum() / norm
        loss_box = box_per_image.sum() / norm
    if num_kept is not None:  # ohem, normalizer "selected": the mean over the kept anchors
        loss_cls = cls_per_image.sum() / _mean_over_ranks(num_kept).clamp(min=1)
    losses = {"loss_cls": loss_cls, "loss_box": s.box_weight * loss_box}
    return LossOutput(losses, pos_per_image.sum(), new_ema)
