"""ResNet bottom-up pathway (torchvision.models) and the FPN top-down pathway, P3..P7 (Sec. 4)."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from retina.errors import RetinaError

RESNET_CHANNELS = {18: (128, 256, 512), 34: (128, 256, 512), 50: (512, 1024, 2048),
                   101: (512, 1024, 2048)}  # C3, C4, C5 widths


class WeightsError(RetinaError, RuntimeError):
    """Pretrained weights could not be found; the message says which file to place where."""


def _load_state_dict(arch: str, weights: str) -> dict:
    """The state dict ``weights`` names for torchvision's ``arch`` (e.g. "resnet50"): a local
    .pth/.pt file or a torchvision weights name."""
    path = Path(weights).expanduser()
    if weights.endswith((".pth", ".pt")) or path.exists():
        if not path.is_file():
            raise WeightsError(f"backbone weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("model", state) if isinstance(state, dict) else state
    enum = torchvision.models.get_model_weights(arch)
    name = weights.split(".")[-1]
    try:
        w = enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise WeightsError(f"unknown torchvision weights '{weights}' for {arch}; "
                           f"choose from {[m.name for m in enum]} or give a .pth path") from None
    try:
        return w.get_state_dict(progress=False)
    except Exception as e:  # offline: tell the user exactly where to put the file
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        raise WeightsError(f"cannot download {w.url} ({type(e).__name__}); place the file at "
                           f"{cache} or set model.backbone.weights to a local .pth path") from None


def _load_weights(net: nn.Module, arch: str, weights: str, classifier: str) -> None:
    """Load ``weights`` into torchvision's ``net`` without its ImageNet ``classifier`` (the
    prefix of its keys); a tensor of the wrong shape, a missing or an unexpected key is a
    one-line ``WeightsError``."""
    state = {k: v for k, v in _load_state_dict(arch, weights).items() if not k.startswith(classifier)}
    shapes = net.state_dict()
    wrong = [k for k, v in state.items() if k in shapes and shapes[k].shape != v.shape]
    if wrong:  # load_state_dict would raise a multi-line RuntimeError
        raise WeightsError(f"backbone weights {weights} do not fit {arch}: "
                           f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, "
                           f"{arch} needs {tuple(shapes[wrong[0]].shape)}")
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing or unexpected:
        raise WeightsError(f"backbone weights {weights} do not fit {arch}: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def _norm_class(norm: str, weights: str | None) -> type[nn.Module]:
    """FrozenBatchNorm for ``frozen_bn``, or for ``auto`` with pretrained weights; else BatchNorm."""
    frozen = norm == "frozen_bn" or (norm == "auto" and weights is not None)
    return FrozenBatchNorm2d if frozen else nn.BatchNorm2d


class Trunk(nn.Module):
    """A bottom-up pathway: ``forward`` gives C3, C4, C5 (``out_channels`` wide); ``stages``
    lists what ``freeze_at`` counts, from the input on."""

    out_channels: tuple[int, int, int]

    @property
    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def freeze(self, freeze_at: int) -> None:
        """Stop training the first ``freeze_at`` stages."""
        for stage in self.stages[:freeze_at]:
            stage.requires_grad_(False)


class ResNetBackbone(Trunk):
    """Returns C3, C4, C5 of a torchvision ResNet.

    ``weights`` (pretrained, see ``_load_state_dict``) also decide the norm: ``norm="auto"``
    means FrozenBatchNorm with them. ``load_weights=False`` keeps that decision but neither
    fetches nor reads the weights (a checkpoint fills them). The first ``freeze_at`` stages
    (``stages``) stop training; whether a trunk's stages are pretrained, so frozen, is
    ``build_model``'s decision (``model.backbone.weights`` or ``model.init``).
    """

    def __init__(self, depth: int, weights: str | None = None, norm: str = "auto",
                 freeze_at: int = 0, norm_eps: float | None = None, load_weights: bool = True) -> None:
        super().__init__()
        eps = 1e-5 if norm_eps is None else norm_eps  # None: torchvision's ResNet eps
        norm_layer = partial(_norm_class(norm, weights), eps=eps)
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm_layer)
        if weights is not None and load_weights:
            _load_weights(net, f"resnet{depth}", weights, "fc.")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.res2, self.res3, self.res4, self.res5 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = RESNET_CHANNELS[depth]
        self.freeze(freeze_at)

    @property
    def stages(self) -> list[nn.Module]:
        """What ``freeze_at`` counts: the stem (stride 4), then res2..res5 (strides 4..32)."""
        return [self.stem, self.res2, self.res3, self.res4, self.res5]

    def forward(self, x: Tensor) -> list[Tensor]:
        c2 = self.res2(self.stem(x))
        c3 = self.res3(c2)
        c4 = self.res4(c3)
        c5 = self.res5(c4)
        return [c3, c4, c5]


def _light_layers(arch: str) -> tuple[nn.Module, nn.Sequential, str]:
    """(torchvision's ``arch``, its feature layers in order, the key prefix of its ImageNet
    classifier). ShuffleNetV2's feature layers end at stage4 (conv5, the 1x1 to 1024 channels,
    feeds only the classifier; mmdet's ShuffleNet detectors take stage2-4 too); RegNet's are its
    stem and four stages (as in mmdet's and detectron2's RegNet detectors)."""
    net = getattr(torchvision.models, arch)(weights=None)
    if arch.startswith("mobilenet"):
        return net, net.features, "classifier."
    if arch.startswith("regnet"):
        return net, nn.Sequential(net.stem, *net.trunk_output), "fc."
    return net, nn.Sequential(net.conv1, net.maxpool, net.stage2, net.stage3, net.stage4), "fc."


def _replace_batchnorms(module: nn.Module, layer: type[nn.Module], eps: float | None) -> None:
    """Every ``nn.BatchNorm2d`` of ``module`` rebuilt as ``layer`` (BatchNorm or FrozenBatchNorm)
    with ``eps`` (None: the replaced layer's), its affine parameters and statistics kept."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            norm = layer(child.num_features, eps=child.eps if eps is None else eps)
            norm.load_state_dict(child.state_dict(), strict=False)  # FrozenBN has no num_batches_tracked
            setattr(module, name, norm)
        else:
            _replace_batchnorms(child, layer, eps)


class LightBackbone(Trunk):
    """Returns C3, C4, C5 of a torchvision light trunk, MobileNetV3, ShuffleNetV2 or RegNet:
    the outputs of its last feature layer at strides 8, 16 and 32 (as torchvision's
    ``mobilenet_backbone`` takes its stages), for a CPU budget: at 256 x 352, batch 8, a
    forward and backward pass of the trunk alone took 0.16 s for ``mobilenet_v3_small``, 0.21 s
    for ``shufflenet_v2_x1_0``, 0.32 s for ``_x1_5``, 0.47 s for ``regnet_x_400mf`` and 0.55 s
    for ``mobilenet_v3_large``, against 1.20 s for ResNet-18 (2-core AVX2 CPU, fp32).
    ``weights``, ``norm``, ``freeze_at`` and ``load_weights`` as ``ResNetBackbone``'s; its
    stages are the layers of output stride <= 2, 4, 8, 16, 32."""

    def __init__(self, arch: str, weights: str | None = None, norm: str = "auto", freeze_at: int = 0,
                 norm_eps: float | None = None, load_weights: bool = True) -> None:
        super().__init__()
        net, self.features, classifier = _light_layers(arch)
        if weights is not None and load_weights:
            _load_weights(net, arch, weights, classifier)
        # after loading, as ShuffleNetV2 takes no norm_layer: torchvision's BatchNorms give way
        # to the configured kind, with their own eps (MobileNetV3's 1e-3) unless norm_eps is set;
        # their momentum is BatchNorm's default 0.1 as in ResNet (MobileNetV3's was 0.01)
        _replace_batchnorms(self.features, _norm_class(norm, weights), norm_eps)
        strides, channels = _probe(self.features)  # one per layer
        self._stage_ends = [max(i for i, s in enumerate(strides) if s <= 2**k) for k in range(1, 6)]
        self.out_channels = tuple(channels[i] for i in self._stage_ends[2:])
        self.freeze(freeze_at)

    @property
    def stages(self) -> list[nn.Module]:
        """What ``freeze_at`` counts: the layers of output stride <= 2, then 4, 8, 16, 32."""
        starts = [0] + [end + 1 for end in self._stage_ends[:-1]]
        return [self.features[a:b + 1] for a, b in zip(starts, self._stage_ends)]

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._stage_ends[2:]:
                outs.append(x)
        return outs  # C3, C4, C5


@torch.no_grad()
def _probe(layers: nn.Sequential) -> tuple[list[int], list[int]]:
    """Each layer's output stride and channels, from one eval-mode pass of a 64 x 64 image
    (running statistics untouched)."""
    was_training = layers.training
    layers.eval()
    x, strides, channels = torch.zeros(1, 3, 64, 64), [], []
    for layer in layers:
        x = layer(x)
        strides.append(64 // x.shape[-1])
        channels.append(x.shape[1])
    layers.train(was_training)
    return strides, channels


class FPN(nn.Module):
    """P3..P5 by lateral 1x1 + top-down nearest upsampling + 3x3 output convs; P6, P7 by
    stride-2 3x3 convs (P6 on C5 per the paper, or on P5 as torchvision v1; P7 on ReLU(P6))."""

    def __init__(self, in_channels: tuple[int, int, int], channels: int, min_level: int = 3,
                 max_level: int = 7, p6_from: str = "c5") -> None:
        super().__init__()
        self.min_level, self.max_level = min_level, max_level
        self.p6_from = p6_from
        # Pyramid levels from the backbone: C3..C5 (levels below 3 are not supported here).
        self.backbone_levels = [lvl for lvl in (3, 4, 5) if lvl >= min_level]
        used = in_channels[len(in_channels) - len(self.backbone_levels):]
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in used)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in used)
        extra_in = in_channels[-1] if p6_from == "c5" else channels
        self.extra = nn.ModuleList()
        for i, _ in enumerate(range(6, max_level + 1)):
            self.extra.append(nn.Conv2d(extra_in if i == 0 else channels, channels, 3, stride=2, padding=1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # detectron2's c2_xavier_fill
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> "OrderedDict[str, Tensor]":
        c = feats[len(feats) - len(self.backbone_levels):]
        out = [self.lateral[-1](c[-1])]
        for i in range(len(c) - 2, -1, -1):
            top_down = F.interpolate(out[0], size=c[i].shape[-2:], mode="nearest")
            out.insert(0, self.lateral[i](c[i]) + top_down)
        out = [conv(p) for conv, p in zip(self.output, out)]
        x = feats[-1] if self.p6_from == "c5" else out[-1]
        for i, conv in enumerate(self.extra):
            x = conv(x if i == 0 else F.relu(x))
            out.append(x)
        levels = self.backbone_levels + list(range(6, self.max_level + 1))
        return OrderedDict((f"p{lvl}", p) for lvl, p in zip(levels, out) if lvl <= self.max_level)
