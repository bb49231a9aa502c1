"""RetinaNet: normalise/resize/pad -> ResNet + FPN -> shared heads -> (loss | decode).

torchvision's calling convention, so models can be swapped: ``model(images)`` in eval mode returns
detections in each input image's own pixel coordinates; ``model(images, targets)`` in training
mode returns ``{"loss_cls", "loss_box", "num_pos"}`` (see ``compute_loss``: the ``loss_*`` terms
are summed and trained, ``num_pos`` is a count to log). The model knows nothing of files, YAML or
logging.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retina.model.assigner import TargetAssigner, pad_targets
from retina.model.losses import EMA_INIT, LossSettings, retinanet_losses
from retina.model.anchors import AnchorGenerator
from retina.model.backbone import FPN, ResNetBackbone
from retina.model.head import RetinaHead
from retina.model.postprocess import PostProcessor


@dataclass(frozen=True)
class InputSpec:
    """How images become a padded, normalised batch."""

    min_size: tuple[int, ...]
    max_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    size_divisibility: int
    resize: str = "round"  # "round" | "torchvision", see InputConfig.resize


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Scale that brings the shorter side to ``min_size`` without the longer passing ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def _axis_scale(new_size: Sequence[int], old_size: Sequence[int]) -> Tensor:
    """(4,) factors (sx, sy, sx, sy) that take XYXY boxes from ``old_size`` (h, w) to ``new_size``."""
    sy, sx = new_size[0] / old_size[0], new_size[1] / old_size[1]
    return torch.tensor([sx, sy, sx, sy], dtype=torch.float32)


class RetinaNet(nn.Module):
    def __init__(self, backbone: ResNetBackbone, fpn: FPN, head: RetinaHead,
                 anchor_generator: AnchorGenerator, assigner: TargetAssigner, loss_settings: LossSettings,
                 postprocessor: PostProcessor, input_spec: InputSpec, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone, self.fpn, self.head = backbone, fpn, head
        self.anchor_generator = anchor_generator
        self.assigner = assigner
        self.loss_settings = loss_settings
        # The running positive count of loss.normalizer=ema (detectron2's), in the state dict so
        # a resumed run continues it exactly; checkpoints before it moved here had "loss.num_pos_ema".
        self.register_buffer("num_pos_ema", torch.tensor(EMA_INIT))
        self.register_load_state_dict_pre_hook(_rename_old_keys)
        self.postprocessor = postprocessor
        self.input_spec = input_spec
        self.channels_last = channels_last
        self.register_buffer("pixel_mean", torch.tensor(input_spec.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(input_spec.pixel_std).view(3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    # ------------------------------------------------------------------------------- input
    def _target_size(self, height: int, width: int) -> int:
        sizes = self.input_spec.min_size
        if not self.training:
            return sizes[-1]
        # Images the data pipeline already resized to an allowed size are kept as they are.
        for s in sizes:
            if abs(resize_scale(height, width, s, self.input_spec.max_size) - 1) < 1e-2:
                return s
        return random.choice(sizes)

    def preprocess(self, images: Sequence[Tensor], targets: Optional[list[dict]] = None
                   ) -> tuple[Tensor, list[tuple[int, int]], list[float], Optional[list[dict]]]:
        """Resize each (3, H, W) image in [0, 1], normalise, pad to (N, 3, H', W').

        Returns the batch, each image's size after resizing, each image's scale factor and the
        targets with boxes scaled to match.
        """
        spec = self.input_spec
        resized, sizes, scales = [], [], []
        new_targets = [] if targets is not None else None
        for i, img in enumerate(images):
            h, w = img.shape[-2:]
            scale = resize_scale(h, w, self._target_size(h, w), spec.max_size)
            if spec.resize == "torchvision":
                img = self._resize_torchvision(img, scale)
            else:
                if abs(scale - 1) > 1e-3:
                    size = (round(h * scale), round(w * scale))
                    img = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
                else:
                    scale = 1.0
                img = (img.float() - self.pixel_mean) / self.pixel_std
            resized.append(img)
            sizes.append((img.shape[-2], img.shape[-1]))
            scales.append(scale)
            if targets is not None:
                t = dict(targets[i])
                # per-axis ratio of the rounded size, so box edges stay on the image edges
                t["boxes"] = t["boxes"] * _axis_scale(img.shape[-2:], (h, w)).to(t["boxes"].device)
                new_targets.append(t)
        d = spec.size_divisibility
        ph = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        pw = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = resized[0].new_zeros((len(resized), 3, ph, pw))
        for i, img in enumerate(resized):
            batch[i, :, : img.shape[1], : img.shape[2]] = img
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, sizes, scales, new_targets

    def _resize_torchvision(self, img: Tensor, scale: float) -> Tensor:
        """GeneralizedRCNNTransform's arithmetic: normalise first, then always interpolate by
        ``scale`` with recompute_scale_factor=True, so each side becomes floor(side * scale)."""
        img = (img.float() - self.pixel_mean) / self.pixel_std
        return F.interpolate(img[None], scale_factor=scale, mode="bilinear",
                             recompute_scale_factor=True, align_corners=False)[0]

    # ----------------------------------------------------------------------------- forward
    def forward(self, images: Sequence[Tensor], targets: Optional[list[dict]] = None):
        """Training mode: ``{"loss_cls", "loss_box", "num_pos"}`` (``compute_loss``: sum the
        ``loss_*`` terms; ``num_pos`` is the batch's positive anchors, logged, never added).
        Eval mode: per image a dict of ``boxes`` (D, 4) XYXY in its own pixels, ``scores`` (D,),
        ``labels`` (D,)."""
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        batch, sizes, _, targets = self.preprocess(images, targets)
        features = list(self.fpn(self.backbone(batch)).values())
        pred_logits, pred_deltas = self.head(features)  # (N, R, K), (N, R, 4)
        feature_sizes = [tuple(f.shape[-2:]) for f in features]
        anchors = self.anchor_generator(feature_sizes, batch.device, tuple(batch.shape[-2:]))  # (R, 4)
        if self.training:
            return self.compute_loss(pred_logits, pred_deltas, targets, anchors)
        detections = self.postprocessor(pred_logits, pred_deltas, anchors,
                                        self.anchor_generator.num_anchors_per_level(feature_sizes), sizes)
        for det, size, img in zip(detections, sizes, images):
            h, w = img.shape[-2:]
            # undo the resize per axis: the rounded size, not the nominal scale, maps the edges
            boxes = det["boxes"] / _axis_scale(size, (h, w)).to(det["boxes"].device)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            det["boxes"] = boxes
        return detections

    def compute_loss(self, pred_logits: Tensor, pred_deltas: Tensor, targets: list[dict],
                     anchors: Tensor) -> dict[str, Tensor]:
        """Training-mode result: assign the batch's targets to the anchors, then the loss.

        pred_logits (N, R, K), pred_deltas (N, R, 4), anchors (R, 4) XYXY, targets: N dicts of
        ``boxes`` (M_i, 4) XYXY in the resized images' pixels and ``labels`` (M_i,). Returns
        ``loss_cls`` and ``loss_box`` (scalars, fp32; their sum is the training loss) and
        ``num_pos`` (scalar fp32, no gradient: the anchors assigned to a box in this batch on
        this process, for logging; not a loss, so not to be added). With ``loss.normalizer=ema``
        each call advances the ``num_pos_ema`` buffer.
        """
        gt = self.assigner(pad_targets(targets, pred_logits.device), anchors)
        out = retinanet_losses(pred_logits, pred_deltas, gt.gt_classes, gt.gt_deltas, self.loss_settings,
                               anchors, self.num_pos_ema)  # anchors: OHEM's NMS
        if out.num_pos_ema is not None:
            self.num_pos_ema.copy_(out.num_pos_ema)
        return {**out.losses, "num_pos": out.num_pos}


def _rename_old_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-time map of state-dict keys that moved: ``loss.num_pos_ema`` (the loss was a module)
    is now the model's ``num_pos_ema``."""
    old = prefix + "loss.num_pos_ema"
    if old in state_dict:
        state_dict.setdefault(prefix + "num_pos_ema", state_dict.pop(old))
