"""``retina analyze model``: parameters and FLOPs of a config (or a trained run), as detectron2's
``analyze_model.py`` and mmdet's ``get_flops.py`` report them.

Parameters are counted per top-level module (backbone, fpn, head); trainable ones are those with
``requires_grad`` (a pretrained backbone's FrozenBatchNorm holds buffers, not parameters, and its
first ``freeze_at`` stages are frozen). FLOPs are those of one inference forward on a dummy
image of the config's inference size (shorter side ``model.input.test_min_size``, by default
``min_size[-1]``, longer side ``test_max_size``, by default ``max_size``: 800 x 1333 for the COCO
configs), counted by
``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products only, 2 FLOPs per
multiply-add (detectron2 and mmdet count 1 per multiply-add: halve to compare). Resizing,
normalisation, activations, decoding and NMS are not counted.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from retina.config import Config, replace
from retina.errors import UsageError
from retina.engine.evaluate import write_json
from retina.model.resize import eval_size, resized_size

TOP_MODULES = ("backbone", "fpn", "head")


def count_parameters(model: nn.Module) -> dict:
    """``{"total", "trainable", "by_module": {name: {"total", "trainable"}}}`` for the model's
    direct children that hold parameters."""
    def count(params) -> tuple[int, int]:
        params = list(params)
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    total, trainable = count(model.parameters())
    by_module = {}
    for name, child in model.named_children():
        t, tr = count(child.parameters())
        if t:
            by_module[name] = {"total": t, "trainable": tr}
    return {"total": total, "trainable": trainable, "by_module": by_module}


def count_flops(model: nn.Module, image_size: tuple[int, int]) -> dict[str, int]:
    """FLOPs of ``model([image])`` in eval + inference mode, for a (3, H, W) image of
    ``image_size`` in [0, 1] (which the model first resizes to its input size, as in inference):
    ``{"total": n, "<module path>": n, ...}`` with module paths
    relative to the model ("backbone", "head.cls_logits", ...). A shared module (the head runs
    once per pyramid level) holds the sum over its calls."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    image = torch.full((3, *image_size), 0.5, device=device)
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            model([image])
    finally:
        model.train(was_training)
    root = type(model).__name__
    flops = {"total": int(counter.get_total_flops())}
    for path, per_op in counter.get_flop_counts().items():
        if path.startswith(root + "."):  # "RetinaNet.head.cls_logits" -> "head.cls_logits"
            flops[path[len(root) + 1:]] = int(sum(per_op.values()))
    return flops


def inference_size(cfg: Config) -> tuple[int, int]:
    """(H, W) of the dummy image: the config's inference shorter side x its longer-side cap, as
    the model resizes it (a shorter side above the cap is scaled down with the cap)."""
    i = cfg.model.input
    short, cap = eval_size(i.min_size, i.max_size, i.test_min_size, i.test_max_size)
    return tuple(resized_size(short, cap, short, cap))  # type: ignore[return-value]


def padded_size(size: tuple[int, int], divisibility: int) -> tuple[int, int]:
    return tuple(-(-s // divisibility) * divisibility for s in size)  # type: ignore[return-value]


def model_for_counting(cfg: Config) -> nn.Module:
    """``build_model(cfg)`` without loading pretrained backbone weights (they change no count,
    and may need a download): the same norm layers and frozen stages as with them."""
    from retina.model import build_model

    b = cfg.model.backbone
    if b.weights is None:
        return build_model(cfg)
    norm = "frozen_bn" if b.norm == "auto" else b.norm
    backbone_cfg = dataclasses.replace(b, weights=None, norm=norm)
    model = build_model(replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone_cfg)))
    model.backbone.freeze(b.freeze_at)  # what the backbone does when given weights
    return model


def model_stats(model: nn.Module, cfg: Config) -> dict:
    """Parameters and FLOPs of ``model`` at the inference size of ``cfg``."""
    size = inference_size(cfg)
    flops = count_flops(model, size)
    return {"input_size": list(size),
            "padded_size": list(padded_size(size, cfg.model.input.size_divisibility)),
            "params": count_parameters(model),
            "flops": {"total": flops["total"], "by_module": {m: flops.get(m, 0) for m in TOP_MODULES}},
            "gflops": flops["total"] / 1e9, "gmacs": flops["total"] / 2e9}


def format_stats(stats: dict) -> str:
    p, f = stats["params"], stats["flops"]
    h, w = stats["input_size"]
    ph, pw = stats["padded_size"]
    lines = [f"classes: {stats['num_classes']} ({stats['classes_from']})"] if "num_classes" in stats else []
    lines += [f"parameters: {p['total'] / 1e6:.2f} M ({p['trainable'] / 1e6:.2f} M trainable)",
             f"FLOPs at {h}x{w} (padded {ph}x{pw}): {stats['gflops']:.1f} GFLOPs "
             f"= {stats['gmacs']:.1f} G multiply-adds", "",
             f"{'module':<9} | {'params (M)':>10} | {'trainable (M)':>13} | {'GFLOPs':>7}",
             "-" * 50]
    for name in TOP_MODULES:
        pm = p["by_module"].get(name, {"total": 0, "trainable": 0})
        lines.append(f"{name:<9} | {pm['total'] / 1e6:>10.3f} | {pm['trainable'] / 1e6:>13.3f} | "
                     f"{f['by_module'][name] / 1e9:>7.2f}")
    return "\n".join(lines)


def model_cli(config: Optional[str] = None, weights: Optional[str] = None, overrides: Sequence[str] = (),
              json_path: Optional[str] = None, device: str = "cpu") -> int:
    """``retina analyze model --config C | --weights RUN [--set k=v] [--json F]``."""
    from retina.config import find_config, load_config
    from retina.engine.dist import resolve_device

    if config is None and weights is None:
        raise UsageError("retina analyze model needs --config C or --weights RUN")
    dev = resolve_device(device)
    if weights is not None:
        from retina.engine.checkpoint import load_model

        cfg = load_config(find_config(config), list(overrides)) if config else None
        model, cfg, class_names, _ = load_model(weights, dev, tuple(overrides), cfg)
        classes = (len(class_names) if class_names else cfg.model.num_classes, "the checkpoint's")
    else:
        from retina.data import dataset_num_classes

        cfg = load_config(find_config(config), list(overrides))
        # training replaces model.num_classes (80 by default) with the data's count: count that model
        k = dataset_num_classes(cfg)
        if k is None:
            classes = (cfg.model.num_classes, f"model.num_classes; the data at data.root={cfg.data.root} "
                                              f"could not be read")
        else:
            classes = (k, "the train set's, as training sets model.num_classes")
            cfg = replace(cfg, model=dataclasses.replace(cfg.model, num_classes=k))
        model = model_for_counting(cfg).to(dev)
    stats = {"num_classes": classes[0], "classes_from": classes[1], **model_stats(model, cfg)}
    print(format_stats(stats))
    if json_path:
        write_json(json_path, stats)
        print(f"json: {json_path}")
    return 0
