"""Tests for retina.model.backbone: pretrained weights (a local .pth made here, torchvision weight
names, one-line errors that name the file to place; no network is used), the light trunks
(MobileNetV3, ShuffleNetV2, RegNet) and the stages frozen when the trunk starts from trained
weights (model.backbone.weights or model.init)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from retina.config import config_from_dict, load_config
from retina.data import generate_shapes
from retina.engine.checkpoint import save_checkpoint
from retina.engine.train import Trainer
from retina.model import build_model
from retina.model.backbone import LightBackbone, ResNetBackbone, WeightsError
from tinyrun import TINY_DATA, tiny_config


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A random torchvision resnet18 with non-trivial BatchNorm statistics, saved as a .pth."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_local_pth_loads_every_tensor(resnet18_file):
    path, state = resnet18_file
    backbone = ResNetBackbone(18, str(path), freeze_at=2)
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.stem[1].running_var, state["bn1.running_var"])
    assert torch.equal(backbone.res5[1].conv2.weight, state["layer4.1.conv2.weight"])
    # pretrained: FrozenBatchNorm, stem and res2 frozen (freeze_at 2), res3.. trained
    assert isinstance(backbone.stem[1], FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.res2.parameters())
    assert all(p.requires_grad for p in backbone.res3.parameters())


def test_local_pth_through_the_config(resnet18_file):
    path, state = resnet18_file
    cfg = load_config(None, ["model.backbone.depth=18", f"model.backbone.weights={path}",
                             "model.fpn.channels=16", "model.head.num_convs=1", "model.num_classes=3"])
    model = build_model(cfg)
    assert torch.equal(model.backbone.res3[0].conv1.weight, state["layer2.0.conv1.weight"])


def test_checkpoint_dict_with_model_key_and_fc_dropped(tmp_path, resnet18_file):
    _, state = resnet18_file
    path = tmp_path / "wrapped.pth"
    torch.save({"model": state}, path)  # a training checkpoint: weights under "model"
    backbone = ResNetBackbone(18, str(path))
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])


def test_missing_file_is_one_line_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_resnet50.pth"
    with pytest.raises(WeightsError) as e:
        ResNetBackbone(50, str(missing))
    assert str(e.value) == f"backbone weights file not found: {missing}"


def test_wrong_depth_names_the_file(resnet18_file):
    path, _ = resnet18_file
    with pytest.raises(WeightsError, match="do not fit resnet50") as e:
        ResNetBackbone(50, str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unknown_torchvision_name():
    with pytest.raises(WeightsError, match="unknown torchvision weights 'ResNet18_Weights.NOPE'"):
        ResNetBackbone(18, "ResNet18_Weights.NOPE")


def test_offline_download_names_the_cache_file(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError) as e:
        ResNetBackbone(18, "ResNet18_Weights.IMAGENET1K_V1")
    msg = str(e.value)
    # resnet18-f37072fd.pth is the file name in torchvision's URL for IMAGENET1K_V1
    assert "place the file at" in msg and msg.count("resnet18-f37072fd.pth") == 2
    assert "checkpoints" in msg and "\n" not in msg


# ----------------------------------------------------------------- light trunks
# The MobileNetV3 paper's Tables 1 and 2 (torchvision's ``features``, one layer per row): the
# last layer at strides 2, 4, 8, 16, 32, and the widths of C3, C4, C5 (C5: the final 1x1 conv).
# The ShuffleNetV2 paper's Table 5: Conv1 (stride 2, 24), MaxPool (4), Stage2, 3, 4 (8, 16, 32;
# 116, 232, 464 at 1x and 176, 352, 704 at 1.5x); Conv5 (1024) feeds only the classifier.
LIGHT_STAGES = {"mobilenet_v3_large": ([1, 3, 6, 12, 16], (40, 112, 960)),
                "mobilenet_v3_small": ([0, 1, 3, 8, 12], (24, 48, 576)),
                "shufflenet_v2_x1_0": ([0, 1, 2, 3, 4], (116, 232, 464)),
                "shufflenet_v2_x1_5": ([0, 1, 2, 3, 4], (176, 352, 704)),
                # stem, then the four stages s1-s4 of torchvision's RegNetX-400MF (widths 32, 64,
                # 160, 400) and RegNetY-400MF (48, 104, 208, 440)
                "regnet_x_400mf": ([0, 1, 2, 3, 4], (64, 160, 400)),
                "regnet_y_400mf": ([0, 1, 2, 3, 4], (104, 208, 440))}


@pytest.mark.parametrize("arch", sorted(LIGHT_STAGES))
def test_light_trunk_levels_by_hand(arch):
    ends, channels = LIGHT_STAGES[arch]
    backbone = LightBackbone(arch).eval()
    assert backbone._stage_ends == ends and backbone.out_channels == channels
    with torch.no_grad():
        c3, c4, c5 = backbone(torch.zeros(1, 3, 64, 96))
    # strides 8, 16, 32 of a 64 x 96 image
    assert [tuple(c.shape) for c in (c3, c4, c5)] == [(1, channels[0], 8, 12), (1, channels[1], 4, 6),
                                                     (1, channels[2], 2, 3)]
    # not pretrained: BatchNorm, nothing frozen; the stages partition the layers
    assert all(p.requires_grad for p in backbone.parameters())
    assert sum(len(s) for s in backbone.stages) == len(backbone.features) == ends[-1] + 1


@pytest.fixture(scope="module")
def mobilenet_small_file(tmp_path_factory):
    """A random torchvision mobilenet_v3_small, classifier included, saved as a .pth."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small_random.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_mobilenet_local_pth_loads_and_freezes(mobilenet_small_file):
    path, state = mobilenet_small_file
    backbone = LightBackbone("mobilenet_v3_small", str(path), freeze_at=2)
    assert torch.equal(backbone.features[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(backbone.features[12][1].running_var, state["features.12.1.running_var"])
    assert isinstance(backbone.features[0][1], FrozenBatchNorm2d)
    # freeze_at 2: the layers of stride <= 4 (features 0 and 1), as ResNet's stem and res2
    assert not any(p.requires_grad for p in backbone.features[:2].parameters())
    assert all(p.requires_grad for p in backbone.features[2:].parameters())
    with pytest.raises(WeightsError, match="do not fit mobilenet_v3_large") as e:
        LightBackbone("mobilenet_v3_large", str(path))
    assert "\n" not in str(e.value)


def test_mobilenet_weights_keep_its_batchnorm_eps(tmp_path):
    """torchvision builds MobileNetV3's BatchNorms with eps 1e-3, and its ImageNet weights were
    trained so: with norm_eps null the loaded trunk is torchvision's function; a set norm_eps
    wins. With running variances of 0.05-0.2 (a trained net's scale), eps 1e-5 instead would
    scale each norm by up to sqrt(0.051 / 0.05001), ~1% apart, compounded over 34 norms: far
    outside float32 rounding."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.05, 0.2)
    path = tmp_path / "mobilenet.pth"
    torch.save(net.state_dict(), path)
    backbone = LightBackbone("mobilenet_v3_small", str(path))
    norms = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(norms) == FOLDED["mobilenet_v3_small"] and all(m.eps == 1e-3 for m in norms)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = net.eval().features(x)
        torch.testing.assert_close(backbone(x)[2], ref)
        set_eps = LightBackbone("mobilenet_v3_small", str(path), norm_eps=1e-5)
        assert all(m.eps == 1e-5 for m in set_eps.modules() if isinstance(m, FrozenBatchNorm2d))
        assert not torch.allclose(set_eps(x)[2], ref)
    # the config's null reaches the trunk; ResNet's own eps is 1e-5
    model = build_model(load_config(None, ["model.backbone.type=mobilenet_v3_small", "model.num_classes=3"]))
    assert {m.eps for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    resnet = ResNetBackbone(18)
    assert {m.eps for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-5}


def test_shufflenet_local_pth_loads_into_frozen_batchnorm(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.shufflenet_v2_x1_0(weights=None)
    for m in net.modules():  # statistics that differ from a fresh BatchNorm's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "shufflenet.pth"
    torch.save(net.state_dict(), path)
    backbone = LightBackbone("shufflenet_v2_x1_0", str(path), freeze_at=2, norm_eps=0.0)
    norms = [m for m in backbone.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) and m.eps == 0.0 for m in norms)
    assert torch.equal(backbone.features[0][1].running_var, net.conv1[1].running_var)
    assert torch.equal(backbone.features[4][3].branch2[6].running_var, net.stage4[3].branch2[6].running_var)
    # the same function as torchvision's net up to stage4 (FrozenBN is eval-mode BN)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = net.eval().stage4(net.stage3(net.stage2(net.maxpool(net.conv1(x)))))
        # BN's eps is 1e-5 where ours is 0.0: a relative 1e-5 / var difference
        torch.testing.assert_close(backbone(x)[2], ref, atol=1e-3, rtol=1e-3)
    # freeze_at 2: conv1 (stride 2) and the max-pool (stride 4, no weights)
    assert not any(p.requires_grad for p in backbone.features[0].parameters())
    assert all(p.requires_grad for p in backbone.features[2:].parameters())


# BatchNorms that fold at inference. MobileNetV3-small: stem 1; 11 blocks, the first without an
# expansion conv 2, the others 3; the final 1x1 conv 1. ShuffleNetV2: conv1 1; per stage, the
# stride-2 unit 2 (branch1) + 3 (branch2), each other unit 3 (branch2), with 4, 8, 4 units.
# RegNetX-400MF: stem 1; 1 + 2 + 7 + 12 bottleneck blocks of 3, and each stage's first block's
# projection 1.
FOLDED = {"mobilenet_v3_small": 1 + 2 + 10 * 3 + 1,
          "shufflenet_v2_x1_0": 1 + (5 + 3 * 3) + (5 + 7 * 3) + (5 + 3 * 3),
          "regnet_x_400mf": 1 + 3 * (1 + 2 + 7 + 12) + 4}


@pytest.mark.parametrize("arch", sorted(FOLDED))
def test_light_trunk_through_the_config_trains_and_folds(arch):
    from retina.deploy.fuse import fold_batchnorm, inference_model

    torch.manual_seed(0)
    cfg = load_config(None, [f"model.backbone.type={arch}", "model.fpn.channels=16",
                             "model.head.num_convs=1", "model.num_classes=2"])
    model = build_model(cfg).train()
    assert isinstance(model.backbone, LightBackbone)
    images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)] * 2
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 80.0]]), "labels": torch.tensor([1])}] * 2
    losses = model(images, targets)
    sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.features[0][0].weight.grad is not None
    # inference: every BatchNorm folds, and the detections stay
    model.eval()
    with torch.inference_mode():
        ref = model(images[:1])[0]
    assert fold_batchnorm(copy.deepcopy(model).backbone) == FOLDED[arch]
    folded = inference_model(model)
    with torch.inference_mode():
        out = folded(images[:1])[0]
    assert torch.equal(out["labels"], ref["labels"])
    torch.testing.assert_close(out["boxes"], ref["boxes"], atol=1e-3, rtol=0)


def test_mobilenet_depth_is_a_config_error():
    from retina.config.errors import ConfigError

    with pytest.raises(ConfigError, match="model.backbone.depth=18 does not apply to "
                                          "model.backbone.type=mobilenet_v3_small"):
        load_config(None, ["model.backbone.type=mobilenet_v3_small", "model.backbone.depth=18"])


# ------------------------------------------------------------- frozen stages of a trained trunk
STEM_AND_RES2 = ("stem", "res2")


def test_freeze_at_applies_with_backbone_weights_or_init_and_only_then(resnet18_file, tmp_path):
    # the trunk starts from trained weights through model.backbone.weights (read at the build) or
    # model.init (a retina checkpoint loaded after it): freeze_at 2 freezes the stem and res2 in
    # either case, and nothing without trained weights
    path, _ = resnet18_file
    base = ["model.backbone.depth=18", "model.fpn.channels=16", "model.head.num_convs=1", "model.num_classes=3"]
    with_weights = build_model(load_config(None, base + [f"model.backbone.weights={path}"]))
    with_init = build_model(config_from_dict({}, base + [f"model.init={tmp_path / 'never_read.pth'}",
                                                         "model.backbone.freeze_at=2"]), pretrained=False)
    plain = build_model(load_config(None, base))
    for model in (with_weights, with_init):
        trunk = model.backbone
        assert not any(p.requires_grad for name in STEM_AND_RES2 for p in getattr(trunk, name).parameters())
        assert all(p.requires_grad for p in trunk.res3.parameters())
    assert all(p.requires_grad for p in plain.backbone.parameters())


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, **TINY_DATA)
    return root


@pytest.mark.parametrize("freeze_at", [2, 0])
def test_training_from_init_keeps_the_frozen_stem(shapes_root, tmp_path, freeze_at):
    # torchvision's recipe from a converted COCO detector: --init, model.backbone.weights null,
    # FrozenBN, freeze_at 2. Two AdamW steps (lr 0.002, no warmup) move every trained weight.
    source = build_model(tiny_config(shapes_root, model={"num_classes": 3}), pretrained=False).state_dict()
    init = save_checkpoint({"model": source, "class_names": ["circle", "square", "triangle"]},
                           tmp_path / "detector.pth")
    cfg = tiny_config(shapes_root, model={"num_classes": 3, "init": str(init),
                                          "backbone": {"norm": "frozen_bn", "freeze_at": freeze_at}},
                      solver={"max_iter": 2, "batch_size": 2, "warmup_iters": 0},
                      train={"eval_at_end": False})
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    trunk = trainer.model.backbone
    assert torch.equal(trunk.stem[0].weight, source["backbone.stem.0.weight"])  # loaded from init
    stem, res3 = trunk.stem[0].weight.detach().clone(), trunk.res3[0].conv1.weight.detach().clone()
    trainer.train()
    assert torch.equal(trunk.stem[0].weight, stem) is (freeze_at == 2)  # frozen: not one bit moves
    assert not torch.equal(trunk.res3[0].conv1.weight, res3)  # res3 trains either way
