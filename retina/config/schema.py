"""The config schema: nested frozen dataclasses, every key documented where it is declared.

A ``Config`` is read at the top only: by the factories (``build_model``, ``build_dataset``,
``build_optimizer``), the trainer, checkpoint loading and the entry points of the CLI verbs
(retina/studies, retina/deploy, and the harnesses in benchmarks/); modules below them take plain,
typed arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

__all__ = ["BackboneConfig", "FPNConfig", "AnchorConfig", "HeadConfig", "MatcherConfig", "BoxCoderConfig", "InputConfig", "InferenceConfig", "ModelConfig", "ShapesConfig", "DenseConfig", "AugmentConfig", "DataConfig", "OhemConfig", "FocalStarConfig", "LossConfig", "SolverConfig", "EmaConfig", "TrainConfig", "EvalConfig", "Config"]


@dataclass(frozen=True)
class BackboneConfig:
    # torchvision's ResNet, or one of its light trunks for a CPU budget (MobileNetV3 large /
    # small, ShuffleNetV2 1.0x / 1.5x, RegNetX 400MF / 800MF, RegNetY 400MF)
    type: Literal["resnet", "mobilenet_v3_large", "mobilenet_v3_small", "shufflenet_v2_x1_0",
                  "shufflenet_v2_x1_5", "regnet_x_400mf", "regnet_x_800mf",
                  "regnet_y_400mf"] = "resnet"
    depth: Literal[18, 34, 50, 101] = 50  # ResNet depth (torchvision.models.resnet*)
    # None: random init; a torchvision weights name ("ResNet50_Weights.IMAGENET1K_V1",
    # or "DEFAULT"); or a local .pth state dict.
    weights: Optional[str] = None
    # "auto": FrozenBatchNorm when pretrained weights are given, BatchNorm otherwise.
    norm: Literal["auto", "bn", "frozen_bn"] = "auto"
    # Stages frozen when pretrained: 0 none, 1 stem, 2 stem + res2 (detectron2's FREEZE_AT).
    freeze_at: int = 2
    # eps of every (Frozen)BatchNorm; null: the trunk's own, as torchvision builds it and as its
    # ImageNet weights were trained (1e-5 for ResNet, ShuffleNetV2 and RegNet; 1e-3 for
    # MobileNetV3). torchvision's COCO weights of retinanet_resnet50_fpn (v1) were evaluated
    # with FrozenBatchNorm eps 0.0 (torchvision's overwrite_eps).
    norm_eps: Optional[float] = None


@dataclass(frozen=True)
class FPNConfig:
    channels: int = 256  # width of every pyramid level and of the heads
    min_level: int = 3  # P3 (stride 8), Sec. 4
    max_level: int = 7  # P7 (stride 128)
    p6_from: Literal["c5", "p5"] = "c5"  # paper: P6 = 3x3/2 conv on C5; torchvision v1 uses P5


@dataclass(frozen=True)
class AnchorConfig:
    # Base anchor size per level; empty means 4 x stride (32^2..512^2 on P3..P7, Sec. 4).
    sizes: tuple[float, ...] = ()
    scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))  # octave scales, Sec. 4
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    offset: float = 0.0  # anchor centre = (index + offset) * stride
    # Order of the A anchors of a cell: scale_major (scale outer, ratio inner: detectron2) or
    # ratio_major (ratio outer, scale inner: torchvision's AnchorGenerator).
    order: Literal["scale_major", "ratio_major"] = "scale_major"
    truncate_sizes: bool = False  # side = int(size * scale): torchvision's 32, 40, 50 on P3
    round_corners: bool = False  # cell-anchor corners rounded to whole pixels (torchvision)
    # Stride that spaces the anchors of a level: "level": 2^level (paper); "image": padded
    # image size // feature size per axis (torchvision; differs from 2^level on P6/P7 when the
    # padded size is not a multiple of 128).
    stride_from: Literal["level", "image"] = "level"


@dataclass(frozen=True)
class HeadConfig:
    num_convs: int = 4  # 4 x (3x3 conv, ReLU) before each predictor, Sec. 4
    norm: Literal["none", "gn"] = "none"  # GroupNorm(32) after each conv helps from-scratch runs
    prior_prob: float = 0.01  # class bias -log((1 - pi) / pi); 0 means bias 0 (no prior)
    conv_bias: bool = True  # bias in the tower convs; torchvision v2's GN towers have none


@dataclass(frozen=True)
class MatcherConfig:
    # iou: fixed IoU thresholds (the paper's, below); atss: each box's threshold from its own
    # candidates (ATSS, Zhang et al. 2020: mean + std of the IoU of the anchors at the topk
    # locations nearest its centre on each level, centres inside the box; no ignore band; crowd
    # boxes ignore their background anchors of IoU >= bg_iou_thresh; fg_iou_thresh and
    # allow_low_quality are unused)
    type: Literal["iou", "atss"] = "iou"
    fg_iou_thresh: float = 0.5  # IoU >= 0.5: foreground, Sec. 4
    bg_iou_thresh: float = 0.4  # IoU < 0.4: background; in between ignored
    allow_low_quality: bool = True  # each GT also takes its best anchors (detectron2, torchvision)
    topk: int = 9  # atss: candidate locations per level and box (the paper's k)


@dataclass(frozen=True)
class BoxCoderConfig:
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # (wx, wy, ww, wh)
    scale_clamp: float = math.log(1000.0 / 16)  # max dw/dh before exp


@dataclass(frozen=True)
class InputConfig:
    min_size: tuple[int, ...] = (800,)  # shorter side; several: random choice per image in training
    max_size: int = 1333  # cap on the longer side
    # Inference size (detectron2's MIN_SIZE_TEST / MAX_SIZE_TEST): shorter side and longer-side
    # cap that eval, predict and export resize to; null: min_size[-1] and max_size.
    test_min_size: Optional[int] = None
    test_max_size: Optional[int] = None
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, for [0, 1] input
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisibility: int = 128  # pad the batch to a multiple of the largest stride (P7)
    # "round": resize (size rounded), then normalise; "torchvision": normalise, then
    # interpolate by the scale factor with recompute_scale_factor=True (sizes floored), always,
    # as torchvision's GeneralizedRCNNTransform.
    resize: Literal["round", "torchvision"] = "round"


@dataclass(frozen=True)
class InferenceConfig:
    score_thresh: float = 0.05  # Sec. 5.1
    topk_candidates: int = 1000  # per level
    nms_thresh: float = 0.5  # class-wise
    detections_per_image: int = 100
    # eval / predict: detect each image and its mirror image, merge by class-wise NMS at nms_thresh
    # (test-time augmentation, mmdet's --tta, ultralytics' augment): twice the inference time.
    # Not exported (the exported graph runs each image once)
    hflip_tta: bool = False


@dataclass(frozen=True)
class ModelConfig:
    num_classes: Optional[int] = None  # K; null: the train set's (a set value must agree with it)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    box_coder: BoxCoderConfig = field(default_factory=BoxCoderConfig)
    input: InputConfig = field(default_factory=InputConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    channels_last: bool = False  # memory format of activations
    # A retina checkpoint to start from (``retina train --init``), e.g. a torchvision COCO
    # RetinaNet converted by ``retina convert``: every tensor whose name and shape fit is loaded
    # (its EMA weights when it has them); the class predictor keeps its prior init (Sec. 4.1)
    # when the classes differ. model.backbone.weights is then not read (it still decides
    # FrozenBN and freeze_at). Read when a run starts; --resume continues from the run's own.
    init: Optional[str] = None


@dataclass(frozen=True)
class ShapesConfig:
    """The bundled synthetic dataset, generated into ``data.root`` when missing."""

    num_train: int = 2000
    num_val: int = 200
    image_size: int = 160
    seed: int = 0
    # Classes no object is ever of (retina/data/shapes.py): K = 3 + extra_classes, so every
    # anchor gets extra_classes more easy negatives (COCO's 80 classes give it 79) while the
    # images and boxes stay the same; the imbalance knob of ablations/imbalance_*.yaml.
    extra_classes: int = 0


@dataclass(frozen=True)
class DenseConfig:
    """The dense benchmark (retina/data/dense.py): many classes of COCO-sized objects on larger
    images, so the (anchor, class) imbalance approaches COCO's; generated into ``data.root``."""

    num_train: int = 4000
    num_val: int = 200
    image_size: int = 192
    num_classes: int = 80  # K <= 80: colour x shape, colour-major
    seed: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation for photographs (retina/data/transforms.py, torchvision.transforms.v2),
    in torchvision's SSD order: photometric, zoom-out, min-IoU crop, then the flip (data.hflip_prob)
    and the training size (model.input.min_size), optionally jittered. All off by default."""

    # v2.RandomPhotometricDistort: brightness, contrast, saturation, hue and channel order, each
    # changed with this probability (SSD's photometric distortions).
    photometric_prob: float = 0.0
    # v2.RandomZoomOut: with this probability the image is put at a random place on a canvas 1 to
    # zoom_out_max times its sides, filled with the mean pixel (SSD Sec. 3.6: smaller objects).
    zoom_out_prob: float = 0.0
    zoom_out_max: float = 4.0
    # v2.RandomIoUCrop: with this probability a crop (sides crop_min_scale..1 of the image, aspect
    # 0.5..2) whose IoU with some box reaches a value drawn from crop_min_ious (1.0: no crop);
    # boxes whose centre falls outside are dropped (SSD's sampler). Images without boxes are not cut.
    crop_prob: float = 0.0
    crop_min_ious: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    crop_min_scale: float = 0.3
    # Large-scale jitter (Ghiasi et al. 2021; v2.ScaleJitter): the image is scaled to the training
    # size times a factor drawn from [lo, hi], then cropped or padded back to it. [1, 1]: off;
    # the paper's LSJ: [0.1, 2.0].
    scale_jitter: tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class DataConfig:
    # "shapes": the bundled synthetic set; "dense": the Table 1 benchmark (both generated if
    # missing); "coco": files the user gives.
    dataset: Literal["shapes", "dense", "coco"] = "coco"
    root: str = "data/coco"
    # Layout of the user's files (dataset "coco"): "coco" json (the *_ann / *_images keys below);
    # "voc" (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt); "yolo" (root is or holds a
    # data.yaml naming the classes and the image folders; labels/ beside images/); "auto": voc
    # when root has Annotations/ and JPEGImages/, yolo when it is or has a data.yaml, else coco.
    format: Literal["auto", "coco", "voc", "yolo"] = "auto"
    train_split: str = "train"  # voc: ImageSets/Main/<split>.txt; yolo: the data.yaml key
    val_split: str = "val"
    # voc: class names in label order; empty: every object name of both splits, sorted.
    classes: tuple[str, ...] = ()
    # voc: train and evaluate on "difficult" objects; false: they are ignore regions (iscrowd).
    keep_difficult: bool = False
    train_ann: str = "annotations/instances_train2017.json"  # relative to root
    train_images: str = "train2017"
    val_ann: str = "annotations/instances_val2017.json"
    val_images: str = "val2017"
    hflip_prob: float = 0.5  # random horizontal flip, Sec. 4.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training images only
    num_workers: int = 4  # DataLoader workers
    # ram: decode every training image once, before the first step, and keep it in memory
    # (ultralytics' cache=ram): refused when the images need more than half the available
    # memory. Each process holds its own copy (a DDP rank; DataLoader workers share the parent's).
    cache: Literal["none", "ram"] = "none"
    aspect_grouping: bool = True  # batches of one orientation (landscape / portrait): less padding
    # A missing, corrupt or wrongly sized training image: "error" stops the run with one line
    # naming the file and image id; "skip" logs it and trains on the next readable image instead
    # (retina/data/robust.py). Validation images always stop evaluation.
    on_bad_image: Literal["error", "skip"] = "error"
    # With "skip": stop when more than this share of the images read so far was bad (counted per
    # DataLoader worker, from its 100th read on).
    max_bad_fraction: float = 0.01
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)  # read when dataset is dense


@dataclass(frozen=True)
class OhemConfig:
    """Online hard example mining over anchors (loss.type=ohem; paper Sec. 5.1, Table 1d)."""

    nms: float = 0.7  # IoU of the NMS over anchor boxes ranked by loss (Table 1d: 0.7 or 0.5)
    batch_size: int = 128  # anchors kept per image (Table 1d: 128, 256, 512)
    ratio: Optional[float] = None  # share of positives, e.g. 0.25 = SSD's 1:3; null: pure top-loss
    # What the kept anchors' summed CE is divided by: "positives", the anchors assigned to a box
    # (as FL and every other type: only the selection differs), or "selected", their own count
    # (the mean over the minibatch, as Fast R-CNN's OHEM; ~10x weaker beside the box loss here).
    normalizer: Literal["positives", "selected"] = "positives"


@dataclass(frozen=True)
class FocalStarConfig:
    """FL* of appendix A: p_t* = sigmoid(gamma x_t + beta), FL* = -log(p_t*) / gamma."""

    gamma: float = 2.0  # steepness (appendix A, Fig. 5 / Table 3: gamma 2, beta 1)
    beta: float = 1.0  # shift


@dataclass(frozen=True)
class LossConfig:
    # focal: FL (Sec. 3.2); ce: alpha-balanced sigmoid CE (Table 1a); ohem: sigmoid CE on the
    # hardest anchors only (Table 1d); focal_star: FL* (appendix A); quality_focal: FL against the
    # IoU of the predicted box as the positives' target (GFL's QFL, Li et al. 2020; gamma is its
    # beta, alpha null). retina/model/losses.py has the details; config/rules.py refuses a key
    # the chosen type does not read.
    type: Literal["focal", "ce", "ohem", "focal_star", "quality_focal"] = "focal"
    alpha: Optional[float] = 0.25  # weight of positives; None: no weighting
    gamma: float = 2.0  # focusing parameter of focal; 0 with alpha None is BCE; ce, ohem: 0
    # giou: 1 - generalized IoU of the decoded boxes (Rezatofighi et al. 2019; torchvision v2,
    # detectron2's box_reg_loss_type "giou"), instead of a loss on the deltas
    box_loss: Literal["smooth_l1", "l1", "giou"] = "smooth_l1"
    smooth_l1_beta: float = 0.1  # detectron2's RetinaNet default
    box_weight: float = 1.0
    # batch: divide by the batch's positive anchors (paper); ema: detectron2's running mean;
    # image: each image by its own positives, then averaged (torchvision).
    normalizer: Literal["batch", "ema", "image"] = "batch"
    ema_momentum: float = 0.9
    ohem: OhemConfig = field(default_factory=OhemConfig)  # read when type is ohem
    focal_star: FocalStarConfig = field(default_factory=FocalStarConfig)  # read when focal_star


@dataclass(frozen=True)
class SolverConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01  # at batch_size 16; scale linearly with the global batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 16  # images per step, summed over all devices
    max_iter: int = 90000
    # Minutes of training (data + step time; evaluations and checkpoints not counted): the run's
    # length is re-estimated from its pace so that the schedule ends on time, at most max_iter
    # iterations (retina/engine/budget.py; ultralytics' ``time``). null: max_iter decides.
    max_minutes: Optional[float] = None
    schedule: Literal["step", "cosine"] = "step"
    steps: tuple[int, ...] = (60000, 80000)  # lr x gamma at each
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001  # lr multiplier at iteration 0
    clip_grad_norm: float = 0.0  # 0: no clipping


@dataclass(frozen=True)
class EmaConfig:
    """Exponential moving average of the weights, evaluated and deployed instead of the raw ones
    (YOLOX's ModelEMA; mmdet's ExpMomentumEMA, whose formula this is). The first update copies
    the weights; update n + 1 (n done before it) keeps decay_n = decay * (1 - exp(-(n + 1) /
    warmup)) of the average: ema <- decay_n * ema + (1 - decay_n) * weights. Buffers are copied."""

    enabled: bool = False
    decay: float = 0.9998  # mmdet's momentum 0.0002 (YOLOX: 0.9999)
    warmup: float = 2000.0  # iterations: decay_n reaches 63 % of decay at n + 1 = warmup


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    checkpoint_period: int = 5000  # iterations between checkpoints
    keep_checkpoints: int = 3  # periodic checkpoints kept (newest); 0 keeps all
    log_period: int = 20  # iterations between logged scalars (and lines in non-tty logs)
    # autocast dtype; fp16 adds a GradScaler; auto: bf16 where the hardware runs it natively,
    # fp32 on a CPU without bf16 instructions (retina.engine.precision)
    amp: Literal["off", "bf16", "fp16", "auto"] = "off"
    eval_at_end: bool = True
    eval_period: int = 0  # iterations between evaluations during training (0: only at the end);
    # each one updates model_best.pth when AP improves
    skip_nonfinite: int = 0  # steps with a non-finite loss or gradient skipped before stopping
    tb_images: int = 4  # validation images drawn with their detections in TensorBoard per eval
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 8  # images per inference step
    per_class: bool = True  # per-class AP in metrics.json
    # COCO scorer: pycocotools (the reference) or faster_coco_eval (same 12 metrics, C++,
    # several times faster; optional: pip install faster-coco-eval or retina[fast]).
    backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
