"""Every loss and its normalisation: sigmoid focal loss (Sec. 3.2), its baselines, box loss.

The loss is a function of tensors: ``retinanet_losses(pred_logits, pred_deltas, gt_classes,
gt_deltas, settings)`` with ``gt_classes`` (N, R) in detectron2's encoding {-1 ignored,
0..K-1 foreground class, K background}. It returns the losses and the batch's positive count;
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

Shape legend: N images, R anchors per image, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, nms

# detectron2 starts its running positive count (normalizer "ema") at 100.
EMA_INIT = 100.0


@dataclass(frozen=True)
class OhemSettings:
    """OHEM's selection (type ``ohem``): NMS IoU, anchors kept per image, share of positives
    (None: pure top-loss) and what the kept anchors' loss is divided by."""

    nms: float = 0.7
    batch_size: int = 128
    ratio: Optional[float] = None
    normalizer: Literal["positives", "selected"] = "positives"


@dataclass(frozen=True)
class FocalStarSettings:
    """FL* (type ``focal_star``, appendix A): p_t* = sigmoid(gamma x_t + beta)."""

    gamma: float = 2.0
    beta: float = 1.0


@dataclass(frozen=True)
class LossSettings:
    """Plain settings of ``retinanet_losses`` (``build_model`` fills them from the config)."""

    type: Literal["focal", "ce", "ohem", "focal_star", "quality_focal"] = "focal"
    alpha: Optional[float] = 0.25  # weight of positives; None: no weighting
    gamma: float = 2.0  # focusing parameter of focal, ce and ohem (used as given)
    box_loss: Literal["smooth_l1", "l1", "giou"] = "smooth_l1"
    smooth_l1_beta: float = 0.1
    box_weight: float = 1.0
    normalizer: Literal["batch", "ema", "image"] = "batch"
    ema_momentum: float = 0.9
    ohem: OhemSettings = field(default_factory=OhemSettings)
    focal_star: FocalStarSettings = field(default_factory=FocalStarSettings)


