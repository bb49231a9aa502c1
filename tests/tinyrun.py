"""A tiny training setup shared by the end-to-end tests (imported by them; not a test file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retina.config import Config, config_from_dict, config_to_dict

TINY_DATA = {"num_train": 64, "num_val": 16, "image_size": 64, "seed": 0}


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config(root: Path, **sections: Any) -> Config:
    """ResNet-18 + 48-channel FPN on P3-P5, 64 px: objects are 10-51 px, anchors 8..51 px.
    AdamW: on this 64-image set it learns in far fewer steps than SGD (measured AP50 33 vs 11
    after 250-300 steps). ``sections`` are merged in, e.g. ``solver={"max_iter": 6}``."""
    base = {
        "model": {"backbone": {"depth": 18}, "fpn": {"channels": 48, "max_level": 5},
                  "anchors": {"sizes": [8, 16, 32]}, "head": {"num_convs": 1, "norm": "gn"},
                  "input": {"min_size": [64], "max_size": 64, "size_divisibility": 32}},
        "data": {"dataset": "shapes", "root": str(root), "num_workers": 0, "shapes": TINY_DATA},
        "solver": {"optimizer": "adamw", "lr": 0.002, "batch_size": 8, "max_iter": 250,
                   "schedule": "cosine", "warmup_iters": 20},
        "train": {"checkpoint_period": 100, "log_period": 10},
        "eval": {"batch_size": 16},
    }
    return config_from_dict(merge(base, sections))


def with_changes(cfg: Config, **sections: Any) -> Config:
    return config_from_dict(merge(config_to_dict(cfg), sections))
