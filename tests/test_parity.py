"""Parity with torchvision's RetinaNet (retinanet_resnet50_fpn v1 and _v2) and the paper's
conventions, pinned with hand-derived numbers.

torchvision models are built with weights=None (random init), then perturbed so that detections
pass the 0.05 threshold and the BatchNorm statistics are not the identity. Images are small
(shorter side resized to 160, max 256) so the whole file runs in well under a minute on a CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops.misc import FrozenBatchNorm2d

from retina.config import find_config, load_config
from retina.deploy.convert import convert_to_model, convert_torchvision, torchvision_config
from retina.engine.checkpoint import load_model
from retina.model import build_model
from retina.model.anchors import AnchorGenerator, cell_anchors
from retina.model.backbone import FPN

MIN_SIZE, MAX_SIZE = 96, 160
SMALL = (f"model.input.min_size=[{MIN_SIZE}]", f"model.input.max_size={MAX_SIZE}")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------- helpers
def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # 90 x 118 -> scale 96/90: 125.87 wide, floored to 125 (rounding would give 126);
    # 152 x 100 -> scale 96/100: 145.92 high, floored to 145 (not 146). The batch pads to
    # 160 x 128, so P6 (3 x 2) and P7 (2 x 1) get torchvision's strides 160 // 3 = 53 and
    # 160 // 2 = 80 along y, not 64 and 128.
    return [torch.rand(3, 90, 118, generator=g), torch.rand(3, 152, 100, generator=g)]


TARGETS = [  # XYXY in each image's own pixels; labels are contiguous classes 1..4
    {"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0], [70.0, 30.0, 110.0, 85.0]]),
     "labels": torch.tensor([1, 3])},
    {"boxes": torch.tensor([[5.0, 5.0, 60.0, 50.0], [30.0, 90.0, 95.0, 140.0],
                            [60.0, 60.0, 80.0, 75.0]]), "labels": torch.tensor([2, 4, 1])},
]


def _randomise_norms(model: nn.Module, g: torch.Generator, frozen_eps: float | None) -> None:
    """Random BatchNorm statistics and affine terms (optionally swapped for FrozenBatchNorm2d with
    ``frozen_eps``, as torchvision's COCO v1 model), random GroupNorm affine terms."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            n = child.num_features
            norm = FrozenBatchNorm2d(n, eps=frozen_eps) if frozen_eps is not None else child
            with torch.no_grad():
                norm.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
                norm.bias.copy_(0.1 * torch.randn(n, generator=g))
                norm.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                norm.running_var.copy_(0.5 + torch.rand(n, generator=g))
            setattr(model, name, norm)
        elif isinstance(child, nn.GroupNorm):
            with torch.no_grad():
                child.weight.copy_(1 + 0.1 * torch.randn(child.num_channels, generator=g))
                child.bias.copy_(0.1 * torch.randn(child.num_channels, generator=g))
        else:
            _randomise_norms(child, g, frozen_eps)


def torchvision_model(variant: str, num_classes: int, off_slots: tuple[int, ...] = ()) -> nn.Module:
    """A random torchvision RetinaNet; v1 with FrozenBatchNorm eps 0 as its COCO weights."""
    torch.manual_seed(0)
    build = retinanet_resnet50_fpn if variant == "v1" else retinanet_resnet50_fpn_v2
    tv = build(weights=None, weights_backbone=None, num_classes=num_classes,
               min_size=MIN_SIZE, max_size=MAX_SIZE)
    g = torch.Generator().manual_seed(2)
    _randomise_norms(tv, g, 0.0 if variant == "v1" else None)
    with torch.no_grad():  # scores spread over (0, 1) so hundreds of boxes pass 0.05
        cls = tv.head.classification_head.cls_logits
        cls.weight.copy_(0.01 * torch.randn(cls.weight.shape, generator=g))
        cls.bias.copy_(torch.randn(cls.bias.shape, generator=g) - 2.0)
        cls.bias.view(9, num_classes)[:, list(off_slots)] = -20.0  # never-positive slots
        reg = tv.head.regression_head.bbox_reg
        reg.weight.copy_(0.002 * torch.randn(reg.weight.shape, generator=g))
    return tv.eval()


def converted(tv: nn.Module, variant: str):
    model, _, _, cat_ids = convert_to_model(tv.state_dict(), variant, overrides=SMALL)
    return model, cat_ids


def at_training_size(model: nn.Module, images: list[torch.Tensor], targets: list[dict]
                     ) -> tuple[list[torch.Tensor], list[dict]]:
    """Images and targets resized as torchvision resizes in training (its one training size, by
    ``model.input.resize``, bilinear, boxes scaled per axis): retina's model resizes nothing in
    training, the data pipeline does."""
    out_images, out_targets = [], []
    for image, target in zip(images, targets, strict=True):
        h, w = image.shape[-2:]
        size = model.inference_size(h, w)  # one training size: the inference size
        out_images.append(F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0])
        ratio = torch.tensor([size[1] / w, size[0] / h] * 2)
        out_targets.append({**target, "boxes": target["boxes"] * ratio})
    return out_images, out_targets


