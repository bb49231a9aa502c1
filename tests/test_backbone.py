"""Tests for retina.model.backbone's pretrained weights: a local .pth made here, torchvision weight
names, and one-line errors that name the file to place (no network is used)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from retina.config import load_config
from retina.model import build_model
from retina.model.backbone import ResNetBackbone, WeightsError


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
    backbone = ResNetBackbone(18, str(path))
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
                             "model.fpn.channels=16", "model.head.num_convs=1"])
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
