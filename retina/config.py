"""Typed configuration: nested frozen dataclasses filled from YAML, then from dotted overrides.

A config file may name one ``base`` file (a path relative to itself); its own keys override the
base's. Overrides (``loss.gamma=1``) are parsed as YAML scalars. Every error is a ``ConfigError``
whose message is one line naming the file and the key; the CLI prints it and exits with status 2.
Only factories (``build_model``, ``build_dataset``, the trainer) read this object.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config problem the user can fix; its message is one line naming the file and key."""

    def __init__(self, message: str) -> None:
        # Values echoed from the user (an override, a YAML string) may hold newlines.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: only true/false are booleans, so ``amp: off`` stays the
    string 'off' (YAML 1.1 reads on/off/yes/no as bools), and ``1e-4`` is a float (YAML 1.1
    needs a dot, ``1.0e-4``, and PyYAML would return the string '1e-4')."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_YamlLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YamlLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


# --------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class BackboneConfig:
    depth: Literal[18, 34, 50, 101] = 50  # ResNet depth (torchvision.models.resnet*)
    # None: random init; a torchvision weights name ("ResNet50_Weights.IMAGENET1K_V1",
    # or "DEFAULT"); or a local .pth state dict.
    weights: Optional[str] = None
    # "auto": FrozenBatchNorm when pretrained weights are given, BatchNorm otherwise.
    norm: Literal["auto", "bn", "frozen_bn"] = "auto"
    # Stages frozen when pretrained: 0 none, 1 stem, 2 stem + res2 (detectron2's FREEZE_AT).
    freeze_at: int = 2
    # eps of every (Frozen)BatchNorm; torchvision's COCO weights of retinanet_resnet50_fpn (v1)
    # were evaluated with FrozenBatchNorm eps 0.0 (torchvision's overwrite_eps).
    norm_eps: float = 1e-5


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
    fg_iou_thresh: float = 0.5  # IoU >= 0.5: foreground, Sec. 4
    bg_iou_thresh: float = 0.4  # IoU < 0.4: background; in between ignored
    allow_low_quality: bool = True  # each GT also takes its best anchors (detectron2, torchvision)


@dataclass(frozen=True)
class BoxCoderConfig:
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # (wx, wy, ww, wh)
    scale_clamp: float = math.log(1000.0 / 16)  # max dw/dh before exp


