"""RetinaNet: normalise/resize/pad -> ResNet + FPN -> shared heads -> (loss | decode).

torchvision's calling convention, so models can be swapped: ``model(images)`` in eval mode returns
detections in each input image's own pixel coordinates; ``model(images, targets)`` in training
mode returns ``{"loss_cls", "loss_box", "num_pos"}`` (see ``compute_loss``: the ``loss_*`` terms
are summed and trained, ``num_pos`` is a count to log). The model knows nothing of files, YAML or
logging.

What the model expects (``images``: N tensors (3, H, W), RGB, each its own size):

- dtype: ``uint8`` in 0..255, as the datasets and ``read_image`` give them (the model converts
  them to float / 255 itself, once, on their device), or floating point in [0, 1]
  (torchvision's convention: ``model(images)`` works on what torchvision's detectors take).
  Any other dtype is refused.
- eval mode: images of any size. Each is resized to ``inference_size``, the rule of
  ``retina.model.resize`` at the test size (``eval_size``: shorter side ``test_min_size``, by
  default ``min_size[-1]``, longer at most ``test_max_size``, by default ``max_size``), and the
  detections are mapped back to and clipped to the input image's pixels. The resize is part of
  the model, so an exported graph takes raw images too.
- training mode: images at their training size, with targets in their pixels. The training
  size is the data pipeline's decision and its resize (``retina.data.transforms``: a shorter
  side drawn from ``min_size`` by the seeded, resumable sample stream); the model resizes nothing
  in training, it only converts, normalises and pads. A caller that trains on images of its own
  resizes them first (``retina.data.transforms.resize`` is the pipeline's).

Test-time augmentation is a wrapper around the model (``retina.model.tta``), not part of it.

Shape legend: N images, R anchors per image, M ground-truth boxes, D detections of one image,
K classes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from retina.config.schema import InputConfig, LossConfig
from retina.model.assigner import TargetAssigner, pad_targets
from retina.model.losses import EMA_INIT, retinanet_losses
from retina.model.anchors import AnchorGenerator
from retina.model.backbone import FPN, Trunk
from retina.model.head import RetinaHead
from retina.model.postprocess import PostProcessor
from retina.model.resize import axis_scale, eval_size, resize_scale, resized_size


def to_float(image: Tensor) -> Tensor:
    """A (3, H, W) image as float32 in [0, 1]: uint8 is divided by 255; floating point is taken
    to be in [0, 1] already (torchvision's convention) and only cast."""
    if image.dtype == torch.uint8:
        return image.float() / 255
    if image.is_floating_point():
        return image.float()
    raise ValueError(f"images should be uint8 (0..255) or float in [0, 1], got {image.dtype}")


class RetinaNet(nn.Module):
    """The detector (see the module docstring for what it expects). ``loss_settings`` and
    ``input_spec`` are the config's own ``loss`` and ``model.input`` sections."""

    def __init__(self, backbone: Trunk, fpn: FPN, head: RetinaHead,
                 anchor_generator: AnchorGenerator, assigner: TargetAssigner, loss_settings: LossConfig,
                 postprocessor: PostProcessor, input_spec: InputConfig, channels_last: bool = False) -> None:
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
    @property
    def eval_size(self) -> tuple[int, int]:
        """(shorter side, longer-side cap) of inference: ``retina.model.resize.eval_size``."""
        spec = self.input_spec
        return eval_size(spec.min_size, spec.max_size, spec.test_min_size, spec.test_max_size)

    def inference_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') an H x W input is resized to in eval mode: ``resized_size`` at ``eval_size``
        by ``input_spec.resize``. The one size eval and predict inputs get (the exported graph
        computes the same in tensors, ``retina.deploy.graph.resized_size_tensor``)."""
        return resized_size(height, width, *self.eval_size, self.input_spec.resize)

    def preprocess(self, images: Sequence[Tensor], targets: Optional[list[dict]] = None
                   ) -> tuple[Tensor, list[tuple[int, int]], list[float], Optional[list[dict]]]:
        """Convert, resize (eval mode: ``inference_size``; training mode: none, see the module
        docstring), normalise and pad N images (3, H, W), uint8 or float in [0, 1], to one
        (N, 3, H', W') batch.

        Returns the batch, each image's size after resizing, each image's scale factor (1.0 when
        not resized) and the targets with boxes moved to the resized images.
        """
        spec = self.input_spec
        resized, sizes, scales = [], [], []
        new_targets = [] if targets is not None else None
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"images should be (3, H, W) tensors; image {i} is {tuple(image.shape)}")
            h, w = image.shape[-2:]
            size = (h, w) if self.training else self.inference_size(h, w)
            img = self._resize_and_normalise(to_float(image), size)  # (3, H', W')
            resized.append(img)
            sizes.append(size)
            scales.append(1.0 if size == (h, w) else resize_scale(h, w, *self.eval_size))
            if targets is not None:
                t = dict(targets[i])
                # per-axis ratio of the rounded size, so box edges stay on the image edges
                t["boxes"] = t["boxes"] * axis_scale(size, (h, w)).to(t["boxes"].device)  # (M, 4)
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

    def _resize_and_normalise(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """Float (3, H, W) in [0, 1] -> normalised (3, H', W'), bilinear. ``"round"`` resizes, then
        normalises; ``"torchvision"`` normalises first, as GeneralizedRCNNTransform does."""
        if self.input_spec.resize == "torchvision":
            return _bilinear((image - self.pixel_mean) / self.pixel_std, size)
        return (_bilinear(image, size) - self.pixel_mean) / self.pixel_std

    # ----------------------------------------------------------------------------- forward
    def forward(self, images: Sequence[Tensor], targets: Optional[list[dict]] = None):
        """Training mode: ``{"loss_cls", "loss_box", "num_pos"}`` (``compute_loss``: sum the
        ``loss_*`` terms; ``num_pos`` is the batch's positive anchors, logged, never added).
        Eval mode: per image a dict of ``boxes`` (D, 4) XYXY in its own pixels, ``scores`` (D,),
        ``labels`` (D,)."""
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        batch, sizes, _, targets = self.preprocess(images, targets)
        features = self.features(batch)
        pred_logits, pred_deltas = self.head(features)  # (N, R, K), (N, R, 4)
        anchors, per_level = self.anchors_of(features, batch)  # (R, 4), R split by level
        if self.training:
            return self.compute_loss(pred_logits, pred_deltas, targets, anchors, per_level)
        detections = self.postprocessor(pred_logits, pred_deltas, anchors, per_level, sizes)
        for det, size, img in zip(detections, sizes, images):
            h, w = img.shape[-2:]
            # undo the resize per axis: the rounded size, not the nominal scale, maps the edges
            boxes = det["boxes"] / axis_scale(size, (h, w)).to(det["boxes"].device)  # (D, 4)
            det["boxes"] = clip_boxes_to_image(boxes, (h, w))  # in the input image's pixels
        return detections

    def features(self, batch: Tensor) -> list[Tensor]:
        """The pyramid of a padded, normalised batch (N, 3, H, W): FPN levels, finest first, each
        (N, C, H_l, W_l)."""
        return list(self.fpn(self.backbone(batch)).values())

    def anchors_of(self, features: Sequence[Tensor], batch: Tensor) -> tuple[Tensor, list[int]]:
        """(R, 4) XYXY anchors of ``features`` (the pyramid of the padded ``batch``) and R split
        by level, in the order of the head's outputs."""
        sizes = [tuple(f.shape[-2:]) for f in features]
        gen = self.anchor_generator
        return gen(sizes, batch.device, tuple(batch.shape[-2:])), gen.num_anchors_per_level(sizes)

    def compute_loss(self, pred_logits: Tensor, pred_deltas: Tensor, targets: list[dict],
                     anchors: Tensor, num_per_level: Optional[Sequence[int]] = None) -> dict[str, Tensor]:
        """Training-mode result: assign the batch's targets to the anchors, then the loss.

        pred_logits (N, R, K), pred_deltas (N, R, 4), anchors (R, 4) XYXY, targets: N dicts of
        ``boxes`` (M_i, 4) XYXY in the resized images' pixels and ``labels`` (M_i,);
        ``num_per_level``: the anchors of each level (ATSS matching needs them). Returns
        ``loss_cls`` and ``loss_box`` (scalars, fp32; their sum is the training loss) and
        ``num_pos`` (scalar fp32, no gradient: the anchors assigned to a box in this batch on
        this process, for logging; not a loss, so not to be added). With ``loss.normalizer=ema``
        each call advances the ``num_pos_ema`` buffer.
        """
        gt = self.assigner(pad_targets(targets, pred_logits.device), anchors, num_per_level)
        out = retinanet_losses(pred_logits, pred_deltas, gt.gt_classes, gt.gt_deltas, self.loss_settings,
                               anchors, self.num_pos_ema, self.assigner.box_coder.decode)
        if out.num_pos_ema is not None:
            self.num_pos_ema.copy_(out.num_pos_ema)
        return {**out.losses, "num_pos": out.num_pos}


def _rename_old_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-time map of state-dict keys that moved: ``loss.num_pos_ema`` (the loss was a module)
    is now the model's ``num_pos_ema``."""
    old = prefix + "loss.num_pos_ema"
    if old in state_dict:
        state_dict.setdefault(prefix + "num_pos_ema", state_dict.pop(old))


def _bilinear(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, H, W) -> (3, *size), bilinear as F.interpolate without corner alignment; the image
    itself when the size is unchanged (that interpolation would be the identity)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
