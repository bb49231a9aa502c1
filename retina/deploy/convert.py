"""torchvision's RetinaNet weights -> a regular ``retina`` checkpoint.

``convert_torchvision`` takes a state dict of ``retinanet_resnet50_fpn`` (v1) or
``retinanet_resnet50_fpn_v2`` (or the path of one) and writes a checkpoint that ``load_model``,
``retina eval`` and ``retina predict`` read like a trained run's: ``model``, ``config`` (the
parity config of ``torchvision_config``), ``class_names``, ``cat_ids``, ``iteration`` 0.

Labels. torchvision's COCO models have 91 class slots indexed by COCO category id (slot 0
"__background__" and the 10 ids COCO never used, "N/A", are trained as negatives only). A 91-slot
state dict is cut to the 80 real categories: contiguous label k is COCO id ``cat_ids[k]`` (the
sorted ids, as ``CocoDetection`` numbers them), so ``retina eval`` on val2017 scores it as is. The
11 dropped slots could only change a detection list if one of them scored above the 0.05
threshold; their logits are always pushed down in training. Any other class count is kept
slot for slot (label k, cat_id k).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from torch import Tensor

from retina.config import Config, config_from_dict, config_to_dict
from retina.errors import InputError, MissingFileError

if TYPE_CHECKING:
    from retina.model import RetinaNet

Variant = Literal["v1", "v2"]
COCO_SLOTS = 91  # torchvision's COCO label space: index = COCO category id


def torchvision_config(variant: Variant, num_classes: int = 80, overrides: Sequence[str] = ()
                       ) -> Config:
    """The config that reproduces torchvision's architecture, preprocessing and post-processing
    (``configs/torchvision_retinanet_r50_fpn{,_v2}.yaml`` hold the same model section), with
    dotted ``overrides`` (``data.root=/data/coco``) applied."""
    if variant not in ("v1", "v2"):
        raise ValueError(f"variant must be 'v1' or 'v2', got {variant!r}")
    v1 = variant == "v1"
    model = {
        "num_classes": num_classes,
        # v1: FrozenBatchNorm, eps 0 for the COCO weights (torchvision's overwrite_eps);
        # v2: plain BatchNorm2d (eps 1e-5), which in eval mode is the same affine map.
        "backbone": {"depth": 50, "weights": None, "norm": "frozen_bn" if v1 else "bn",
                     "norm_eps": 0.0 if v1 else 1e-5},
        "fpn": {"channels": 256, "min_level": 3, "max_level": 7, "p6_from": "p5" if v1 else "c5"},
        "anchors": {"sizes": [32, 64, 128, 256, 512], "order": "ratio_major",
                    "truncate_sizes": True, "round_corners": True, "stride_from": "image"},
        "head": {"num_convs": 4, "norm": "none" if v1 else "gn", "prior_prob": 0.01,
                 "conv_bias": v1},
        "matcher": {"fg_iou_thresh": 0.5, "bg_iou_thresh": 0.4, "allow_low_quality": True},
        "box_coder": {"weights": [1.0, 1.0, 1.0, 1.0]},
        "input": {"min_size": [800], "max_size": 1333, "size_divisibility": 32,
                  "resize": "torchvision"},
        "inference": {"score_thresh": 0.05, "topk_candidates": 1000, "nms_thresh": 0.5,
                      "detections_per_image": 300},
    }
    # torchvision v1 trains with L1 on the deltas, each image normalised by its own positives;
    # v2 trains with GIoU, which retina does not implement (the config is for evaluation).
    loss = {"type": "focal", "alpha": 0.25, "gamma": 2.0, "box_loss": "l1", "normalizer": "image"}
    # torchvision's reference evaluation runs one image per batch: padding (and so the P6/P7
    # anchor strides with stride_from=image) then depends on the image alone.
    return config_from_dict({"model": model, "loss": loss, "eval": {"batch_size": 1}},
                            overrides, source=f"torchvision {variant}")


# --------------------------------------------------------------------------- key mapping
_HEAD_CONV = re.compile(r"head\.(classification_head|regression_head)\.conv\.(\d+)\.(?:(\d+)\.)?(\w+)$")
_FPN_BLOCK = re.compile(r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(?:0\.)?(\w+)$")
_REQUIRED = ("backbone.body.conv1.weight", "backbone.fpn.extra_blocks.p6.weight",
             "head.classification_head.cls_logits.weight", "head.regression_head.bbox_reg.weight")


def _retina_key(key: str, gn: bool) -> str | None:
    """retina's name for a torchvision RetinaNet key; None for keys retina has no use for."""
    if key.endswith("num_batches_tracked"):
        return None
    if key.startswith("backbone.body."):
        rest = key[len("backbone.body."):]
        rest = re.sub(r"^conv1\.", "stem.0.", rest)
        rest = re.sub(r"^bn1\.", "stem.1.", rest)
        rest = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", rest)
        return f"backbone.{rest}"
    m = _FPN_BLOCK.match(key)  # new layout "inner_blocks.0.0.weight", old "inner_blocks.0.weight"
    if m:
        return f"fpn.{'lateral' if m.group(1) == 'inner_blocks' else 'output'}.{m.group(2)}.{m.group(3)}"
    m = re.match(r"backbone\.fpn\.extra_blocks\.p([67])\.(\w+)$", key)
    if m:
        return f"fpn.extra.{int(m.group(1)) - 6}.{m.group(2)}"
    m = _HEAD_CONV.match(key)
    if m:
        tower = "cls_tower" if m.group(1) == "classification_head" else "box_tower"
        block, sub, name = int(m.group(2)), m.group(3), m.group(4)
        if sub is None:  # torchvision < 0.13 layout: Sequential(conv, relu, conv, relu, ...)
            block, sub = block // 2, "0"
        per_block = 3 if gn else 2  # retina's towers: (conv, [GroupNorm,] ReLU) per block
        return f"head.{tower}.{block * per_block + int(sub)}.{name}"
    for src, dst in (("head.classification_head.cls_logits.", "head.cls_logits."),
                     ("head.regression_head.bbox_reg.", "head.box_deltas.")):
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def coco_classes() -> tuple[list[int], list[str]]:
    """The 80 COCO category ids among torchvision's 91 slots, and their names."""
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

    slots = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # 91 names, by category id
    ids = [i for i, name in enumerate(slots) if name not in ("__background__", "N/A")]
    return ids, [slots[i] for i in ids]