def assert_same_detections(ref: list[dict], out: list[dict], cat_ids: list[int]) -> None:
    for r, o in zip(ref, out, strict=True):
        assert len(r["boxes"]) == 300  # capped at detections_per_img: the cap is compared too
        assert torch.equal(torch.tensor(cat_ids)[o["labels"]], r["labels"])
        assert_close(o["boxes"], r["boxes"], atol=1e-3, rtol=0)
        assert_close(o["scores"], r["scores"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def v1():
    """torchvision's COCO layout: 91 slots, background and the 10 unused ids never positive."""
    from retina.deploy.convert import coco_classes

    real = set(coco_classes()[0])
    tv = torchvision_model("v1", 91, off_slots=tuple(s for s in range(91) if s not in real))
    with torch.no_grad():
        ref = tv(_images())
    return (tv, ref, *converted(tv, "v1"))


@pytest.fixture(scope="module")
def v2():
    tv = torchvision_model("v2", 5)
    with torch.no_grad():
        ref = tv(_images())
    return (tv, ref, *converted(tv, "v2"))


# ---------------------------------------------------------------------- torchvision parity
@pytest.mark.parametrize("image_size", [(224, 224), (800, 1344), (608, 928), (1344, 800), (96, 160)])
def test_anchors_equal_torchvision(image_size):
    h, w = image_size  # padded batch size (a multiple of 32)
    feature_sizes = [(math.ceil(h / 8), math.ceil(w / 8))]
    for _ in range(4):  # P4..P7: each a stride-2 conv of the previous, ceil(x / 2)
        feature_sizes.append(tuple(math.ceil(s / 2) for s in feature_sizes[-1]))
    tv_gen: TvAnchorGenerator = _default_anchorgen()
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    expected = tv_gen(images, [torch.zeros(1, 1, fh, fw) for fh, fw in feature_sizes])[0]
    ours = build_model(torchvision_config("v1")).anchor_generator(feature_sizes, CPU, (h, w))
    assert torch.equal(ours, expected)


def test_detections_equal_torchvision_v1_coco_slots(v1):
    _, ref, model, cat_ids = v1
    assert len(cat_ids) == 80 and cat_ids[:3] == [1, 2, 3] and cat_ids[-1] == 90
    with torch.no_grad():
        out = model(_images())
    assert_same_detections(ref, out, cat_ids)


def test_detections_equal_torchvision_v2(v2):
    _, ref, model, cat_ids = v2
    assert cat_ids == [0, 1, 2, 3, 4]
    with torch.no_grad():
        out = model(_images())
    assert_same_detections(ref, out, cat_ids)


def test_losses_equal_torchvision_v1(v1):
    # L1 box loss, each image normalised by its own positives. The class bias goes back to the
    # prior -log(99) (the perturbed one makes losses of ~450, where fp32 sums differ by 1e-4);
    # the 11 slots the conversion drops keep -20, so their focal loss is ~1e-26.
    tv, _, model, cat_ids = copy.deepcopy(v1)
    bias = torch.full((9, 91), -20.0)
    bias[:, cat_ids] = -math.log(99)
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.copy_(bias.flatten())
        model.head.cls_logits.bias.copy_(bias[:, cat_ids].flatten())
    tv.train(), model.train()
    slot = torch.tensor(cat_ids)
    tv_targets = [{"boxes": t["boxes"], "labels": slot[t["labels"]]} for t in TARGETS]
    with torch.no_grad():
        ref = tv(_images(), tv_targets)
        out = model(*at_training_size(model, _images(), copy.deepcopy(TARGETS)))
    assert_close(out["loss_cls"], ref["classification"], atol=1e-4, rtol=0)
    assert_close(out["loss_box"], ref["bbox_regression"], atol=1e-4, rtol=0)


def test_classification_loss_equals_torchvision_v2(v2):
    # v2 trains its boxes with GIoU, which retina does not implement: only the class loss
    tv, _, model, _ = copy.deepcopy(v2)
    tv.train(), model.train()  # BatchNorm2d: batch statistics in both
    with torch.no_grad():
        ref = tv(_images(), copy.deepcopy(TARGETS))
        out = model(*at_training_size(model, _images(), copy.deepcopy(TARGETS)))
    assert_close(out["loss_cls"], ref["classification"], atol=1e-4, rtol=0)


def test_convert_file_then_load_model(v1, tmp_path):
    tv, _, converted_model, _ = v1
    src, dst = tmp_path / "tv.pth", tmp_path / "retina.pth"
    torch.save({"model": tv.state_dict()}, src)  # a torchvision reference-script checkpoint
    ckpt = convert_torchvision(src, dst, "v1")
    assert ckpt["iteration"] == 0
    assert ckpt["class_names"][:2] == ["person", "bicycle"] and ckpt["class_names"][-1] == "toothbrush"
    model, cfg, names, cat_ids = load_model(dst, overrides=SMALL)
    assert cfg.model.anchors.order == "ratio_major" and cfg.model.inference.detections_per_image == 300
    assert names == ckpt["class_names"] and cat_ids == ckpt["cat_ids"]
    # the same weights and config as the model whose detections equal torchvision's above
    expected = converted_model.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert cfg.model == torchvision_config("v1", 80, SMALL).model


def test_convert_reads_the_pre_0_13_key_layout(v1):
    # torchvision < 0.13 (the COCO_V1 file's era): head convs at conv.0, conv.2, ...; FPN blocks
    # without the ".0" of Conv2dNormActivation
    state, expected = v1[0].state_dict(), v1[2].state_dict()

    def old_key(key: str) -> str:
        key = re.sub(r"(_head\.conv\.)(\d)\.0\.", lambda m: f"{m[1]}{2 * int(m[2])}.", key)
        return re.sub(r"(_blocks\.\d)\.0\.", r"\1.", key)

    old = {old_key(k): v for k, v in state.items()}
    assert "head.classification_head.conv.6.weight" in old and "backbone.fpn.inner_blocks.2.weight" in old
    from_old = convert_to_model(old, "v1", overrides=SMALL)[0].state_dict()
    assert from_old.keys() == expected.keys()
    assert all(torch.equal(from_old[k], expected[k]) for k in expected)


def test_convert_errors_name_the_file(tmp_path, v2):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        convert_torchvision(missing, tmp_path / "out.pth")
    not_retinanet = tmp_path / "resnet.pth"
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), not_retinanet)
    with pytest.raises(ValueError, match="resnet.pth does not look like a torchvision RetinaNet") as e:
        convert_torchvision(not_retinanet, tmp_path / "out.pth")
    assert "\n" not in str(e.value)
    v2_file = tmp_path / "v2.pth"
    torch.save(v2[0].state_dict(), v2_file)
    with pytest.raises(ValueError, match="v2.pth is torchvision RetinaNet v2, not v1; pass --variant v2"):
        convert_torchvision(v2_file, tmp_path / "out.pth", "v1")
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_config_files_hold_the_parity_model(variant):
    name = "torchvision_retinanet_r50_fpn" + ("_v2" if variant == "v2" else "")
    cfg = load_config(find_config(name))
    parity = torchvision_config(variant)
    # the file trains from ImageNet weights; the converted checkpoint needs none
    backbone = dataclasses.replace(cfg.model.backbone, weights=None)
    assert dataclasses.replace(cfg.model, backbone=backbone) == parity.model
    assert cfg.loss == parity.loss and cfg.eval.batch_size == 1


