"""``build_model(cfg)``: the one place that reads the model, loss and input config."""

from __future__ import annotations

import torch

from retina.model.assigner import TargetAssigner
from retina.model.atss import ATSSMatcher
from retina.model.box_coder import BoxCoder
from retina.config import Config
from retina.model.losses import FocalStarSettings, LossSettings, OhemSettings
from retina.model.matcher import Matcher
from retina.model.anchors import AnchorGenerator, default_sizes
from retina.model.backbone import FPN, LightBackbone, ResNetBackbone
from retina.model.head import RetinaHead
from retina.model.retinanet import InputSpec, RetinaNet
from retina.model.postprocess import PostProcessor

__all__ = ["build_model", "RetinaNet"]


def build_model(cfg: Config, pretrained: bool = True) -> RetinaNet:
    """The model ``cfg`` describes. ``pretrained=False`` builds the same architecture (norm
    layers and frozen stages as ``model.backbone.weights`` implies) without fetching or reading
    those weights: for a model whose every tensor then comes from a checkpoint."""
    m = cfg.model
    b = m.backbone
    if b.type == "resnet":
        backbone = ResNetBackbone(b.depth, b.weights, b.norm, b.freeze_at, b.norm_eps, load_weights=pretrained)
    else:
        backbone = LightBackbone(b.type, b.weights, b.norm, b.freeze_at, b.norm_eps, load_weights=pretrained)
    fpn = FPN(backbone.out_channels, m.fpn.channels, m.fpn.min_level, m.fpn.max_level, m.fpn.p6_from)
    levels = range(m.fpn.min_level, m.fpn.max_level + 1)
    sizes = m.anchors.sizes or default_sizes(m.fpn.min_level, m.fpn.max_level)
    anchors = AnchorGenerator([2**lvl for lvl in levels], sizes, m.anchors.scales, m.anchors.ratios,
                              m.anchors.offset, m.anchors.stride_from, order=m.anchors.order,
                              truncate_sizes=m.anchors.truncate_sizes,
                              round_corners=m.anchors.round_corners)
    head = RetinaHead(m.fpn.channels, anchors.num_anchors, m.num_classes, m.head.num_convs,
                      m.head.norm, m.head.prior_prob, m.head.conv_bias)
    box_coder = BoxCoder(m.box_coder.weights, m.box_coder.scale_clamp)
    if m.matcher.type == "atss":
        matcher = ATSSMatcher(m.matcher.topk, anchors.num_anchors, m.matcher.bg_iou_thresh)
    else:
        matcher = Matcher(m.matcher.fg_iou_thresh, m.matcher.bg_iou_thresh, m.matcher.allow_low_quality)
    lc = cfg.loss
    loss = LossSettings(
        type=lc.type, alpha=lc.alpha, gamma=lc.gamma, box_loss=lc.box_loss, smooth_l1_beta=lc.smooth_l1_beta,
        box_weight=lc.box_weight, normalizer=lc.normalizer, ema_momentum=lc.ema_momentum,
        ohem=OhemSettings(nms=lc.ohem.nms, batch_size=lc.ohem.batch_size, ratio=lc.ohem.ratio,
                          normalizer=lc.ohem.normalizer),
        focal_star=FocalStarSettings(gamma=lc.focal_star.gamma, beta=lc.focal_star.beta))
    post = PostProcessor(box_coder, m.inference.score_thresh, m.inference.topk_candidates,
                         m.inference.nms_thresh, m.inference.detections_per_image, m.inference.hflip_tta)
    spec = InputSpec(m.input.min_size, m.input.max_size, m.input.pixel_mean, m.input.pixel_std,
                     m.input.size_divisibility, m.input.resize, m.input.test_min_size, m.input.test_max_size)
    model = RetinaNet(backbone, fpn, head, anchors, TargetAssigner(matcher, box_coder, m.num_classes),
                      loss, post, spec, m.channels_last)
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
