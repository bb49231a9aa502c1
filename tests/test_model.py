"""Tests for retina.model: build_model on a tiny config, training losses and gradients, eval
detections in original-image coordinates, head layout and init, FPN variants, preprocessing."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from retina.config import config_to_dict, load_config
from retina.config.schema import ModelConfig
from retina.engine.checkpoint import save_checkpoint
from retina.model import NOT_HANDED_ON, build_model, fields_of, with_test_time_augmentation
from retina.model.anchors import AnchorGenerator
from retina.model.backbone import FPN, LightBackbone, ResNetBackbone
from retina.model.box_coder import BoxCoder
from retina.model.head import RetinaHead, prior_bias, to_n_hwa_c
from retina.model.matcher import Matcher
from retina.model.postprocess import PostProcessor
from retina.model.tta import HorizontalFlipTTA, merge_mirrored

TINY = ["model.backbone.depth=18", "model.fpn.channels=32", "model.head.num_convs=1",
        "model.input.min_size=[64]", "model.num_classes=3"]
K, A = 3, 9  # classes; anchors per cell (3 scales x 3 ratios)


def tiny_model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(load_config(None, TINY + list(overrides)))


def images_and_targets():
    g = torch.Generator().manual_seed(0)
    # eval mode resizes them (training takes them as they are): 40 -> 64 on the shorter side
    images = [torch.rand(3, 40, 50, generator=g),  # upscaled: 64 x 80
              torch.rand(3, 100, 70, generator=g)]  # downscaled: 91 x 64
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 35.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [0.0, 0.0, 20.0, 20.0]]),
                "labels": torch.tensor([0, 1])}]
    return images, targets


@pytest.mark.parametrize("loss", [[], ["loss.type=quality_focal", "loss.alpha=null"]])
def test_training_forward_and_backward(loss):
    model = tiny_model(*loss).train()
    images, targets = images_and_targets()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box", "num_pos"}  # num_pos: a count to log, no loss
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v)
    assert losses["num_pos"] >= 1 and not losses["num_pos"].requires_grad
    assert losses["loss_box"] > 0  # positives exist
    (losses["loss_cls"] + losses["loss_box"]).backward()
    for name, p in [("head.cls_logits.weight", model.head.cls_logits.weight),
                    ("head.box_deltas.weight", model.head.box_deltas.weight),
                    ("backbone.stem.0.weight", model.backbone.stem[0].weight),
                    ("fpn.lateral.0.weight", model.fpn.lateral[0].weight)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_training_requires_targets():
    with pytest.raises(ValueError, match="targets"):
        tiny_model().train()([torch.rand(3, 32, 32)])


def test_image_without_boxes_in_training_batch():
    model = tiny_model().train()
    images, targets = images_and_targets()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    # a batch with no boxes at all: box loss exactly 0, classification finite
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model(images[:1], empty[:1])
    assert torch.isfinite(losses["loss_cls"])
    assert torch.equal(losses["loss_box"], torch.tensor(0.0))


def test_eval_boxes_in_original_image_coordinates():
    # score_thresh 0 keeps every candidate, so the big (clipped) anchors reach the image edges
    model = tiny_model("model.inference.score_thresh=0.0", "model.inference.detections_per_image=300").eval()
    images, _ = images_and_targets()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2
    for det, img in zip(dets, images):
        h, w = img.shape[-2:]
        d = det["boxes"].shape[0]
        assert d > 0 and det["boxes"].shape == (d, 4)
        assert det["scores"].shape == (d,) and det["labels"].shape == (d,)
        assert det["labels"].dtype == torch.int64 and det["labels"].max() < K
        b = det["boxes"]
        assert (b >= 0).all() and (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        # clipped at the original image's edge, not the resized (64 x 80, 91 x 64) or padded one
        assert_close(b[:, 2].max(), torch.tensor(float(w)))
        assert_close(b[:, 3].max(), torch.tensor(float(h)))


def test_hflip_tta_wraps_the_model_and_merges_each_image_with_its_mirror():
    images, _ = images_and_targets()
    cfg = load_config(None, TINY + ["model.inference.score_thresh=0.0", "model.inference.hflip_tta=true"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tta = with_test_time_augmentation(model, cfg)
    assert isinstance(tta, HorizontalFlipTTA) and tta.detector is model
    assert (tta.nms_thresh, tta.detections_per_image) == (0.5, 100)  # the model's own NMS and cap
    assert with_test_time_augmentation(model, load_config(None, TINY)) is model  # hflip_tta false
    with torch.no_grad():
        got = tta(images)
        alone = model(images)  # the model itself detects each image once, whatever the config
        expected = merge_mirrored(alone, model([im.flip(-1) for im in images]), [(40, 50), (100, 70)],
                                  0.5, 100)  # fmt: skip
    for g, e, a, image in zip(got, expected, alone, images):
        assert len(g["scores"]) == 100  # score_thresh 0: the cap decides
        for key in ("boxes", "scores", "labels"):
            assert_close(g[key], e[key], rtol=0, atol=1e-4)
        assert g["boxes"][:, 2].max() <= image.shape[-1]  # mapped back into the image
        assert not torch.equal(g["scores"], a["scores"])  # the mirror's detections are in
    with pytest.raises(ValueError, match="eval mode"):
        tta.train()(images)


def test_eval_and_predict_load_the_tta_wrapper_when_the_config_asks(tmp_path):
    from retina.deploy.runtime import load_detector

    cfg = load_config(None, TINY)
    path = save_checkpoint({"model": build_model(cfg, pretrained=False).state_dict(),
                            "config": config_to_dict(cfg), "class_names": ["a", "b", "c"]}, tmp_path / "m.pth")
    plain = load_detector(path)[0]
    tta = load_detector(path, overrides=["model.inference.hflip_tta=true"])[0]
    assert not isinstance(plain, HorizontalFlipTTA) and isinstance(tta, HorizontalFlipTTA)
    assert not tta.training and not tta.detector.training


# Each module's parameters that the factory fills from elsewhere (other sections, the build).
OWN_ARGUMENTS = {FPN: {"in_channels"}, AnchorGenerator: {"strides", "sizes"},
                 RetinaHead: {"channels", "num_anchors", "num_classes"}, BoxCoder: set(), Matcher: set(),
                 PostProcessor: {"box_coder"}, ResNetBackbone: {"depth", "load_weights"},
                 LightBackbone: {"arch", "load_weights"}}


@pytest.mark.parametrize("section, module", [("fpn", FPN), ("anchors", AnchorGenerator), ("head", RetinaHead),
                                             ("box_coder", BoxCoder), ("matcher", Matcher),
                                             ("inference", PostProcessor), ("backbone", ResNetBackbone),
                                             ("backbone", LightBackbone)])
def test_each_config_section_reaches_its_module_by_field_name(section, module):
    # one declaration per setting: every field of the section is one of the module's parameters
    # (by name) and every parameter the build does not fill itself is a field of the section, so a
    # new field cannot be left unread nor a parameter stay at its default
    leaf = getattr(ModelConfig(), section)
    params = set(inspect.signature(module).parameters) - OWN_ARGUMENTS[module]
    assert set(fields_of(leaf, section)) == params
    names = {f.name for f in dataclasses.fields(leaf)}
    assert set(NOT_HANDED_ON.get(section, ())) <= names  # each field it keeps back exists


def test_loss_and_input_sections_are_the_models_settings():
    cfg = load_config(None, TINY + ["loss.gamma=1.5", "model.input.test_min_size=80"])
    model = build_model(cfg)
    assert model.loss_settings is cfg.loss and model.input_spec is cfg.model.input
    assert model.loss_settings.gamma == 1.5 and model.eval_size == (80, 1333)  # test side 80, cap 1333
    # the other sections by field name: a non-default value reaches the module
    cfg = load_config(None, TINY + ["model.inference.topk_candidates=7", "model.matcher.bg_iou_thresh=0.3",
                                    "model.anchors.offset=0.5", "model.box_coder.scale_clamp=3.0"])
    model = build_model(cfg)
    assert model.postprocessor.topk_candidates == 7 and model.assigner.matcher.bg_iou_thresh == 0.3
    assert model.anchor_generator.offset == 0.5 and model.assigner.box_coder.scale_clamp == 3.0


def test_class_bias_prior_and_head_channels():
    model = tiny_model()
    # pi = 0.01: bias = -log((1 - 0.01) / 0.01) = -log 99
    assert_close(model.head.cls_logits.bias, torch.full((K * A,), -math.log(99.0)))
    assert model.head.cls_logits.out_channels == K * A  # 3 * 9 = 27
    assert model.head.box_deltas.out_channels == 4 * A  # 36
    assert torch.equal(model.head.box_deltas.bias, torch.zeros(4 * A))
    # prior_prob 0: bias 0
    assert torch.equal(tiny_model("model.head.prior_prob=0").head.cls_logits.bias, torch.zeros(K * A))


def test_prior_bias():
    # -log((1 - 0.01) / 0.01) = -log(99)
    assert_close(prior_bias(0.01), -math.log(99.0))
    assert prior_bias(0.5) == 0.0  # -log(1)
    assert prior_bias(0.0) == 0.0  # no prior


def test_head_output_matches_anchor_count():
    model = tiny_model().eval()
    batch = torch.zeros(2, 3, 128, 192)
    with torch.no_grad():
        feats = model.features(batch)
        logits, deltas = model.head(feats)
    sizes = [tuple(f.shape[-2:]) for f in feats]
    # P3..P7, strides 8..128: (16, 24), (8, 12), (4, 6), (2, 3), (1, 2)
    assert sizes == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    r = (16 * 24 + 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2) * A  # sum H * W * A = 512 * 9
    assert logits.shape == (2, r, K) and deltas.shape == (2, r, 4)
    anchors, per_level = model.anchors_of(feats, batch)
    assert anchors.shape == (r, 4)
    assert per_level == [16 * 24 * A, 8 * 12 * A, 4 * 6 * A, 2 * 3 * A, 1 * 2 * A]
    # the first anchor of P4 (stride 16) is centred on its first cell, as P3's on its own
    assert torch.equal(anchors[per_level[0]], model.anchor_generator.level_anchors(1, 8, 12, anchors.device)[0])


def test_to_n_hwa_c_order():
    # (N=1, A*C = 2*2, H=1, W=2): channel a*C + c at (h, w) -> row (h*W + w)*A + a, column c
    x = torch.arange(8.0).view(1, 4, 1, 2)  # value = channel * 2 + w
    out = to_n_hwa_c(x, 2)
    # rows: (w0,a0): channels 0,1 -> 0, 2; (w0,a1): channels 2,3 -> 4, 6; then w1: +1
    assert torch.equal(out, torch.tensor([[[0.0, 2.0], [4.0, 6.0], [1.0, 3.0], [5.0, 7.0]]]))


def test_p6_from_c5_or_p5():
    # paper: P6 from C5 (ResNet-18 C5 has 512 channels; trained in the tests above);
    # torchvision v1: P6 from P5 (fpn.channels = 32)
    assert tiny_model("model.fpn.p6_from=c5").fpn.extra[0].in_channels == 512
    model = tiny_model("model.fpn.p6_from=p5").train()
    assert model.fpn.extra[0].in_channels == 32
    images, targets = images_and_targets()
    losses = model(images[:1], targets[:1])
    assert all(torch.isfinite(v) for v in losses.values())


def test_preprocess_resizes_boxes_and_pads():
    model = tiny_model().eval()
    img = torch.full((3, 40, 50), 0.5)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 20.0, 25.0]]), "labels": torch.tensor([1])}]
    batch, sizes, scales, new_targets = model.preprocess([img], targets)
    # eval size min_size[-1] = 64: scale = 64 / 40 = 1.6 -> (64, 80), padded to 128 (P7 stride)
    assert batch.shape == (1, 3, 128, 128)
    assert sizes == [(64, 80)] and scales == [pytest.approx(1.6)]
    assert_close(new_targets[0]["boxes"], torch.tensor([[16.0, 16.0, 32.0, 40.0]]))
    # downscale 100 x 70 by 64 / 70 -> round(91.43) = 91 rows, 64 columns: boxes follow the
    # rounded size per axis (x * 64 / 70, y * 91 / 100), so the image's corner box fills it
    tall = [{"boxes": torch.tensor([[0.0, 0.0, 70.0, 100.0]]), "labels": torch.tensor([0])}]
    _, sizes, _, new_targets = model.preprocess([torch.rand(3, 100, 70)], tall)
    assert sizes == [(91, 64)]
    assert_close(new_targets[0]["boxes"], torch.tensor([[0.0, 0.0, 64.0, 91.0]]))
    # normalised: (0.5 - mean) / std inside the image, zeros in the padding
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert_close(batch[0, :, 10, 10], (0.5 - mean) / std)
    assert torch.equal(batch[0, :, 64:, :], torch.zeros(3, 64, 128))
    assert torch.equal(batch[0, :, :, 80:], torch.zeros(3, 128, 48))


def test_bf16_autocast_training_step():
    model = tiny_model().train()
    images, targets = images_and_targets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    for v in losses.values():
        assert v.dtype == torch.float32 and torch.isfinite(v)


@pytest.mark.parametrize("channels, groups", [(256, 32), (64, 32), (48, 16), (96, 32), (32, 16), (16, 8),
                                             (2, 1), (33, 1)])
def test_head_group_norm_any_width(channels, groups):
    # GroupNorm needs groups | channels: gcd(32, C) groups, halved while that leaves one channel
    # per group (32 -> 16, 16 -> 8, 2 -> 1); 33 channels: one group of all 33
    head = RetinaHead(channels, num_anchors=2, num_classes=K, num_convs=1, norm="gn")
    gn = head.cls_tower[1]
    assert isinstance(gn, torch.nn.GroupNorm) and gn.num_groups == groups
    # one image whose last level is 1 x 1 (P7 of a small image): no group of a single value
    logits, deltas = head([torch.rand(1, channels, 3, 4), torch.rand(1, channels, 1, 1)])
    # R = (3 * 4 + 1 * 1) * 2 = 26
    assert logits.shape == (1, 26, K) and deltas.shape == (1, 26, 4)