# ------------------------------------------------------------------ options, hand values
def test_paper_p3_cell_anchors_hand_values():
    # Sec. 4: sides 32 * 2^(k/3) = 32, 40.3175, 50.7968; ratio r = h / w: half-width
    # side / (2 sqrt(r)), half-height side * sqrt(r) / 2. r = 0.5: (side / sqrt 2, side / (2 sqrt 2));
    # r = 1: side / 2. Scale-major: the ratios cycle within each scale.
    a = cell_anchors(32, [2 ** (k / 3) for k in range(3)], [0.5, 1.0, 2.0])
    half = [(22.6274, 11.3137), (16.0, 16.0), (11.3137, 22.6274),   # side 32
            (28.5088, 14.2544), (20.1587, 20.1587), (14.2544, 28.5088),  # side 40.3175
            (35.9188, 17.9594), (25.3984, 25.3984), (17.9594, 35.9188)]  # side 50.7968
    expected = torch.tensor([[-hw, -hh, hw, hh] for hw, hh in half])
    assert_close(a, expected, atol=1e-4, rtol=0)


def test_torchvision_p3_cell_anchors_hand_values():
    # int(32 * 2^(1/3)) = int(40.32) = 40, int(32 * 2^(2/3)) = int(50.80) = 50; corners rounded:
    # r = 0.5: 32 / sqrt 2 = 22.63 -> 23, 32 / (2 sqrt 2) = 11.31 -> 11; 40: 28.28 -> 28, 14.14 -> 14;
    # 50: 35.36 -> 35, 17.68 -> 18. Ratio-major: the sizes cycle within each ratio.
    a = cell_anchors(32, [2 ** (k / 3) for k in range(3)], [0.5, 1.0, 2.0], order="ratio_major",
                     truncate_sizes=True, round_corners=True)
    half = [(23, 11), (28, 14), (35, 18),   # r = 0.5
            (16, 16), (20, 20), (25, 25),   # r = 1
            (11, 23), (14, 28), (18, 35)]   # r = 2
    assert torch.equal(a, torch.tensor([[-hw, -hh, hw, hh] for hw, hh in half], dtype=torch.float32))