class LossOutput(NamedTuple):
    """What ``retinanet_losses`` returns."""

    losses: dict[str, Tensor]  # "loss_cls", "loss_box": scalars whose sum is trained
    num_pos: Tensor  # () float: positive anchors of the batch (this rank), no gradient
    num_pos_ema: Optional[Tensor]  # () the updated running normaliser (normalizer "ema"), else None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half/bfloat16/fp32 inputs, fp64 for fp64 (torchvision's and fvcore's rule)."""
    return torch.promote_types(x.dtype, torch.float32)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: Optional[float] = 0.25,
                       gamma: float = 2.0, reduction: str = "none") -> Tensor:
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), elementwise over any shape.

    The readable reference of the loss; ``focal_loss_per_image`` is its fused form for training.
    alpha_t = alpha for targets 1 and 1 - alpha for targets 0; ``alpha=None`` turns weighting
    off, and with gamma = 0 the result is exactly binary cross-entropy. log(p_t) comes from
    ``binary_cross_entropy_with_logits`` (log-sum-exp form), so it never underflows. Half and
    bfloat16 inputs are computed in fp32, fp64 stays fp64.
    """
    dtype = _compute_dtype(logits)
    x, t = logits.to(dtype), targets.to(dtype)
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


# Elements per block of the dense focal-loss pass on the CPU: its temporaries then stay in cache
# (reused scratch) instead of being fresh (N, R, K) allocations, each a trip to memory and page
# faults (measured: 2-4x less CPU time than unblocked). Other devices take one block.
CPU_BLOCK = 1 << 20


def _negative_focal_(x: Tensor, gamma: float, row_loss: Tensor, grad: Tensor, weights: Tensor,
                     scratch: Tensor) -> None:
    """Every entry of x (B, K) taken as a negative: ``row_loss`` (B,) = sum over K of p^g
    softplus(x) (-log(1 - p) = softplus(x)), ``grad`` (B, K) = weights (B,) times its derivative
    p^g (g (1 - p) softplus(x) + p). ``scratch`` (4, >= B, K), x's dtype, is reused block after
    block, so the loop allocates nothing."""
    p, sp, pg, t = (buf[: x.shape[0]] for buf in scratch)
    torch.sigmoid(x, out=p)
    # softplus(x) = -log(sigmoid(-x)): sigmoid and log are vectorised, F.softplus (log1p) ~2x
    # slower. sigmoid(-80) is still a normal fp32, and softplus(x) = x above 80.
    torch.sub(x, 80, out=t).clamp_(min=0)
    torch.clamp(x, max=80, out=sp).neg_().sigmoid_().log_().neg_().add_(t)
    torch.mul(p, p, out=pg) if gamma == 2 else torch.pow(p, gamma, out=pg)
    torch.sum(torch.mul(pg, sp, out=t), -1, out=row_loss)
    sp.addcmul_(p, sp, value=-1)  # softplus(x) (1 - p)
    torch.mul(p.add_(sp, alpha=gamma).mul_(pg), weights[:, None], out=grad)


class _FocalLossPerImage(torch.autograd.Function):
    """Forward and gradient of ``focal_loss_per_image`` together: the equation of
    ``sigmoid_focal_loss``, summed, with its derivative written out.

    With x = logits[n, r, c], p = sigmoid(x), t = [c == gt_classes[n, r]] and w = weights[n, r]:

        loss[n] = sum_{r, c} w alpha_t (1 - p_t)^g (-log p_t)      (= sigmoid_focal_loss(x, t))
        t = 0:  alpha_t (1 - p_t)^g (-log p_t) = (1 - alpha) p^g softplus(x)
                d/dx = (1 - alpha) p^g (g (1 - p) softplus(x) + p)
        t = 1:  alpha_t (1 - p_t)^g (-log p_t) = alpha (1 - p)^g softplus(-x)
                d/dx = -alpha (1 - p)^g (g p softplus(-x) + 1 - p)

    (alpha None: both alpha factors are 1.) Autograd through the elementwise expression keeps
    about ten (N, R, K) intermediates; here the gradient is computed with the loss and is the
    only (N, R, K) tensor made. Every entry is first taken as a negative (in cache-sized blocks
    on the CPU), then the N * R foreground entries are corrected by a gather and a scatter, so
    the one-hot target is never built. Computed in the promoted dtype of logits and fp32.
    ``tests/test_hot_path.py`` holds it equal to ``sigmoid_focal_loss``, values and gradients.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, gt_classes: Tensor, weights: Tensor, alpha: Optional[float],
                gamma: float, fg_targets: Optional[Tensor]) -> Tensor:
        n, r, k = logits.shape
        dtype = _compute_dtype(logits)
        a_pos, a_neg = (alpha, 1 - alpha) if alpha is not None else (1.0, 1.0)
        rows = logits.reshape(n * r, k)  # (N*R, K)
        w_neg = a_neg * weights  # (N, R)
        w_rows = w_neg.reshape(n * r)  # (N*R,)
        grad = torch.empty_like(rows)  # (N*R, K), logits' dtype
        row_loss = rows.new_empty(n * r, dtype=dtype)  # (N*R,)
        step = min(max(1, CPU_BLOCK // k), n * r) if logits.device.type == "cpu" else n * r
        scratch = rows.new_empty((4, step, k), dtype=dtype)  # reused by every block
        for i in range(0, n * r, step):  # cache blocking (memory, not per-anchor logic)
            j = min(i + step, n * r)
            _negative_focal_(rows[i:j].to(dtype), gamma, row_loss[i:j], grad[i:j], w_rows[i:j],
                             scratch)
        per_image = (row_loss.view(n, r) * w_neg).sum(-1)  # (N,)
        # Foreground entries (n, r, gt_classes[n, r]): replace the negative term by the positive.
        fg = (gt_classes >= 0) & (gt_classes < k)  # (N, R); -1 ignored, K background
        idx = gt_classes.clamp(0, k - 1)[..., None]  # (N, R, 1), in range for the gather
        xc = logits.gather(-1, idx).to(dtype)  # (N, R, 1)
        pc, qc = torch.sigmoid(xc), torch.sigmoid(-xc)  # p, 1 - p without cancellation
        spn, spp = F.softplus(xc), F.softplus(-xc)  # -log(1 - p), -log(p)
        wf = (weights * fg)[..., None]  # (N, R, 1)
        neg_w = a_neg * pc.pow(gamma)  # alpha_t (1 - p_t)^g of a negative
        neg_loss, neg_grad = neg_w * spn, neg_w * (gamma * qc * spn + pc)
        if fg_targets is None:  # t = 1
            pos_w = a_pos * qc.pow(gamma)
            pos_loss, pos_grad = pos_w * spp, -pos_w * (gamma * pc * spp + qc)
        else:  # soft t = y: alpha |y - p|^g BCE(x, y), BCE = y softplus(-x) + (1 - y) softplus(x)
            y = fg_targets.to(dtype)[..., None]  # (N, R, 1)
            diff = pc - y
            bce = y * spp + (1 - y) * spn
            # d/dx: g |p - y|^(g-1) sign(p - y) p (1 - p) BCE + |p - y|^g (p - y)
            mod = diff.abs().pow(gamma)
            # |p - y|^(g-1) is infinite at p = y for g < 1, where the derivative's limit is 0
            slope = torch.where(diff == 0, 0.0, diff.sign() * diff.abs().pow(gamma - 1))
            dmod = gamma * slope * pc * qc if gamma != 0 else 0
            pos_loss = a_pos * mod * bce
            pos_grad = a_pos * (dmod * bce + mod * diff)
        per_image = per_image + ((pos_loss - neg_loss) * wf).sum((1, 2))
        grad = grad.view(n, r, k)
        grad.scatter_add_(-1, idx, ((pos_grad - neg_grad) * wf).to(grad.dtype))
        ctx.save_for_backward(grad)
        return per_image

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        # In place: the saved gradient is used once (a second backward finds it modified and
        # autograd raises), which spares another (N, R, K) allocation.
        return grad.mul_(grad_out.to(grad.dtype)[:, None, None]), None, None, None, None, None


def focal_loss_per_image(logits: Tensor, gt_classes: Tensor, weights: Tensor,
                         alpha: Optional[float] = 0.25, gamma: float = 2.0,
                         fg_targets: Optional[Tensor] = None) -> Tensor:
    """Per-image sums of weighted sigmoid focal loss against one-hot targets, fused.

    Equals ``(sigmoid_focal_loss(logits, onehot(gt_classes), alpha, gamma).sum(-1) * weights)
    .sum(-1)`` (equation in ``_FocalLossPerImage``), ``onehot`` all zeros for class -1 (ignored)
    and K (background), for logits (N, R, K), gt_classes (N, R) int64 in -1..K and weights
    (N, R) (e.g. 0 for ignored anchors); returns (N,) in fp32 (fp64 for fp64 logits), the
    gradient in the logits' dtype. Used for ``type`` focal and ce; gamma = 0 with alpha None is BCE.
    ``fg_targets`` (N, R) in [0, 1]: the foreground entries' soft targets instead of 1 (type
    quality_focal; then it equals ``quality_focal_loss`` against ``onehot * fg_targets``).
    """
    return _FocalLossPerImage.apply(logits, gt_classes, weights.to(_compute_dtype(logits)), alpha,
                                    gamma, fg_targets)


def quality_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """QFL(p) = -|y - p|^gamma ((1 - y) log(1 - p) + y log(p)), elementwise (GFL, Li et al. 2020,
    Eq. 5; its beta is ``gamma``): the focal loss against a soft target y in [0, 1], the IoU of
    the predicted box for a positive, 0 for a negative, with no alpha weighting. With y in {0, 1}
    it is exactly ``sigmoid_focal_loss`` with alpha None. The readable reference of
    ``focal_loss_per_image(..., alpha=None, fg_targets=y)``. Half inputs are computed in fp32,
    fp64 stays fp64.
    """
    dtype = _compute_dtype(logits)
    x, t = logits.to(dtype), targets.to(dtype)
    return F.binary_cross_entropy_with_logits(x, t, reduction="none") * (torch.sigmoid(x) - t).abs().pow(gamma)


def pairwise_matched_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(P,) IoU of boxes1[i] with boxes2[i], both (P, 4) XYXY. torchvision.ops.box_iou gives the
    P x P matrix; only its diagonal is needed here."""
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])  # (P, 2)
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])  # (P, 2)
    inter = (rb - lt).clamp(min=0).prod(-1)  # (P,)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(inter.dtype).eps)


def decode_foreground(pred_deltas: Tensor, gt_deltas: Tensor, fg: Tensor, anchors: Tensor,
                      decode: Callable[[Tensor, Tensor], Tensor]
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The P foreground anchors' image and anchor indices (P,), (P,) and their predicted and
    ground-truth boxes (P, 4), both decoded from their deltas on the anchor (``decode``: the
    model's box coder; it keeps fp64 and lifts half to fp32)."""
    n, r = fg.nonzero(as_tuple=True)  # (P,), (P,)
    dtype = _compute_dtype(pred_deltas)
    a = anchors[r].to(dtype)  # (P, 4)
    return n, r, decode(pred_deltas[n, r].to(dtype), a), decode(gt_deltas[n, r].to(dtype), a)


def iou_targets(pred_deltas: Tensor, gt_deltas: Tensor, fg: Tensor, anchors: Tensor,
                decode: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """(N, R) IoU of each foreground anchor's predicted box with its ground-truth box (0 for the
    other anchors), no gradient: the classification target of ``quality_focal``. fp32."""
    n, r, pred, gt = decode_foreground(pred_deltas.detach(), gt_deltas, fg, anchors, decode)
    out = torch.zeros(fg.shape, dtype=pred.dtype, device=fg.device)  # (N, R)
    out[n, r] = pairwise_matched_iou(pred, gt)
    return out


def focal_star_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, beta: float = 1.0,
                    alpha: Optional[float] = None) -> Tensor:
    """FL* = -log(p_t*) / gamma, p_t* = sigmoid(gamma x_t + beta) (appendix A, Eq. 6-7), elementwise.

    x_t = x for targets 1 and -x for targets 0. -log(sigmoid(z)) = softplus(-z), which never
    overflows. ``alpha`` weights like FL (alpha for targets 1, 1 - alpha for 0); None: off.
    Half inputs are computed in fp32, fp64 stays fp64.
    """
    dtype = _compute_dtype(logits)
    x, t = logits.to(dtype), targets.to(dtype)
    x_t = x * (2 * t - 1)  # y x with y in {+1, -1}
    loss = F.softplus(-(gamma * x_t + beta)) / gamma
    if alpha is not None:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss


def ohem_select(loss: Tensor, boxes: Tensor, fg: Tensor, valid: Tensor, batch_size: int,
                nms_thresh: float, ratio: Optional[float] = None) -> Tensor:
    """Indices of the anchors OHEM trains on in one image (Sec. 5.1, Table 1d).

    loss (R,) per-anchor loss; boxes (R, 4) XYXY anchor boxes; fg, valid (R,) bool. Valid
    anchors are ranked by loss, NMS at ``nms_thresh`` drops an anchor that overlaps a
    higher-loss one (OHEM's NMS runs on the RoIs, whose analogue here is the anchor), and the
    ``batch_size`` highest-loss survivors are kept. With ``ratio`` r (SSD's 1:3 is r = 0.25)
    positives and negatives are taken separately from the survivors, each by loss: up to
    floor(r B) positives, then negatives up to B minus those and up to (1 - r) / r times the
    positives kept, so the minibatch holds r : (1 - r) (an image with no positive keeps nothing).

    Greedy NMS keeps a box only by looking at higher-loss boxes, so NMS over the top-m prefix of
    the ranking gives exactly the survivors within it; the prefix grows x4 until it holds enough
    survivors, which avoids an R x R NMS on big images. Returns selected indices (S,), S <= B,
    positives first when ``ratio`` is set, each part in decreasing loss. Unlike the other losses
    this waits on the device once or more per image (NMS output sizes): a baseline, not a default.
    """
    cand = valid.nonzero().squeeze(1)  # (V,)
    order = cand[torch.argsort(loss[cand], descending=True, stable=True)]  # (V,) by loss
    num_fg_quota = int(ratio * batch_size) if ratio is not None else 0
    m = min(len(order), 8 * batch_size)
    while True:
        prefix = order[:m]
        kept = prefix[nms(boxes[prefix].float(), loss[prefix].float(), nms_thresh)]  # by loss
        fg_kept, bg_kept = kept[fg[kept]], kept[~fg[kept]]
        if ratio is None:
            enough = len(kept) >= batch_size
        else:
            enough = len(fg_kept) >= num_fg_quota and len(bg_kept) >= batch_size - num_fg_quota
        if enough or m == len(order):
            break
        m = min(len(order), 4 * m)
    if ratio is None:
        return kept[:batch_size]
    num_fg = min(len(fg_kept), num_fg_quota)
    num_bg = min(len(bg_kept), batch_size - num_fg, int(num_fg * (1 - ratio) / ratio + 1e-6))
    return torch.cat([fg_kept[:num_fg], bg_kept[:num_bg]])


def ohem_selected(cls_per_anchor: Tensor, fg: Tensor, valid: Tensor, anchors: Optional[Tensor],
                  ohem: OhemSettings) -> Tensor:
    """(N, R) bool: the anchors ``ohem_select`` keeps in each image; cls_per_anchor, fg, valid
    (N, R), anchors (R, 4) XYXY."""
    if anchors is None:
        raise ValueError("loss.type=ohem needs the anchors (R, 4) for its NMS")
    scores = cls_per_anchor.detach()  # (N, R): selection is not differentiated
    selected = torch.zeros_like(valid)  # (N, R) bool
    for i in range(cls_per_anchor.shape[0]):  # per image: NMS and the quota are per image
        keep = ohem_select(scores[i], anchors, fg[i], valid[i], ohem.batch_size, ohem.nms, ohem.ratio)
        selected[i, keep] = True
    return selected


def box_regression_loss(pred: Tensor, target: Tensor, kind: str, beta: float) -> Tensor:
    """Elementwise smooth L1 (beta) or L1 loss, shape of ``pred``; fp32 (fp64 stays fp64)."""
    dtype = _compute_dtype(pred)
    pred, target = pred.to(dtype), target.to(dtype)
    if kind == "l1" or beta == 0:
        return (pred - target).abs()
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="none")


def giou_loss_per_image(pred_deltas: Tensor, gt_deltas: Tensor, fg: Tensor, anchors: Tensor,
                        decode: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """(N,) summed ``1 - GIoU`` (torchvision.ops.generalized_box_iou_loss) of each image's
    foreground anchors (``decode_foreground``). fp32 (fp64 stays fp64)."""
    n, _, pred, gt = decode_foreground(pred_deltas, gt_deltas, fg, anchors, decode)  # (P, 4) each
    loss = generalized_box_iou_loss(pred, gt, reduction="none")  # (P,)
    return torch.zeros(fg.shape[0], dtype=loss.dtype, device=loss.device).index_add_(0, n, loss)


def _mean_over_ranks(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def _cls_loss_per_image(pred_logits: Tensor, gt_classes: Tensor, valid: Tensor, fg: Tensor,
                        s: LossSettings, anchors: Optional[Tensor],
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
                     settings: LossSettings = LossSettings(), anchors: Optional[Tensor] = None,
                     num_pos_ema: Optional[Tensor] = None,
                     decode: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> LossOutput:
    """Classification + box loss of a batch, one call for the whole batch.

    Args:
        pred_logits: (N, R, K) class logits; pred_deltas: (N, R, 4) box deltas.
        gt_classes: (N, R) int64, -1 ignored anchor, 0..K-1 its box's class, K background.
        gt_deltas: (N, R, 4) encoded boxes the foreground anchors regress to (others unread).
        settings: the loss type and its plain settings.
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
