"""retina: RetinaNet training, evaluation and focal-loss ablations on COCO-format data.

The names below are imported on first use (PEP 562 module ``__getattr__``): ``import retina``
and the command line's help, argument and config errors stay free of torch, which takes seconds
to import; ``retina.RetinaNet`` or ``from retina import build_model`` imports it then.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_LAZY = {
    "Config": "retina.config",
    "ConfigError": "retina.config",
    "load_config": "retina.config",
    "build_model": "retina.model",
    "RetinaNet": "retina.model",
}

__all__ = ["Config", "ConfigError", "load_config", "build_model", "RetinaNet"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'retina' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
