"""Inference-time model folding: what ``retina eval`` / ``retina predict`` run.

``inference_model(model)`` returns the eval-mode model with every BatchNorm of the ResNet trunk
(``FrozenBatchNorm2d``, or ``BatchNorm2d`` in eval mode: both the fixed affine map
``y = (x - mean) / sqrt(var + eps) * weight + bias``) folded into the convolution before it
(``torch.nn.utils.fusion.fuse_conv_bn_weights``: ``W' = W * s``, ``b' = (b - mean) * s + bias``
with ``s = weight / sqrt(var + eps)``), and the memory format chosen for the device. The
detections are those of the unfolded model up to float rounding (a test holds them within
1e-3 px, labels identical). GroupNorm (the heads' option) depends on its input's statistics and
is not folded.

Which convolution a norm follows is torchvision's ResNet contract, read from the modules: in a
``nn.Sequential`` (the stem, each ``downsample``) a norm directly after a convolution; in a
block, ``bn1`` / ``bn2`` / ``bn3`` after ``conv1`` / ``conv2`` / ``conv3``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

from retina.model.retinanet import RetinaNet

NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)

# NHWC per device for eager inference. CPU, measured by ``python -m benchmarks.inference`` (2 cores,
# quiet, R50 parity model, 800x1056): folded NCHW 0.87x / 0.98x of torchvision's time at batch
# 1 / 2, folded channels_last 0.74x / 0.81x.
CHANNELS_LAST = {"cpu": True, "cuda": True}


def _folded(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """A copy of ``conv`` that computes ``norm(conv(x))``."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    weight, bias = fuse_conv_bn_weights(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                        norm.running_mean, norm.running_var, norm.eps,
                                        norm.weight.detach(), norm.bias.detach())
    fused.weight, fused.bias = weight, bias
    return fused.requires_grad_(False).to(conv.weight.device)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every (conv, norm) pair below ``module`` in place (the norm becomes ``Identity``);
    returns how many. Call on an eval-mode model: a ``BatchNorm2d`` in training mode is refused."""
    folded = 0
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            pairs = [(a, b) for a, b in zip(names, names[1:])]
        else:
            pairs = [(f"conv{i}", f"bn{i}") for i in range(1, 4)]
        for conv_name, norm_name in pairs:
            conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, NORMS)):
                continue
            if norm.training and isinstance(norm, nn.BatchNorm2d):
                raise ValueError("fold_batchnorm needs an eval-mode model (BatchNorm2d in training mode)")
            setattr(parent, conv_name, _folded(conv, norm))
            setattr(parent, norm_name, nn.Identity())
            folded += 1
    return folded


def set_memory_format(model: RetinaNet, channels_last: bool) -> RetinaNet:
    """Weights and input batches in NHWC (``channels_last``) or NCHW, in place."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.channels_last = channels_last  # RetinaNet.preprocess lays the batch out so
    return model.to(memory_format=fmt)


def inference_model(model: RetinaNet, channels_last: bool | None = None) -> RetinaNet:
    """``model`` for eval/predict: eval mode, norms folded, memory format for its device
    (``channels_last``: None chooses by ``CHANNELS_LAST``, whatever the config says)."""
    model.eval()
    fold_batchnorm(model.backbone)
    device = next(model.parameters()).device.type
    if channels_last is None:
        channels_last = CHANNELS_LAST.get(device, False)
    return set_memory_format(model, channels_last)