@dataclass(frozen=True)
class InputConfig:
    min_size: tuple[int, ...] = (800,)  # shorter side; several: random choice per image in training
    max_size: int = 1333  # cap on the longer side
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


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = 80  # K; replaced by the dataset's class count when the data says otherwise
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    box_coder: BoxCoderConfig = field(default_factory=BoxCoderConfig)
    input: InputConfig = field(default_factory=InputConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    channels_last: bool = False  # memory format of activations


@dataclass(frozen=True)
class ShapesConfig:
    """The bundled synthetic dataset, generated into ``data.root`` when missing."""

    num_train: int = 2000
    num_val: int = 200
    image_size: int = 160
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    # "shapes": the bundled synthetic set (generated if missing); "coco": files the user gives.
    dataset: Literal["shapes", "coco"] = "coco"
    root: str = "data/coco"
    train_ann: str = "annotations/instances_train2017.json"  # relative to root
    train_images: str = "train2017"
    val_ann: str = "annotations/instances_val2017.json"
    val_images: str = "val2017"
    hflip_prob: float = 0.5  # random horizontal flip, Sec. 4.1
    num_workers: int = 4  # DataLoader workers
    aspect_grouping: bool = True  # batches of one orientation (landscape / portrait): less padding
    # A missing, corrupt or wrongly sized training image: "error" stops the run with one line
    # naming the file and image id; "skip" logs it and trains on the next readable image instead
    # (retina/data/robust.py). Validation images always stop evaluation.
    on_bad_image: Literal["error", "skip"] = "error"
    # With "skip": stop when more than this share of the images read so far was bad (counted per
    # DataLoader worker, from its 100th read on).
    max_bad_fraction: float = 0.01
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


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
    # hardest anchors only (Table 1d); focal_star: FL* (appendix A). losses.py has the details.
    type: Literal["focal", "ce", "ohem", "focal_star"] = "focal"
    alpha: Optional[float] = 0.25  # weight of positives; None: no weighting
    gamma: float = 2.0  # focusing parameter; 0 with alpha None is BCE
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
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
    schedule: Literal["step", "cosine"] = "step"
    steps: tuple[int, ...] = (60000, 80000)  # lr x gamma at each
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001  # lr multiplier at iteration 0
    clip_grad_norm: float = 0.0  # 0: no clipping


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    checkpoint_period: int = 5000  # iterations between checkpoints
    keep_checkpoints: int = 3  # periodic checkpoints kept (newest); 0 keeps all
    log_period: int = 20  # iterations between logged scalars (and lines in non-tty logs)
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast dtype; fp16 adds a GradScaler
    eval_at_end: bool = True
    eval_period: int = 0  # iterations between evaluations during training (0: only at the end);
    # each one updates model_best.pth when AP improves
    skip_nonfinite: int = 0  # steps with a non-finite loss or gradient skipped before stopping
    tb_images: int = 4  # validation images drawn with their detections in TensorBoard per eval


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


# --------------------------------------------------------------------------------- validation
def _range_checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """(key, ok, requirement) for every value-range rule."""
    m, loss, s = cfg.model, cfg.loss, cfg.solver
    return [
        ("loss.gamma", loss.gamma >= 0, "must be >= 0"),
        ("loss.alpha", loss.alpha is None or 0 <= loss.alpha <= 1, "must be in [0, 1] or null"),
        ("loss.smooth_l1_beta", loss.smooth_l1_beta >= 0, "must be >= 0"),
        ("loss.ema_momentum", 0 <= loss.ema_momentum < 1, "must be in [0, 1)"),
        ("loss.ohem.nms", 0 < loss.ohem.nms <= 1, "must be in (0, 1]"),
        ("loss.ohem.batch_size", loss.ohem.batch_size >= 1, "must be >= 1"),
        ("loss.ohem.ratio", loss.ohem.ratio is None or 0 < loss.ohem.ratio < 1,
         "must be in (0, 1) or null"),
        ("loss.focal_star.gamma", loss.focal_star.gamma > 0, "must be > 0"),
        ("model.num_classes", m.num_classes >= 1, "must be >= 1"),
        ("model.head.prior_prob", 0 <= m.head.prior_prob < 1, "must be in [0, 1)"),
        ("model.head.num_convs", m.head.num_convs >= 0, "must be >= 0"),
        ("model.fpn.channels", m.fpn.channels >= 1, "must be >= 1"),
        ("model.fpn.min_level", 3 <= m.fpn.min_level <= 5, "must be in 3..5"),
        ("model.fpn.max_level", m.fpn.min_level <= m.fpn.max_level <= 8, "must be in min_level..8"),
        ("model.anchors.sizes", len(m.anchors.sizes) in (0, m.fpn.max_level - m.fpn.min_level + 1),
         "needs one size per level (max_level - min_level + 1) or none"),
        ("model.anchors.scales", len(m.anchors.scales) >= 1 and min(m.anchors.scales) > 0,
         "needs positive values"),
        ("model.anchors.ratios", len(m.anchors.ratios) >= 1 and min(m.anchors.ratios) > 0,
         "needs positive values"),
        ("model.matcher.bg_iou_thresh", 0 <= m.matcher.bg_iou_thresh <= m.matcher.fg_iou_thresh,
         "must be in [0, fg_iou_thresh]"),
        ("model.matcher.fg_iou_thresh", m.matcher.fg_iou_thresh <= 1, "must be <= 1"),
        ("model.input.min_size", len(m.input.min_size) >= 1 and min(m.input.min_size) > 0,
         "needs positive sizes"),
        ("model.input.size_divisibility", m.input.size_divisibility >= 1, "must be >= 1"),
        ("model.inference.nms_thresh", 0 <= m.inference.nms_thresh <= 1, "must be in [0, 1]"),
        ("model.backbone.freeze_at", 0 <= m.backbone.freeze_at <= 5, "must be in 0..5"),
        ("model.backbone.norm_eps", m.backbone.norm_eps >= 0, "must be >= 0"),
        ("data.hflip_prob", 0 <= cfg.data.hflip_prob <= 1, "must be in [0, 1]"),
        ("data.num_workers", cfg.data.num_workers >= 0, "must be >= 0"),
        ("data.max_bad_fraction", 0 <= cfg.data.max_bad_fraction <= 1, "must be in [0, 1]"),
        ("solver.lr", s.lr > 0, "must be > 0"),
        ("solver.batch_size", s.batch_size >= 1, "must be >= 1"),
        ("solver.max_iter", s.max_iter >= 1, "must be >= 1"),
        ("solver.warmup_factor", 0 < s.warmup_factor <= 1, "must be in (0, 1]"),
        ("solver.warmup_iters", s.warmup_iters >= 0, "must be >= 0"),
        ("train.checkpoint_period", cfg.train.checkpoint_period >= 1, "must be >= 1"),
        ("train.log_period", cfg.train.log_period >= 1, "must be >= 1"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 0, "must be >= 0"),
        ("train.eval_period", cfg.train.eval_period >= 0, "must be >= 0"),
        ("train.skip_nonfinite", cfg.train.skip_nonfinite >= 0, "must be >= 0"),
        ("train.tb_images", cfg.train.tb_images >= 0, "must be >= 0"),
        ("eval.batch_size", cfg.eval.batch_size >= 1, "must be >= 1"),
    ]


def validate(cfg: Config, source: str = "<config>") -> Config:
    for key, ok, requirement in _range_checks(cfg):
        if not ok:
            value = _get(cfg, key)
            raise ConfigError(f"{source}: {key}={value!r} {requirement}")
    return cfg


# ---------------------------------------------------------------------------- typed conversion
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Coerce a YAML value to the annotated type, or raise a one-line ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{source}: {key}={value!r} should be {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, source)
    if origin is Literal:
        # same type as well as equal: 50.0 is not the depth 50, True is not 1
        if not any(type(value) is type(a) and value == a for a in args):
            raise ConfigError(f"{source}: {key}={value!r} should be one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a scalar where a tuple is expected: `min_size: 800`
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key}={value!r} should have {len(args)} values")
        return tuple(_convert(v, a, key, source) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad  # pragma: no cover - every schema type is handled above


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nearest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(choices)}"


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} should be a mapping")
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise ConfigError(f"{source}: unknown key '{key}'{_nearest(str(name), list(types_))}")
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{key}.", source)
        else:
            kwargs[name] = _convert(value, tp, key, source)
    return cls(**kwargs)


