"""Starting a run from a detector (``model.init``, ``retina train --init``): the weights of a
retina checkpoint (or a torchvision COCO RetinaNet converted by ``retina convert``) loaded into a
model that may predict other classes.

Every tensor whose name and shape fit is loaded: the deployed weights of the checkpoint (its EMA
when it has one, ``checkpoint.deployed_weights``), FrozenBatchNorm buffers included; frozen stages
stay frozen (loading does not touch ``requires_grad``). When the classes differ (other names, or
another count) the class predictor is re-initialised as a new head's (Sec. 4.1: weights normal
with std 0.01, bias ``prior_bias(pi)``), so training starts from the same foreground prior;
then the rows of each class the checkpoint also has, by name, are copied from it (a COCO
detector fine-tuned on "person" and "dog" keeps its person and dog predictors). The
running positive count of the source run's loss normaliser (``num_pos_ema``) is run state, not
a weight: it is neither loaded nor counted.

``load_init`` returns one line saying what was loaded and what was not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from retina.engine.checkpoint import CheckpointError, checkpoint_file, deployed_weights, load_checkpoint
from retina.model.head import prior_bias

CLASS_PREDICTOR = ("head.cls_logits.weight", "head.cls_logits.bias")
RUN_STATE = ("num_pos_ema",)


def _names(keys: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _source_classes(ckpt: dict, weights: dict[str, Tensor], num_anchors: int) -> Optional[list[str] | int]:
    """The checkpoint's class names, else its class count from the predictor's bias (K * A)."""
    if ckpt.get("class_names"):
        return list(ckpt["class_names"])
    bias = weights.get(CLASS_PREDICTOR[1])
    return bias.numel() // num_anchors if bias is not None and bias.numel() % num_anchors == 0 else None


def _classes_text(source: list[str] | int | None, class_names: Sequence[str]) -> str:
    count = len(source) if isinstance(source, list) else source
    if count is not None and count != len(class_names):
        return f"{count} -> {len(class_names)} classes"
    return f"classes {source} -> {list(class_names)}"


def _copy_classes_by_name(predictor: nn.Conv2d, num_anchors: int, weights: dict[str, Tensor],
                          source: list[str] | int | None, class_names: Sequence[str]) -> list[str]:
    """Copy the checkpoint's predictor rows of every class in both lists (by name) into
    ``predictor``, whose A * K rows are anchor-major (``to_n_hwa_c``: row a * K + k); returns
    the names copied. None when the checkpoint names no classes or its predictor is not A x its
    classes of the same tower width."""
    if not isinstance(source, list) or CLASS_PREDICTOR[0] not in weights:
        return []
    src_w, src_b = weights[CLASS_PREDICTOR[0]], weights[CLASS_PREDICTOR[1]]
    num_classes, dst_w = len(class_names), predictor.weight
    if src_w.shape[0] != num_anchors * len(source) or src_w.shape[1:] != dst_w.shape[1:] \
            or dst_w.shape[0] != num_anchors * num_classes:
        return []
    pairs = [(k, source.index(name)) for k, name in enumerate(class_names) if name in source]
    if not pairs:
        return []
    dst, src = torch.tensor([k for k, _ in pairs]), torch.tensor([j for _, j in pairs])
    dst_w.view(num_anchors, num_classes, *dst_w.shape[1:])[:, dst] = \
        src_w.view(num_anchors, len(source), *src_w.shape[1:])[:, src].to(dst_w)  # (A, K, C, 3, 3)
    predictor.bias.view(num_anchors, num_classes)[:, dst] = \
        src_b.view(num_anchors, len(source))[:, src].to(predictor.bias)  # (A, K)
    return [class_names[k] for k, _ in pairs]


@torch.no_grad()
def load_init(model: nn.Module, path: str | Path, class_names: Sequence[str], prior_prob: float) -> str:
    """Load the tensors of checkpoint ``path`` (a run directory: its newest) that fit ``model``
    (a ``RetinaNet`` predicting ``class_names``); re-initialise its class predictor when the
    checkpoint's classes differ, keeping the rows of the classes both name.

    Returns one line: ``init: L/T tensors from PATH`` (L loaded of the model's T), then what was
    re-initialised, kept as initialised (not in the checkpoint or of another shape) and left
    unused in the checkpoint.

    Raises:
        CheckpointError: ``path`` is missing, unreadable, unsafe or has no tensor that fits; one
            line naming it.
    """
    path = checkpoint_file(path)  # a run directory: its newest checkpoint
    ckpt = load_checkpoint(path)
    weights = {k: v for k, v in deployed_weights(ckpt).items() if k not in RUN_STATE}
    own = {k: v for k, v in model.state_dict().items() if k not in RUN_STATE}
    source_classes = _source_classes(ckpt, weights, model.anchor_generator.num_anchors)
    differ = (isinstance(source_classes, list) and source_classes != list(class_names)) or any(
        k in weights and weights[k].shape != own[k].shape for k in CLASS_PREDICTOR)
    fits = {k: v for k, v in weights.items() if k in own and v.shape == own[k].shape
            and not (differ and k in CLASS_PREDICTOR)}  # fmt: skip
    if not fits:
        raise CheckpointError(f"{path}: no tensor fits this model (model.init); is it a retina "
                              f"checkpoint of this architecture? e.g. {_names(sorted(weights))}")
    model.load_state_dict(fits, strict=False)
    parts = [f"init: {len(fits)}/{len(own)} tensors from {path}"]
    if differ:
        predictor = model.head.cls_logits
        nn.init.normal_(predictor.weight, std=0.01)  # Sec. 4.1, as RetinaHead initialises it
        nn.init.constant_(predictor.bias, prior_bias(prior_prob))
        by_name = _copy_classes_by_name(predictor, model.anchor_generator.num_anchors, weights,
                                        source_classes, class_names)  # fmt: skip
        change = _classes_text(source_classes, class_names)
        if by_name:
            parts.append(f"head.cls_logits.{{weight,bias}}: {len(by_name)} of {len(class_names)} "
                         f"classes taken by name ({_names(by_name)}), "
                         f"{len(class_names) - len(by_name)} re-initialised ({change})")
        else:
            parts.append(f"re-initialised head.cls_logits.{{weight,bias}} ({change})")
    kept = [k for k in own if k not in fits and not (differ and k in CLASS_PREDICTOR)]
    if kept:
        parts.append(f"kept as initialised (not in it or of another shape): {_names(kept)}")
    unused = [k for k in weights if k not in fits and not (differ and k in CLASS_PREDICTOR)]
    if unused:
        parts.append(f"{len(unused)} of its tensors unused: {_names(unused)}")
    return "; ".join(parts)