def _read(state_dict_or_path: dict | str | Path) -> tuple[dict, str]:
    if isinstance(state_dict_or_path, dict):
        return state_dict_or_path, "<state dict>"
    path = Path(state_dict_or_path)
    if not path.is_file():
        raise MissingFileError(f"torchvision weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # weights_only: a file is never unpickled into arbitrary objects. torchvision's reference
        # checkpoints also pickle argparse args; save their ["model"] entry alone first.
        raise InputError(f"{path}: cannot read as a torch state dict ({type(e).__name__}); "
                         f"save a plain state dict (e.g. checkpoint['model'])") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state, str(path)


def _unwrap(state: dict, name: str, variant: Variant) -> dict:
    """The bare state dict (torchvision's reference checkpoints wrap it in ``model``; DDP adds
    ``module.``), checked to be a RetinaNet of ``variant``."""
    if isinstance(state.get("model"), dict):
        state = state["model"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise InputError(f"{name} does not look like a torchvision RetinaNet state dict "
                         f"(no {missing[0]})")
    p6_in = state["backbone.fpn.extra_blocks.p6.weight"].shape[1]
    found = "v1" if p6_in == 256 else "v2" if p6_in == 2048 else f"P6 on {p6_in} channels"
    if found != variant:
        raise InputError(f"{name} is torchvision RetinaNet {found}, not {variant}; "
                         f"pass --variant {found}" if found in ("v1", "v2") else
                         f"{name}: not a retinanet_resnet50_fpn ({found})")
    return state


def convert_to_model(state: dict, variant: Variant, name: str = "<state dict>",
                     overrides: Sequence[str] = ()) -> tuple[RetinaNet, Config, list[str], list[int]]:
    """(retina model in eval mode, parity config, class_names, cat_ids) from a torchvision
    state dict; ``name`` (the file) goes into error messages."""
    from retina.model import build_model

    state = _unwrap(state, name, variant)
    num_anchors = 9  # 3 sizes x 3 ratios per cell, torchvision's _default_anchorgen
    slots = state["head.classification_head.cls_logits.weight"].shape[0] // num_anchors
    if slots == COCO_SLOTS:
        cat_ids, class_names = coco_classes()
    else:
        cat_ids, class_names = list(range(slots)), [f"class_{k}" for k in range(slots)]
    cfg = torchvision_config(variant, len(cat_ids), overrides)
    model = build_model(cfg)
    target = model.state_dict()
    gn = cfg.model.head.norm == "gn"
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _retina_key(key, gn)
        if new is None:
            continue
        if new.startswith("head.cls_logits.") and slots != len(cat_ids):
            # (A*91, ...) -> (A, 91, ...) -> keep the real categories -> (A*80, ...)
            value = value.reshape(num_anchors, slots, *value.shape[1:])[:, cat_ids]
            value = value.reshape(num_anchors * len(cat_ids), *value.shape[2:])
        if new not in target or target[new].shape != value.shape:
            raise InputError(f"{name}: {key} {tuple(value.shape)} has no place in retina's "
                             f"{variant} model ({new})")
        out[new] = value.detach().to(target[new].dtype).clone()
    # retina-only buffers keep their fresh values: BatchNorm counters, the loss's EMA count.
    unfilled = [k for k in target if k not in out and not k.endswith("num_batches_tracked")
                and k != "num_pos_ema"]
    if unfilled:
        raise InputError(f"{name}: no torchvision weights for {unfilled[0]} "
                         f"({len(unfilled)} retina tensors left unfilled)")
    model.load_state_dict({k: out.get(k, v) for k, v in target.items()})
    return model.eval(), cfg, class_names, cat_ids


def convert_torchvision(state_dict_or_path: dict | str | Path, out_path: str | Path,
                        variant: Variant = "v1", overrides: Sequence[str] = ()) -> dict:
    """Write a retina checkpoint converted from torchvision's RetinaNet; returns it.
    ``overrides`` (dotted ``key=value``) change the stored parity config.

    Raises MissingFileError for a missing input file, InputError (naming the file) for one that
    is not a torchvision RetinaNet state dict of ``variant``: user errors, one line each.
    """
    from retina.engine.checkpoint import save_checkpoint

    state, name = _read(state_dict_or_path)
    model, cfg, class_names, cat_ids = convert_to_model(state, variant, name, overrides)
    ckpt = {"model": model.state_dict(), "config": config_to_dict(cfg), "class_names": class_names,
            "cat_ids": cat_ids, "iteration": 0, "source": f"torchvision retinanet {variant}: {name}"}
    save_checkpoint(ckpt, out_path)
    return ckpt


def convert_cli(in_path: str | Path, out_path: str | Path, variant: Variant = "v1",
                overrides: Sequence[str] = ()) -> str:
    """``retina convert torchvision --in IN --out OUT --variant v1|v2 [--set k=v ...]``:
    converts and returns the line to print."""
    ckpt = convert_torchvision(in_path, out_path, variant, overrides)
    return (f"wrote {out_path}: torchvision retinanet {variant}, {len(ckpt['class_names'])} classes; "
            f"evaluate with: retina eval --weights {out_path}")