def test_stride_from_image_hand_values():
    # a 224 x 224 batch with a 4 x 4 P6: torchvision spaces its anchors 224 // 4 = 56 apart, not 64
    gen = AnchorGenerator([64], [256], [1.0], [1.0], stride_from="image")
    centres_x = (gen([(4, 4)], CPU, (224, 224))[:4, 0] + 128)  # first row, left edge + half side
    assert centres_x.tolist() == [0.0, 56.0, 112.0, 168.0]
    level = AnchorGenerator([64], [256], [1.0], [1.0])  # the paper: 2^6 = 64
    assert (level([(4, 4)], CPU)[:4, 0] + 128).tolist() == [0.0, 64.0, 128.0, 192.0]
    with pytest.raises(ValueError, match="padded image size"):
        gen([(4, 4)], CPU)


def test_torchvision_resize_floors_and_round_rounds():
    tiny = ["model.num_classes=3", "model.backbone.depth=18", "model.fpn.channels=32", "model.head.num_convs=1",
            "model.input.min_size=[160]", "model.input.max_size=256"]
    img = torch.rand(3, 150, 190)  # 190 * 160 / 150 = 202.67
    rounded = build_model(load_config(None, tiny)).eval()
    floored = build_model(load_config(None, tiny + ["model.input.resize=torchvision"])).eval()
    assert rounded.preprocess([img])[1] == [(160, 203)]
    assert floored.preprocess([img])[1] == [(160, 202)]


def test_p6_from_c5_numerically():
    # Sec. 4: P6 = 3x3 stride-2 conv on C5 (not on P5); P7 = 3x3 stride-2 conv on ReLU(P6)
    torch.manual_seed(0)
    c3, c4, c5 = torch.randn(1, 4, 16, 16), torch.randn(1, 6, 8, 8), torch.randn(1, 8, 4, 4)
    fpn = FPN((4, 6, 8), 5, 3, 7, p6_from="c5")
    out = fpn([c3, c4, c5])
    assert fpn.extra[0].in_channels == 8
    assert_close(out["p6"], fpn.extra[0](c5))
    assert_close(out["p7"], fpn.extra[1](F.relu(out["p6"])))
    v1 = FPN((4, 6, 8), 5, 3, 7, p6_from="p5")  # torchvision v1
    out = v1([c3, c4, c5])
    assert_close(out["p6"], v1.extra[0](out["p5"]))


def test_norm_eps_and_conv_bias_options():
    base = ["model.num_classes=3", "model.backbone.depth=18", "model.fpn.channels=32", "model.head.num_convs=2",
            "model.head.norm=gn", "model.backbone.norm=frozen_bn"]
    model = build_model(load_config(None, base + ["model.backbone.norm_eps=0.0",
                                                  "model.head.conv_bias=false"]))
    assert model.backbone.stem[1].eps == 0.0
    assert [type(m).__name__ for m in model.head.cls_tower] == ["Conv2d", "GroupNorm", "ReLU"] * 2
    assert model.head.cls_tower[0].bias is None
    default = build_model(load_config(None, base))
    assert default.backbone.stem[1].eps == 1e-5 and default.head.cls_tower[0].bias is not None
