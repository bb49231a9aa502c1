"""The fast paths: the fused focal loss (losses/focal.py), the cache-blocked matcher
(matcher.py) and the two-stage top-k (postprocess.py) give the results of the plain expressions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from torchvision.ops import box_iou

import retina.model.blocking as blocking
from retina.config.schema import LossConfig
from retina.model.box_coder import BoxCoder
from retina.model.losses import retinanet_losses
from retina.model.losses.focal import focal_loss_per_image, quality_focal_loss, sigmoid_focal_loss
from retina.model.matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher
from retina.model.postprocess import PostProcessor


def reference_per_image(logits, gt_classes, weights, alpha, gamma):
    """The plain expression: one-hot targets (class -1 and K hit nothing), the readable
    ``sigmoid_focal_loss`` elementwise, weighted sums."""
    onehot = gt_classes[..., None] == torch.arange(logits.shape[-1])  # (N, R, K)
    return (sigmoid_focal_loss(logits, onehot, alpha, gamma).sum(-1) * weights).sum(-1)


# --------------------------------------------------------------------------- fused focal loss
def test_fused_focal_hand_values():
    # One anchor, K = 2, logits 0 -> p = 0.5; class 0 is foreground, class 1 a negative.
    x = torch.zeros(1, 1, 2, requires_grad=True)
    loss = focal_loss_per_image(x, torch.tensor([[0]]), torch.ones(1, 1), alpha=0.25, gamma=2.0)
    ln2 = math.log(2)
    # positive: 0.25 (1 - 0.5)^2 (-log 0.5); negative: 0.75 * 0.5^2 * (-log 0.5)
    assert_close(loss, torch.tensor([0.25 * 0.25 * ln2 + 0.75 * 0.25 * ln2]))
    (grad,) = torch.autograd.grad(loss.sum(), x)
    # d/dx: positive -a (1-p)^g (g p log2 + 1 - p); negative (1-a) p^g (g (1-p) log2 + p)
    assert_close(grad, torch.tensor([[[-0.25 * 0.25 * (ln2 + 0.5), 0.75 * 0.25 * (ln2 + 0.5)]]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.25, 0.0), (0.5, 1.5), (None, 2.0)])
@pytest.mark.parametrize("block", [64, 1 << 20])  # many ragged blocks; one block
def test_fused_focal_equals_sigmoid_focal_loss_values_and_gradients(monkeypatch, alpha, gamma, block,
                                                                     dtype):
    # The fused kernel that trains (_FocalLossPerImage) and the readable sigmoid_focal_loss are
    # one equation: equal on random logits with ignored (-1), background (K) and foreground
    # anchors, values and gradients, in fp32 and fp64 (the fused path computes in fp64 then).
    monkeypatch.setattr(blocking, "CPU_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 40, 7, generator=g, dtype=dtype) * 5).requires_grad_()
    with torch.no_grad():
        x[0, 0, 0], x[0, 1, 1], x[1, 2, 3] = 120.0, -120.0, 85.0  # softplus past 80, no overflow
    gt_classes = torch.randint(-1, 8, (3, 40), generator=g)  # -1 ignored, 7 = K background
    gt_classes[0, 0], gt_classes[0, 1] = 7, 1  # a confident wrong negative and a hopeless positive
    gt_classes[2, :3] = torch.tensor([-1, 7, 4])  # each kind present whatever the draw
    # weights as the loss sets them: 0 on ignored anchors; other anchors random weights in [0, 2)
    weights = torch.where(gt_classes >= 0, 2 * torch.rand(3, 40, generator=g, dtype=dtype), 0.0)
    out = focal_loss_per_image(x, gt_classes, weights, alpha, gamma)
    ref = reference_per_image(x, gt_classes, weights, alpha, gamma)
    assert out.dtype == ref.dtype == dtype
    assert torch.isfinite(out).all()
    assert_close(out, ref)  # dtype-specific tolerances: fp64 is held to ~1e-7
    upstream = torch.tensor([0.5, 1.0, 2.0], dtype=dtype)
    (g_out,) = torch.autograd.grad(out, x, upstream)
    (g_ref,) = torch.autograd.grad(ref, x, upstream)
    assert g_out.dtype == dtype
    assert_close(g_out, g_ref)


def test_fused_focal_bf16_gives_bf16_gradient_and_fp32_loss():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 30, 5, generator=g) * 3).bfloat16().requires_grad_()
    classes = torch.randint(0, 6, (2, 30), generator=g)
    weights = torch.ones(2, 30)
    out = focal_loss_per_image(x, classes, weights)
    assert out.dtype == torch.float32
    assert_close(out, reference_per_image(x.float(), classes, weights, 0.25, 2.0))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.dtype == torch.bfloat16


def test_fused_focal_second_backward_raises():
    # The saved gradient is scaled in place by the first backward; autograd must refuse a second.
    x = torch.randn(1, 4, 3, requires_grad=True)
    out = focal_loss_per_image(x, torch.tensor([[0, 3, 3, 1]]), torch.ones(1, 4)).sum()
    torch.autograd.grad(out, x, retain_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out, x)


@pytest.mark.parametrize("normalizer", ["batch", "image"])
def test_retinanet_loss_focal_path_equals_plain_expression(normalizer):
    g = torch.Generator().manual_seed(2)
    n, r, k = 2, 30, 4
    logits = torch.randn(n, r, k, generator=g, requires_grad=True)
    gt_classes = torch.randint(-1, k + 1, (n, r), generator=g)  # -1 ignored, 0..K-1 fg, K bg
    settings = LossConfig(type="focal", normalizer=normalizer)
    out = retinanet_losses(logits, torch.zeros(n, r, 4), gt_classes, torch.zeros(n, r, 4),
                           settings).losses["loss_cls"]
    per_image = reference_per_image(logits, gt_classes, (gt_classes >= 0).float(), 0.25, 2.0)
    pos = ((gt_classes >= 0) & (gt_classes < k)).sum(-1).float()  # (N,)
    ref = per_image.sum() / pos.sum().clamp(min=1) if normalizer == "batch" else \
        (per_image / pos.clamp(min=1)).mean()
    assert_close(out, ref)
    assert_close(torch.autograd.grad(out, logits)[0], torch.autograd.grad(ref, logits)[0])


# ------------------------------------------------------------------------------------ matcher
def plain_match(gt, valid, anchors, crowd, fg=0.5, bg=0.4, low_quality=True):
    """The matcher as one dense expression over (N, M, R), masking with -1."""
    n, m, _ = gt.shape
    iou = box_iou(gt.reshape(-1, 4), anchors).view(n, m, -1)
    real = valid & ~crowd
    iou_real = iou.masked_fill(~real[..., None], -1.0)
    best, idx = iou_real.max(dim=1)
    labels = torch.full(best.shape, IGNORE, dtype=torch.int8)
    labels[best < bg] = BACKGROUND
    labels[best >= fg] = FOREGROUND
    if low_quality:
        best_gt = iou_real.max(dim=2, keepdim=True).values
        labels[((iou_real == best_gt) & real[..., None] & (best_gt > 0)).any(dim=1)] = FOREGROUND
    crowd_iou = iou.masked_fill(~(valid & crowd)[..., None], -1.0).max(dim=1).values
    labels[(labels == BACKGROUND) & (crowd_iou >= bg)] = IGNORE
    return idx, labels


@pytest.mark.parametrize("block", [1, 37, 1 << 30])
def test_blocked_matcher_equals_dense_expression(monkeypatch, block):
    monkeypatch.setattr(blocking, "CPU_BLOCK", block)
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        n, m, r = 2, 5, 30
        # coordinates on a 4 px grid: many exact ties between anchors and between boxes
        xy = torch.randint(0, 8, (n, m, 2), generator=g).float() * 4
        gt = torch.cat([xy, xy + 4 + torch.randint(0, 8, (n, m, 2), generator=g) * 4], -1)
        valid = torch.rand(n, m, generator=g) > 0.3
        crowd = (torch.rand(n, m, generator=g) > 0.7) & valid
        axy = torch.randint(0, 8, (r, 2), generator=g).float() * 4
        anchors = torch.cat([axy, axy + 4 + torch.randint(0, 8, (r, 2), generator=g) * 4], -1)
        for kw, ref_kw in [({}, {}), ({"allow_low_quality": False}, {"low_quality": False})]:
            idx, labels = Matcher(**kw)(gt, valid, anchors, crowd)
            ref_idx, ref_labels = plain_match(gt, valid, anchors, crowd, **ref_kw)
            assert torch.equal(labels, ref_labels)
            assert torch.equal(idx, ref_idx)


# ----------------------------------------------------------------------------- post-processing
def test_two_stage_topk_keeps_the_top_pairs_not_the_top_anchors():
    # One level of 4 anchors far apart (no NMS between them), K = 3, 2 candidates kept.
    # The two best (anchor, class) pairs are both in anchor 2: logits 3 and 2.5. Keeping the
    # best class of each of the top-2 anchors would give anchor 3 (logit 2.0) instead.
    logits = torch.tensor([[[-9.0, -9.0, -9.0], [1.0, -9.0, -9.0], [3.0, 2.5, -9.0],
                            [-9.0, -9.0, 2.0]]])  # (1, 4, 3)
    anchors = torch.tensor([[0.0, 0, 10, 10], [100, 0, 110, 10], [0, 100, 10, 110],
                            [100, 100, 110, 110]])
    post = PostProcessor(BoxCoder(), score_thresh=0.05, topk_candidates=2, nms_thresh=0.5)
    (det,) = post(logits, torch.zeros(1, 4, 4), anchors, [4], [(200, 200)])
    assert det["labels"].tolist() == [0, 1]  # both from anchor 2, different classes
    assert_close(det["scores"], torch.sigmoid(torch.tensor([3.0, 2.5])))
    assert_close(det["boxes"], anchors[[2, 2]])  # zero deltas decode to the anchor


# ------------------------------------------------------------- quality focal loss (soft targets)
def test_fused_quality_focal_hand_values():
    # One anchor, K = 2, logits 0 -> p = 0.5; class 0 is foreground with IoU target y = 0.25,
    # class 1 a negative; alpha None, gamma 2. BCE(0, y) = log 2 whatever y.
    x = torch.zeros(1, 1, 2, requires_grad=True)
    loss = focal_loss_per_image(x, torch.tensor([[0]]), torch.ones(1, 1), alpha=None, gamma=2.0,
                                fg_targets=torch.tensor([[0.25]]))
    ln2 = math.log(2)
    # positive: |0.25 - 0.5|^2 log 2; negative: 0.5^2 log 2
    assert_close(loss, torch.tensor([0.0625 * ln2 + 0.25 * ln2]))
    (grad,) = torch.autograd.grad(loss.sum(), x)
    # positive d/dx: 2 (p - y) p (1 - p) log 2 + (p - y)^2 (p - y) = 2 * .25 * .25 ln2 + .25^3;
    # negative as in FL: p^2 (2 (1 - p) log 2 + p)
    assert_close(grad, torch.tensor([[[0.125 * ln2 + 0.015625, 0.25 * (ln2 + 0.5)]]]))
    # at y = p the positive term and its gradient vanish
    y_half = focal_loss_per_image(x, torch.tensor([[0]]), torch.ones(1, 1), None, 2.0,
                                  fg_targets=torch.tensor([[0.5]]))
    assert_close(y_half, torch.tensor([0.25 * ln2]))
    # gamma < 1: |p - y|^(gamma - 1) is infinite at p = y, the derivative's limit 0 (no NaN)
    x1 = torch.zeros(1, 1, 1, requires_grad=True)
    at_y = focal_loss_per_image(x1, torch.tensor([[0]]), torch.ones(1, 1), None, 0.5,
                                fg_targets=torch.tensor([[0.5]]))
    (grad,) = torch.autograd.grad(at_y.sum(), x1)
    assert at_y.item() == 0 and grad.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [2.0, 1.5, 0.5, 0.0])
def test_fused_quality_focal_equals_quality_focal_loss(dtype, gamma):
    # The fused kernel with soft foreground targets and the readable QFL are one equation:
    # values and gradients on random logits, IoU targets in [0, 1] (0 and 1 included).
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 30, 5, generator=g, dtype=dtype) * 4).requires_grad_()
    gt_classes = torch.randint(-1, 6, (2, 30), generator=g)  # -1 ignored, 5 = K background
    y = torch.rand(2, 30, generator=g, dtype=dtype)
    y[0, :2] = torch.tensor([0.0, 1.0], dtype=dtype)
    gt_classes[0, :2] = torch.tensor([2, 3])
    weights = (gt_classes >= 0).to(dtype)
    out = focal_loss_per_image(x, gt_classes, weights, None, gamma, fg_targets=y)
    onehot = gt_classes[..., None] == torch.arange(5)  # (N, R, K)
    ref = (quality_focal_loss(x, onehot * y[..., None], gamma).sum(-1) * weights).sum(-1)
    assert_close(out, ref)
    (g_out,) = torch.autograd.grad(out, x, torch.tensor([1.0, 2.0], dtype=dtype))
    (g_ref,) = torch.autograd.grad(ref, x, torch.tensor([1.0, 2.0], dtype=dtype))
    assert_close(g_out, g_ref)
    # y in {0, 1}: QFL is FL without alpha
    t = onehot.to(dtype)
    assert_close(quality_focal_loss(x, t, gamma), sigmoid_focal_loss(x, t, None, gamma))
