"""retina: RetinaNet training, evaluation and focal-loss ablations on COCO-format data."""

from retina.config import Config, ConfigError, load_config
from retina.model import RetinaNet, build_model

__all__ = ["Config", "ConfigError", "load_config", "build_model", "RetinaNet"]
__version__ = "0.1.0"
