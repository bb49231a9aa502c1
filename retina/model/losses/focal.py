"""Sigmoid focal loss (Sec. 3.2) and its variants, elementwise and fused.

``sigmoid_focal_loss`` is the readable reference of FL; ``focal_loss_per_image`` its fused form
for training (forward and gradient written out, one (N, R, K) tensor kept), which also computes
QFL with soft foreground targets; ``quality_focal_loss`` (QFL) and ``focal_star_loss`` (FL*,
appendix A) are the variants' references. ``tests/test_hot_path.py`` holds the fused form equal to
the references, values and gradients. Losses are computed in fp32 whatever the input's precision
(fp64 stays fp64): ``compute_dtype``.

Shape legend: N images, R anchors per image, K classes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from retina.model.blocking import block_rows


def compute_dtype(x: Tensor) -> torch.dtype:
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
    dtype = compute_dtype(logits)
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
        dtype = compute_dtype(logits)
        a_pos, a_neg = (alpha, 1 - alpha) if alpha is not None else (1.0, 1.0)
        rows = logits.reshape(n * r, k)  # (N*R, K)
        w_neg = a_neg * weights  # (N, R)
        w_rows = w_neg.reshape(n * r)  # (N*R,)
        grad = torch.empty_like(rows)  # (N*R, K), logits' dtype
        row_loss = rows.new_empty(n * r, dtype=dtype)  # (N*R,)
        step = block_rows(n * r, k, logits.device)  # (N*R, K) in cache-sized blocks on the CPU
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
    return _FocalLossPerImage.apply(logits, gt_classes, weights.to(compute_dtype(logits)), alpha,
                                    gamma, fg_targets)


def quality_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """QFL(p) = -|y - p|^gamma ((1 - y) log(1 - p) + y log(p)), elementwise (GFL, Li et al. 2020,
    Eq. 5; its beta is ``gamma``): the focal loss against a soft target y in [0, 1], the IoU of
    the predicted box for a positive, 0 for a negative, with no alpha weighting. With y in {0, 1}
    it is exactly ``sigmoid_focal_loss`` with alpha None. The readable reference of
    ``focal_loss_per_image(..., alpha=None, fg_targets=y)``. Half inputs are computed in fp32,
    fp64 stays fp64.
    """
    dtype = compute_dtype(logits)
    x, t = logits.to(dtype), targets.to(dtype)
    return F.binary_cross_entropy_with_logits(x, t, reduction="none") * (torch.sigmoid(x) - t).abs().pow(gamma)


def focal_star_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, beta: float = 1.0,
                    alpha: Optional[float] = None) -> Tensor:
    """FL* = -log(p_t*) / gamma, p_t* = sigmoid(gamma x_t + beta) (appendix A, Eq. 6-7), elementwise.

    x_t = x for targets 1 and -x for targets 0. -log(sigmoid(z)) = softplus(-z), which never
    overflows. ``alpha`` weights like FL (alpha for targets 1, 1 - alpha for 0); None: off.
    Half inputs are computed in fp32, fp64 stays fp64.
    """
    dtype = compute_dtype(logits)
    x, t = logits.to(dtype), targets.to(dtype)
    x_t = x * (2 * t - 1)  # y x with y in {+1, -1}
    loss = F.softplus(-(gamma * x_t + beta)) / gamma
    if alpha is not None:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss
