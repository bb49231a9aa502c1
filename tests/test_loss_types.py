"""The paper's baselines as loss types (Sec. 5.1, Table 1 and appendix A): OHEM's selection of
the hardest anchors and its normalisers, FL* by hand and in the batch loss, a training step of each
type, and the prior's bias at pi = 0."""

from __future__ import annotations

import math

import pytest
import torch

from retina.config import ConfigError, config_from_dict
from retina.model import build_model
from retina.config.schema import LossConfig, OhemConfig
from retina.model.losses import retinanet_losses
from retina.model.losses.focal import focal_star_loss
from retina.model.losses.ohem import ohem_select


# ------------------------------------------------------------------------------------ OHEM
# Seven 10 x 10 anchors on a row; a1 is a0 shifted by 1 px: IoU = 90 / (100 + 100 - 90) = 0.818.
BOXES = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10], [40, 0, 50, 10],
                      [60, 0, 70, 10], [80, 0, 90, 10], [100, 0, 110, 10]], dtype=torch.float32)
LOSS = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 6.0, 0.5])
FG = torch.tensor([True, False, False, True, False, False, False])
VALID = torch.tensor([True, True, True, True, True, False, True])  # a5 (highest loss) is ignored


def select(batch_size, nms, ratio=None, fg=FG):
    return ohem_select(LOSS, BOXES, fg, VALID, batch_size, nms, ratio).tolist()


def test_ohem_selection_by_hand():
    # NMS 0.7: a1 (0.818 with a0) goes; by loss a0 5, a2 3, a3 2, a4 1, a6 0.5; ignored a5 never.
    assert select(3, 0.7) == [0, 2, 3]
    assert select(3, 0.9) == [0, 1, 2]  # 0.818 < 0.9: a1 stays
    assert select(10, 0.7) == [0, 2, 3, 4, 6]  # fewer survivors than the batch
    # ratio 0.5, B 4: floor(0.5 * 4) = 2 positives (a0, a3), then min(3 negatives, 4 - 2, 2 * 1) = 2
    assert select(4, 0.7, 0.5) == [0, 3, 2, 4]
    # ratio 0.25 (1:3), B 4: 1 positive (a0), then min(3, 4 - 1, 1 * 3) = 3 negatives
    assert select(4, 0.7, 0.25) == [0, 2, 4, 6]
    # ratio 0.25, B 8: 2 positives, then min(3, 6, 2 * 3) = 3 negatives
    assert select(8, 0.7, 0.25) == [0, 3, 2, 4, 6]
    # 1:3 with no positive in the image: no negative either (SSD's rule)
    assert select(4, 0.7, 0.25, fg=torch.zeros(7, dtype=torch.bool)) == []
    assert select(4, 0.7, None, fg=torch.zeros(7, dtype=torch.bool)) == [0, 2, 3, 4]


def test_ohem_prefix_grows_until_enough_survive():
    # 17 anchors: the 16 hardest are one box (NMS keeps only the first), the 17th lies apart.
    # B = 2 starts from the top 8 * B = 16: one survivor, so the prefix grows to take anchor 16.
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 16 + [[50.0, 50, 60, 60]])
    loss = torch.arange(17, 0, -1).float()  # 17, 16, ..., 1
    keep = ohem_select(loss, boxes, torch.zeros(17, dtype=torch.bool), torch.ones(17, dtype=torch.bool), 2, 0.7)
    assert keep.tolist() == [0, 16]


def _losses(logits, gt_classes, settings, anchors=None):
    """retinanet_losses with zero deltas; gt_classes nested lists (-1 ignored, K background)."""
    gt_classes = torch.tensor(gt_classes)
    zeros = torch.zeros(*gt_classes.shape, 4)
    return retinanet_losses(logits, zeros, gt_classes, zeros, settings, anchors).losses


def test_focal_star_by_hand():
    # x_t = 0, gamma 2, beta 1: p* = sigmoid(1), FL* = -log(sigmoid(1)) / 2 = log(1 + e^-1) / 2
    at_zero = math.log(1 + math.exp(-1)) / 2  # 0.15663
    got = focal_star_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), 2.0, 1.0)
    torch.testing.assert_close(got, torch.tensor([at_zero, at_zero]))
    # a negative with x = 1: x_t = -1, FL* = -log(sigmoid(-2 + 1)) / 2 = log(1 + e) / 2
    torch.testing.assert_close(focal_star_loss(torch.tensor([1.0]), torch.tensor([0.0]), 2.0, 1.0),
                               torch.tensor([math.log(1 + math.e) / 2]))
    # gamma 4, beta 0, a positive with x = 0.5: -log(sigmoid(2)) / 4; alpha 0.25 scales it
    value = math.log(1 + math.exp(-2)) / 4
    torch.testing.assert_close(focal_star_loss(torch.tensor([0.5]), torch.tensor([1.0]), 4.0, 0.0, alpha=0.25),
                               torch.tensor([0.25 * value]))
    # gamma 1, beta 0 is plain CE; a huge margin stays finite (softplus form)
    x = torch.tensor([-3.0, 0.5, 200.0])
    t = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(focal_star_loss(x, t, 1.0, 0.0),
                               torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none"))


def test_focal_star_in_retinanet_loss_is_normalised_by_positives():
    # 2 anchors, K = 1, logits 0: a0 positive, a1 negative; each FL* = log(1 + e^-1) / 2; 1 positive
    out = _losses(torch.zeros(1, 2, 1), [[0, 1]], LossConfig(type="focal_star", alpha=None))
    torch.testing.assert_close(out["loss_cls"], torch.tensor(2 * math.log(1 + math.exp(-1)) / 2))


@pytest.mark.parametrize("normalizer, divisor", [("positives", 1.0), ("selected", 2.0)])
def test_ohem_loss_normalizers_by_hand(normalizer, divisor):
    # 3 far-apart anchors, K = 1, unweighted CE. Logits 0, 0, -10: a0 positive (CE log 2), a1
    # negative (log 2), a2 negative (softplus(-10) = 4.5e-5). B = 2 keeps a0 and a1: summed CE
    # 2 log 2, divided by the 1 positive, or by the 2 kept (the minibatch mean).
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    settings = LossConfig(type="ohem", alpha=None, gamma=0.0,
                          ohem=OhemConfig(nms=0.5, batch_size=2, normalizer=normalizer))
    out = _losses(torch.tensor([[[0.0], [0.0], [-10.0]]]), [[0, 1, 1]], settings, anchors)
    torch.testing.assert_close(out["loss_cls"], torch.tensor(2 * math.log(2) / divisor))
    torch.testing.assert_close(out["loss_box"], torch.tensor(0.0))


# ---------------------------------------------------------------------- loss types train a step
TINY_MODEL = ["model.backbone.depth=18", "model.fpn.channels=16", "model.fpn.max_level=5",
              "model.anchors.sizes=[8,16,32]", "model.head.num_convs=1", "model.head.norm=gn",
              "model.input.min_size=[64]", "model.input.max_size=64", "model.input.size_divisibility=32",
              "model.num_classes=3"]


@pytest.mark.parametrize("loss_type", ["ce", "ohem", "focal_star"])
def test_loss_types_train_a_step(loss_type, tiny_shapes_overrides):
    from retina.data import build_dataset

    torch.manual_seed(0)
    own = {"ce": ["loss.gamma=0"], "ohem": ["loss.gamma=0", "loss.ohem.batch_size=16", "loss.ohem.ratio=0.25"],
           "focal_star": []}[loss_type]  # the keys each type reads (others are refused)
    cfg = config_from_dict({}, [*TINY_MODEL, *tiny_shapes_overrides, f"loss.type={loss_type}", *own])
    model = build_model(cfg).train()
    data = build_dataset(cfg, "train")
    images, targets = zip(*(data[i] for i in range(2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.head.cls_logits.weight.detach().clone()
    losses = model([img.float() / 255 for img in images], list(targets))
    total = losses["loss_cls"] + losses["loss_box"]  # num_pos is a count, not a loss
    assert torch.isfinite(total) and losses["loss_cls"] > 0
    total.backward()
    opt.step()
    assert not torch.equal(before, model.head.cls_logits.weight)


def test_prior_prob_zero_means_zero_bias():
    # pi = 0 sweeps "no prior" (Sec. 4.1 / 5.1: CE without the prior diverges); bias 0 means p = 0.5
    model = build_model(config_from_dict({}, [*TINY_MODEL, "model.head.prior_prob=0"]))
    assert torch.equal(model.head.cls_logits.bias, torch.zeros_like(model.head.cls_logits.bias))
    with pytest.raises(ConfigError, match="loss.ohem.ratio"):
        config_from_dict({}, ["loss.ohem.ratio=1"])
    with pytest.raises(ConfigError, match="loss.focal_star.gamma"):
        config_from_dict({}, ["loss.focal_star.gamma=0"])
