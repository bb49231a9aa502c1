"""Tests for retina.model.losses: sigmoid focal loss (hand values, BCE laws, torchvision parity, dtypes)
and ``retinanet_losses`` on plain tensors: normalisation (batch, image, ema), the positive count,
ignored anchors, empty images, ce type; the model's ema buffer and its old checkpoint key."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import retina.model.losses as losses_module
from retina.config.schema import LossConfig
from retina.model.losses import EMA_INIT, retinanet_losses
from retina.model.losses.box import box_regression_loss
from retina.model.losses.focal import focal_star_loss, sigmoid_focal_loss

LOG2 = math.log(2.0)
K = 2


# ------------------------------------------------------------------------- sigmoid_focal_loss
@pytest.mark.parametrize(
    "logit, target, alpha, gamma, expected",
    [
        # p = sigmoid(0) = 0.5, p_t = 0.5, -log p_t = log 2, (1 - p_t)^2 = 0.25, alpha_t = 0.25
        (0.0, 1.0, 0.25, 2.0, 0.25 * 0.25 * LOG2),
        # target 0: alpha_t = 1 - 0.25 = 0.75
        (0.0, 0.0, 0.25, 2.0, 0.75 * 0.25 * LOG2),
        # p = sigmoid(log 3) = 3 / 4; target 1: p_t = 3/4, (1/4)^2 = 1/16, -log(3/4)
        (math.log(3.0), 1.0, 0.25, 2.0, 0.25 / 16 * math.log(4 / 3)),
        # target 0: p_t = 1/4, (3/4)^2 = 9/16, -log(1/4) = log 4, alpha_t = 0.75
        (math.log(3.0), 0.0, 0.25, 2.0, 0.75 * 9 / 16 * math.log(4.0)),
        # alpha None: no weighting; gamma 1: (1 - p_t)^1 = 1/4
        (math.log(3.0), 1.0, None, 1.0, 0.25 * math.log(4 / 3)),
        # gamma 0, alpha None: BCE = log 2 at p = 0.5
        (0.0, 1.0, None, 0.0, LOG2),
    ],
)
def test_focal_hand_values(logit, target, alpha, gamma, expected):
    out = sigmoid_focal_loss(torch.tensor([logit]), torch.tensor([target]), alpha, gamma)
    assert_close(out, torch.tensor([expected]))


def test_focal_large_logits_finite():
    x = torch.tensor([100.0, -100.0, 100.0, -100.0])
    t = torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = sigmoid_focal_loss(x, t)
    # right and confident: ~0; wrong and confident: -log p_t = 100, (1 - p_t)^2 = 1,
    # times alpha_t 0.75 (target 0) or 0.25 (target 1)
    assert_close(out, torch.tensor([0.0, 0.0, 75.0, 25.0]))
    for dtype in (torch.float16, torch.bfloat16):
        xr = x.to(dtype).requires_grad_()
        loss = sigmoid_focal_loss(xr, t, reduction="sum")
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_focal_low_precision_logits_give_fp32(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, generator=g) * 4).to(dtype)
    t = (torch.rand(64, generator=g) < 0.3).to(dtype)
    out = sigmoid_focal_loss(x, t)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # same as computing the (already rounded) inputs in fp32
    assert_close(out, sigmoid_focal_loss(x.float(), t.float()), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_matches_torchvision(reduction):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=g) * 3
    t = (torch.rand(5, 7, generator=g) < 0.4).float()
    for alpha, gamma in [(0.25, 2.0), (0.5, 0.0), (0.75, 1.5)]:
        ours = sigmoid_focal_loss(x, t, alpha, gamma, reduction)
        ref = torchvision.ops.sigmoid_focal_loss(x, t, alpha, gamma, reduction)
        assert_close(ours, ref)
    # alpha None == torchvision's alpha < 0 (no weighting)
    assert_close(sigmoid_focal_loss(x, t, None, 2.0, reduction),
                 torchvision.ops.sigmoid_focal_loss(x, t, -1, 2.0, reduction))


def test_focal_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(torch.zeros(1), torch.zeros(1), reduction="avg")


logits_st = st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=1, max_size=16)


@settings(max_examples=50, deadline=None)
@given(logits=logits_st, data=st.data())
def test_focal_gamma0_no_alpha_is_bce(logits, data):
    x = torch.tensor(logits)
    t = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=len(logits),
                                        max_size=len(logits))))
    assert_close(sigmoid_focal_loss(x, t, alpha=None, gamma=0.0),
                 F.binary_cross_entropy_with_logits(x, t, reduction="none"))


@settings(max_examples=50, deadline=None)
@given(logits=logits_st, data=st.data(), alpha=st.floats(0.0, 1.0), gamma=st.floats(0.0, 5.0))
def test_focal_ratio_to_bce(logits, data, alpha, gamma):
    # FL = alpha_t (1 - p_t)^gamma * BCE, with the factor computed independently in fp64
    x = torch.tensor(logits)
    t = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=len(logits),
                                        max_size=len(logits))))
    p = torch.sigmoid(x.double())
    p_t = torch.where(t == 1, p, 1 - p)
    alpha_t = torch.where(t == 1, alpha, 1 - alpha)
    bce = F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction="none")
    expected = (alpha_t * (1 - p_t) ** gamma * bce).float()
    assert_close(sigmoid_focal_loss(x, t, alpha, gamma), expected, rtol=1e-4, atol=1e-6)


def test_box_regression_loss_hand_values():
    pred, target = torch.tensor([0.05, 0.0, 0.2, -0.2]), torch.zeros(4)
    # smooth L1, beta 0.1: |x| < beta -> 0.5 x^2 / beta = 0.5 * 0.0025 / 0.1 = 0.0125;
    # else |x| - beta / 2 = 0.2 - 0.05 = 0.15
    assert_close(box_regression_loss(pred, target, "smooth_l1", 0.1),
                 torch.tensor([0.0125, 0.0, 0.15, 0.15]))
    assert_close(box_regression_loss(pred, target, "l1", 0.1), torch.tensor([0.05, 0.0, 0.2, 0.2]))
    # beta 0 is L1
    assert_close(box_regression_loss(pred, target, "smooth_l1", 0.0), torch.tensor([0.05, 0.0, 0.2, 0.2]))


# --------------------------------------------------------------------------- retinanet_losses
def test_losses_import_no_config_assigner_or_matcher():
    # The loss is a function of tensors: at run time its modules import only each other and the
    # box helpers, no config class (the settings' type, LossConfig, is named for the checker
    # only), no assigner or matcher constants.
    allowed = ("retina.model.losses", "retina.model.boxes", "retina.model.blocking")
    package = Path(losses_module.__file__).parent
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        checked_only = [n for n in tree.body
                        if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]
        hidden = {id(m) for block in checked_only for m in ast.walk(block)}
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and id(n) not in hidden]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        retina = [m for m in imported if m and m.startswith("retina")]
        assert all(m.startswith(allowed) for m in retina), (path.name, retina)
    assert (package / "focal.py").exists() and (package / "ohem.py").exists()


def run(logits, deltas, gt_classes, gt_deltas=None, num_pos_ema=None, **settings):
    """retinanet_losses with gt_classes given as nested lists (-1 ignored, K background)."""
    gt_classes = torch.tensor(gt_classes, dtype=torch.int64)
    if gt_deltas is None:
        gt_deltas = torch.zeros(*gt_classes.shape, 4)
    return retinanet_losses(logits, deltas, gt_classes, gt_deltas, LossConfig(**settings),
                            num_pos_ema=num_pos_ema)


# image 0: anchor 0 fg class 1, anchor 1 background (K), anchor 2 ignored (-1)
IMG0 = [1, K, -1]
# image 1: anchors 0, 1 fg (classes 0, 1), anchor 2 background
IMG1 = [0, 1, K]
# With logits 0 and focal (alpha .25, gamma 2): a target-1 entry costs 0.25 * 0.25 * log 2
# = log2 / 16, a target-0 entry 0.75 * 0.25 * log 2 = 3 log2 / 16. Per anchor (K = 2):
# fg = 1/16 + 3/16 = 4/16 log 2; bg = 6/16 log 2. Image 0: 4/16 + 6/16 = 10/16 log 2 (1 positive);
# image 1: 4/16 + 4/16 + 6/16 = 14/16 log 2 (2 positives).
SUM0, SUM1 = 10 / 16 * LOG2, 14 / 16 * LOG2


def test_loss_single_image_hand_values():
    logits = torch.zeros(1, 3, K)
    # deltas: anchor 0 (fg) -> smooth L1 (beta 0.1) 0.0125 + 0 + 0.15 + 0.15 = 0.3125;
    # anchors 1 and 2 are not fg: their junk deltas must not count
    deltas = torch.tensor([[[0.05, 0.0, 0.2, -0.2], [5.0, 5.0, 5.0, 5.0], [-9.0, 9.0, 9.0, 9.0]]])
    out = run(logits, deltas, [IMG0])
    assert set(out.losses) == {"loss_cls", "loss_box"}
    assert_close(out.losses["loss_cls"], torch.tensor(SUM0))  # / num_pos = 1
    assert_close(out.losses["loss_box"], torch.tensor(0.3125))
    assert_close(out.num_pos, torch.tensor(1.0))  # the positive count comes back with the losses
    assert out.num_pos_ema is None  # normalizer batch keeps no running count
    # box_weight scales the box loss; l1 replaces smooth L1: 0.05 + 0.2 + 0.2 = 0.45
    assert_close(run(logits, deltas, [IMG0], box_weight=2.0).losses["loss_box"], torch.tensor(2 * 0.3125))
    assert_close(run(logits, deltas, [IMG0], box_loss="l1").losses["loss_box"], torch.tensor(0.45))


def test_ignored_anchor_contributes_nothing():
    logits = torch.zeros(1, 3, K)
    logits[0, 2] = torch.tensor([40.0, -40.0])  # ignored anchor: would cost a lot
    logits.requires_grad_()
    out = run(logits, torch.zeros(1, 3, 4), [IMG0]).losses
    assert_close(out["loss_cls"], torch.tensor(SUM0))
    out["loss_cls"].backward()
    assert torch.equal(logits.grad[0, 2], torch.zeros(K))
    assert (logits.grad[0, :2] != 0).all()


def test_batch_normalizer_is_sum_over_total_positives():
    out = run(torch.zeros(2, 3, K), torch.zeros(2, 3, 4), [IMG0, IMG1])
    # (10/16 + 14/16) log 2 / (1 + 2) = log 2 / 2
    assert_close(out.losses["loss_cls"], torch.tensor((SUM0 + SUM1) / 3))
    assert_close(out.losses["loss_cls"], torch.tensor(LOG2 / 2))
    assert_close(out.num_pos, torch.tensor(3.0))  # 1 + 2 positives


def test_batched_equals_per_image_sums():
    g = torch.Generator().manual_seed(0)
    logits, deltas = torch.randn(2, 3, K, generator=g), torch.randn(2, 3, 4, generator=g)
    gt_classes = torch.tensor([IMG0, IMG1])
    gt_deltas = torch.randn(2, 3, 4, generator=g)
    whole = retinanet_losses(logits, deltas, gt_classes, gt_deltas, LossConfig()).losses
    pos = [1.0, 2.0]
    sums = {"loss_cls": 0.0, "loss_box": 0.0}
    for i in range(2):
        out = retinanet_losses(logits[i:i + 1], deltas[i:i + 1], gt_classes[i:i + 1], gt_deltas[i:i + 1],
                               LossConfig())
        for k in sums:
            sums[k] = sums[k] + out.losses[k] * pos[i]  # per-image sum = normalised loss * its positives
    for k in sums:
        assert_close(whole[k], sums[k] / sum(pos))


def test_image_normalizer_means_per_image_losses():
    out = run(torch.zeros(2, 3, K), torch.zeros(2, 3, 4), [IMG0, IMG1], normalizer="image")
    # mean(10/16 / 1, 14/16 / 2) = (10/16 + 7/16) / 2 = 17/32 log 2
    assert_close(out.losses["loss_cls"], torch.tensor(17 / 32 * LOG2))


@pytest.mark.parametrize("normalizer", ["batch", "image", "ema"])
def test_image_without_gt(normalizer):
    no_gt = [K, K, K]
    deltas = torch.full((1, 3, 4), 3.0, requires_grad=True)
    out = run(torch.zeros(1, 3, K), deltas, [no_gt], num_pos_ema=torch.tensor(EMA_INIT),
              normalizer=normalizer)
    # no positives: normaliser clamped at 1 (ema: 0.9 * 100 + 0.1 * 0 = 90); 3 bg anchors cost
    # 3 * 6/16 log 2 = 18/16 log 2
    norm = 90.0 if normalizer == "ema" else 1.0
    assert_close(out.losses["loss_cls"], torch.tensor(18 / 16 * LOG2 / norm))
    assert torch.equal(out.losses["loss_box"], torch.tensor(0.0))
    assert torch.equal(out.num_pos, torch.tensor(0.0))
    out.losses["loss_box"].backward()
    assert torch.equal(deltas.grad, torch.zeros(1, 3, 4))
    # mixed batch: the empty image adds its background loss, not positives
    out = run(torch.zeros(2, 3, K), torch.zeros(2, 3, 4), [IMG0, no_gt])
    assert_close(out.losses["loss_cls"], torch.tensor((SUM0 + 18 / 16 * LOG2) / 1))


def test_ema_normalizer_is_passed_in_and_returned():
    zeros = torch.zeros(2, 3, K), torch.zeros(2, 3, 4)
    out = run(*zeros, [IMG0, IMG1], num_pos_ema=torch.tensor(EMA_INIT), normalizer="ema",
              ema_momentum=0.9)  # 3 positives
    # 0.9 * 100 + 0.1 * 3 = 90.3, and the loss is divided by the updated value
    assert_close(out.num_pos_ema, torch.tensor(90.3))
    assert_close(out.losses["loss_cls"], torch.tensor((SUM0 + SUM1) / 90.3))
    assert_close(out.num_pos, torch.tensor(3.0))  # this batch's count, not the running one
    out = run(*zeros, [IMG0, IMG1], num_pos_ema=out.num_pos_ema, normalizer="ema", ema_momentum=0.9)
    # 0.9 * 90.3 + 0.1 * 3 = 81.57
    assert_close(out.num_pos_ema, torch.tensor(81.57))
    assert_close(out.losses["loss_cls"], torch.tensor((SUM0 + SUM1) / 81.57))
    with pytest.raises(ValueError, match="num_pos_ema"):  # ema without its running count
        run(*zeros, [IMG0, IMG1], normalizer="ema")


def test_model_keeps_the_ema_count_as_a_buffer_and_loads_the_old_key():
    from retina.config import load_config
    from retina.model import build_model

    tiny = ["model.backbone.depth=18", "model.backbone.weights=null", "model.fpn.channels=16",
            "model.head.num_convs=1", "model.input.min_size=[64]", "model.input.max_size=64",
            "model.num_classes=3", "loss.normalizer=ema", "loss.ema_momentum=0.9"]
    model = build_model(load_config(None, tiny)).train()
    assert_close(model.num_pos_ema, torch.tensor(EMA_INIT))
    image = torch.rand(3, 64, 64)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    out = model([image], [target])
    assert set(out) == {"loss_cls", "loss_box", "num_pos"}
    assert out["num_pos"] >= 1 and not out["num_pos"].requires_grad
    # one step: 0.9 * 100 + 0.1 * num_pos
    assert_close(model.num_pos_ema, 90.0 + 0.1 * out["num_pos"])
    state = model.state_dict()
    assert "num_pos_ema" in state and not any(k.startswith("loss.") for k in state)
    # a checkpoint from before the loss became a function kept it at loss.num_pos_ema
    old = {("loss.num_pos_ema" if k == "num_pos_ema" else k): v for k, v in state.items()}
    old["loss.num_pos_ema"] = torch.tensor(42.5)
    fresh = build_model(load_config(None, tiny))
    fresh.load_state_dict(old)  # strict: the old key is mapped, nothing missing or unexpected
    assert_close(fresh.num_pos_ema, torch.tensor(42.5))


def test_ce_type_uses_the_gamma_it_is_given():
    logits = torch.zeros(1, 3, K)
    # gamma 0: each entry costs alpha_t * log 2 at p = 0.5.
    # fg anchor: 0.25 + 0.75 = 1 log 2; bg anchor: 0.75 + 0.75 = 1.5 log 2 -> 2.5 log 2 / 1
    out = run(logits, torch.zeros(1, 3, 4), [IMG0], type="ce", gamma=0.0)
    assert_close(out.losses["loss_cls"], torch.tensor(2.5 * LOG2))
    # gamma 2 is not replaced by 0 (the config refuses it for ce; the loss does what it is told):
    # the focal value SUM0 above
    out = run(logits, torch.zeros(1, 3, 4), [IMG0], type="ce", gamma=2.0)
    assert_close(out.losses["loss_cls"], torch.tensor(SUM0))
    # alpha None: plain BCE, 2 anchors * 2 classes * log 2
    out = run(logits, torch.zeros(1, 3, 4), [IMG0], type="ce", alpha=None, gamma=0.0)
    assert_close(out.losses["loss_cls"], torch.tensor(4 * LOG2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_low_precision_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, K, generator=g) * 50).to(dtype)
    deltas = torch.randn(2, 3, 4, generator=g).to(dtype)
    out = run(logits, deltas, [IMG0, IMG1]).losses
    ref = run(logits.float(), deltas.float(), [IMG0, IMG1]).losses
    for k in ("loss_cls", "loss_box"):
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k])
        assert_close(out[k], ref[k])


@pytest.mark.parametrize("loss_type", ["focal", "focal_star"])
def test_loss_fp64_inputs_stay_fp64(loss_type):
    logits, deltas = torch.zeros(2, 3, K, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64)
    out = run(logits, deltas, [IMG0, IMG1], type=loss_type).losses
    assert out["loss_cls"].dtype == out["loss_box"].dtype == torch.float64
    if loss_type == "focal":  # (10/16 + 14/16) log 2 / 3 positives, at fp64 precision
        assert_close(out["loss_cls"], torch.tensor((SUM0 + SUM1) / 3, dtype=torch.float64))


def test_elementwise_losses_keep_fp64_and_lift_half_to_fp32():
    # torchvision's and fvcore's rule: fp64 stays fp64, half and bfloat16 are computed in fp32
    x = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    fl = sigmoid_focal_loss(x, t)
    assert fl.dtype == torch.float64
    assert_close(fl, torchvision.ops.sigmoid_focal_loss(x, t))  # fp64 tolerances
    assert focal_star_loss(x, t).dtype == torch.float64
    assert box_regression_loss(x, t, "smooth_l1", 0.1).dtype == torch.float64
    for dtype in (torch.float16, torch.bfloat16):
        assert sigmoid_focal_loss(x.to(dtype), t).dtype == torch.float32
        assert focal_star_loss(x.to(dtype), t.to(dtype)).dtype == torch.float32
        assert box_regression_loss(x.to(dtype), t.to(dtype), "l1", 0.1).dtype == torch.float32


def test_giou_box_loss_hand_values():
    """Anchor [0, 0, 10, 10], prediction delta 0 (the anchor itself), target [0, 0, 10, 20]:
    intersection 100, union 200, enclosing box = the target (area 200): GIoU = 0.5 - 0 = 0.5, so
    the loss is 1 - 0.5 = 0.5. Image 2 has only a background anchor: no box loss. Normaliser:
    1 positive in the batch."""
    from retina.model.box_coder import BoxCoder

    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # (R=1, 4)
    gt = coder.encode(torch.tensor([[0.0, 0.0, 10.0, 20.0]]), anchors)  # (1, 4): 0, 0.5, 0, log 2
    assert_close(gt, torch.tensor([[0.0, 0.5, 0.0, math.log(2)]]))
    gt_deltas = torch.cat([gt, torch.zeros(1, 4)])[:, None]  # (N=2, R=1, 4)
    gt_classes = torch.tensor([[0], [1]])  # image 1: class 0; image 2: background (K = 1)
    logits = torch.zeros(2, 1, 1)
    pred = torch.zeros(2, 1, 4, requires_grad=True)
    out = retinanet_losses(logits, pred, gt_classes, gt_deltas, LossConfig(box_loss="giou"),
                           anchors, decode=coder.decode)
    assert_close(out.losses["loss_box"], torch.tensor(0.5))
    out.losses["loss_box"].backward()
    assert pred.grad[1].abs().sum() == 0 and pred.grad[0].abs().sum() > 0
    with pytest.raises(ValueError, match="giou"):
        retinanet_losses(logits, pred, gt_classes, gt_deltas, LossConfig(box_loss="giou"), anchors)


def test_matched_iou_and_quality_targets_hand_values():
    """pairwise_matched_iou: [0, 0, 2, 2] and [1, 1, 3, 3] meet in 1 of 4 + 4 - 1 = 7: 1/7;
    disjoint boxes 0. iou_targets: anchor [0, 0, 10, 10] predicted as itself (delta 0), target
    [5, 0, 15, 10]: intersection 50, union 150, IoU 1/3; the background anchor gets 0."""
    from retina.model.box_coder import BoxCoder
    from retina.model.boxes import pairwise_matched_iou
    from retina.model.losses.box import iou_targets

    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0]])
    assert_close(pairwise_matched_iou(a, b), torch.tensor([1 / 7, 0.0]))
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])  # (R=2, 4)
    gt = coder.encode(torch.tensor([[5.0, 0.0, 15.0, 10.0]]), anchors[:1])  # (1, 4): 0.5, 0, 0, 0
    gt_deltas = torch.cat([gt, torch.zeros(1, 4)])[None]  # (N=1, R=2, 4)
    fg = torch.tensor([[True, False]])
    pred = torch.zeros(1, 2, 4, requires_grad=True)
    y = iou_targets(pred, gt_deltas, fg, anchors, coder.decode)
    assert_close(y, torch.tensor([[1 / 3, 0.0]]))
    assert not y.requires_grad  # a target, not a path for the box gradient


def test_quality_focal_type_trains_towards_the_iou():
    """loss.type quality_focal: the positive's target is the IoU of its predicted box (1/3 here,
    as above), so at logit log(1/2) (p = 1/3) the positive term is 0 and only the background
    anchor's p^2 softplus(x) = (1/2)^2 log 2 at logit 0 remains; 1 positive. It needs the box
    coder, like GIoU."""
    from retina.model.box_coder import BoxCoder

    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    gt = coder.encode(torch.tensor([[5.0, 0.0, 15.0, 10.0]]), anchors[:1])
    gt_deltas = torch.cat([gt, torch.zeros(1, 4)])[None]  # (1, 2, 4)
    gt_classes = torch.tensor([[0, 1]])  # K = 1: anchor 0 class 0, anchor 1 background
    logits = torch.tensor([[[math.log(0.5)], [0.0]]])  # p = 1/3 and 1/2
    s = LossConfig(type="quality_focal", alpha=None)
    out = retinanet_losses(logits, torch.zeros(1, 2, 4), gt_classes, gt_deltas, s, anchors,
                           decode=coder.decode)
    assert_close(out.losses["loss_cls"], torch.tensor(0.25 * math.log(2)))
    with pytest.raises(ValueError, match="quality_focal"):
        retinanet_losses(logits, torch.zeros(1, 2, 4), gt_classes, gt_deltas, s, anchors)
