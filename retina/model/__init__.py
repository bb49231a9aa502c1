"""``build_model(cfg)``: the one place that reads the model, loss and input config; and
``with_test_time_augmentation(model, cfg)``, what eval and predict run.

Each config section is declared once (``retina.config.schema``). The loss and input sections are
handed to the model as they are; the other sections reach their module's constructor by field
name (``fields_of``), so a field the module does not take fails the build instead of being left
unread, and ``tests/test_model.py`` holds each constructor's parameters equal to its section's
fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from retina.config import Config, ConfigError
from retina.config.schema import ModelConfig
from retina.model.anchors import AnchorGenerator, default_sizes
from retina.model.assigner import TargetAssigner
from retina.model.atss import ATSSMatcher
from retina.model.backbone import FPN, LightBackbone, ResNetBackbone, Trunk
from retina.model.box_coder import BoxCoder
from retina.model.head import RetinaHead
from retina.model.matcher import Matcher
from retina.model.postprocess import PostProcessor
from retina.model.retinanet import RetinaNet
from retina.model.tta import HorizontalFlipTTA

__all__ = ["build_model", "with_test_time_augmentation", "RetinaNet"]

# The fields of each section that the factory reads itself instead of handing them on: the
# choices (which class), what one variant alone reads, and what another part decides.
NOT_HANDED_ON = {
    "backbone": ("type", "depth"),  # the trunk's class and a ResNet's depth
    "anchors": ("sizes",),  # empty means 4 x stride: ``default_sizes``
    "matcher": ("type", "topk"),  # ATSS takes topk; the IoU matcher the rest
    "inference": ("hflip_tta",),  # ``with_test_time_augmentation``
}


def fields_of(section: Any, name: str = "") -> dict[str, Any]:
    """The fields of a config section by name, less ``NOT_HANDED_ON[name]``: the keyword
    arguments of the module whose parameters carry the same names."""
    skip = NOT_HANDED_ON.get(name, ())
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name not in skip}


def trunk_is_pretrained(m: ModelConfig) -> bool:
    """Whether the trunk starts from trained weights: ``model.backbone.weights`` (read at the
    build) or ``model.init`` (a retina checkpoint loaded after it). ``freeze_at`` applies then."""
    return m.backbone.weights is not None or m.init is not None


def build_trunk(m: ModelConfig, pretrained: bool = True) -> Trunk:
    """The bottom-up pathway ``m.backbone`` names, its first ``freeze_at`` stages frozen when it
    starts from trained weights (``trunk_is_pretrained``); ``pretrained`` as ``build_model``'s."""
    b = m.backbone
    kwargs = {**fields_of(b, "backbone"), "freeze_at": b.freeze_at if trunk_is_pretrained(m) else 0,
              "load_weights": pretrained}
    if b.type == "resnet":
        return ResNetBackbone(b.depth, **kwargs)
    return LightBackbone(b.type, **kwargs)


def build_model(cfg: Config, pretrained: bool = True) -> RetinaNet:
    """The model ``cfg`` describes. ``pretrained=False`` builds the same architecture (norm
    layers and frozen stages as ``model.backbone.weights`` and ``model.init`` imply) without
    fetching or reading those weights: for a model whose every tensor then comes from a checkpoint.
    ``model.num_classes`` must be resolved (not null)."""
    m = cfg.model
    if m.num_classes is None:  # null means the train set's: whoever reads the data resolves it
        raise ConfigError("model.num_classes is null (the train set's): build the model from a config "
                          "whose class count is resolved, or set model.num_classes")
    backbone = build_trunk(m, pretrained)
    fpn = FPN(backbone.out_channels, **fields_of(m.fpn))
    strides = [2**lvl for lvl in range(m.fpn.min_level, m.fpn.max_level + 1)]
    sizes = m.anchors.sizes or default_sizes(m.fpn.min_level, m.fpn.max_level)
    anchors = AnchorGenerator(strides, sizes, **fields_of(m.anchors, "anchors"))
    head = RetinaHead(m.fpn.channels, anchors.num_anchors, m.num_classes, **fields_of(m.head))
    box_coder = BoxCoder(**fields_of(m.box_coder))
    if m.matcher.type == "atss":
        matcher = ATSSMatcher(m.matcher.topk, anchors.num_anchors, m.matcher.bg_iou_thresh)
    else:
        matcher = Matcher(**fields_of(m.matcher, "matcher"))
    post = PostProcessor(box_coder, **fields_of(m.inference, "inference"))
    model = RetinaNet(backbone, fpn, head, anchors, TargetAssigner(matcher, box_coder, m.num_classes),
                      cfg.loss, post, m.input, m.channels_last)
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def with_test_time_augmentation(model: nn.Module, cfg: Config) -> nn.Module:
    """What eval and predict run: ``model`` itself, or wrapped in ``HorizontalFlipTTA`` when
    ``model.inference.hflip_tta`` is set (merged at the model's NMS threshold and cap)."""
    inference = cfg.model.inference
    if not inference.hflip_tta:
        return model
    return HorizontalFlipTTA(model, inference.nms_thresh, inference.detections_per_image)