# ------------------------------------------------------------------------------------ loading
def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where} YAML syntax error: {problem}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level should be a mapping")
    data.pop("ablate", None)  # a sweep's grid, read only by retina/ablate.py
    base = data.pop("base", None)
    if base is not None:
        base_path = (path.parent / str(base)).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: base file '{base}' not found")
        chain = _chain + (path.resolve(),)
        if base_path in chain:  # a.yaml -> b.yaml -> a.yaml would recurse forever
            raise ConfigError(f"{path}: base file '{base}' makes a cycle of bases")
        data = _merge(_read_yaml(base_path, chain), data)
    return data


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. loss.gamma=1.0")
    key, raw = item.split("=", 1)
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict, path: list[str], value: Any) -> dict:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a section")
    node[path[-1]] = value
    return data


def config_from_dict(data: dict, overrides: Sequence[str] = (), source: str = "<dict>") -> Config:
    data = _merge({}, data)
    for item in overrides:
        key_path, value = _parse_override(item)
        data = _apply_override(data, key_path, value)
        # Overrides are checked against the schema with their own name in the message.
        _build(Config, _apply_override({}, key_path, value), "", f"--set {item}")
    return validate(_build(Config, data, "", source), source)


# The configs shipped inside the package (package data), so an installed wheel finds them.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def find_config(name: str | Path) -> Path:
    """A path as given, else a bundled config: ``shapes``, ``shapes.yaml``, ``ablations/shapes_focal``
    or ``configs/shapes.yaml`` (the repository's old layout) all name ``retina/configs/shapes.yaml``."""
    path = Path(name)
    if path.is_file():
        return path
    rel = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    for candidate in (CONFIG_DIR / rel, CONFIG_DIR / f"{rel}.yaml"):
        if candidate.is_file():
            return candidate
    return path  # load_config reports it as missing


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (and its base), apply ``key=value`` overrides, type-check, validate."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(data, overrides, source=str(path) if path else "<defaults>")


def config_to_dict(cfg: Config) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def replace(cfg: Config, **sections: Any) -> Config:
    """``replace(cfg, model=dataclasses.replace(cfg.model, num_classes=3))``, re-validated."""
    return validate(dataclasses.replace(cfg, **sections))


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
