"""Typed configuration: nested frozen dataclasses filled from YAML, then from dotted overrides.

- ``schema.py``: the dataclasses, every key documented where it is declared.
- ``rules.py``: value ranges, relations between keys, and which keys apply to the chosen variant
  (``validate``: a key the variant does not read is refused when written beside its choice,
  dropped with a notice when a more specific source changed the choice; ``show_notices`` prints
  the notices; ``key_applies`` for tables that print "-" for a key a run does not read).
- ``loader.py``: YAML files with one ``base:``, ``--set`` overrides, typed conversion, the bundled
  configs (``find_config``), writing a config back (``dump_config``).
- ``yaml_io.py``: the YAML 1.2 reader shared with the sweep code (``yaml_load``, ``read_yaml_file``).
- ``errors.py``: ``ConfigError`` (a ``retina.errors.RetinaError``), one line naming the source of
  the value (the ``--set`` item, or the file that set the key) and the key.

A ``Config`` is read at the top only: by the factories (``build_model``, ``build_dataset``,
``build_optimizer``), the trainer, checkpoint loading and the entry points of the CLI verbs
(retina/studies, retina/deploy, and the harnesses in benchmarks/); the modules below them take plain,
typed arguments.
"""

from retina.config.errors import ConfigError
from retina.config.loader import (CONFIG_DIR, config_changes, config_from_dict, config_to_dict, dump_config,
                                  find_config, flat_keys, load_config, replace)
from retina.config.rules import get_key, key_applies, show_notices, validate
from retina.config.schema import *  # noqa: F401,F403  (the dataclasses: Config, ModelConfig, ...)
from retina.config.schema import Config, __all__ as _schema_names
from retina.config.yaml_io import read_yaml_file, yaml_load

__all__ = ["CONFIG_DIR", "Config", "ConfigError", "config_changes", "config_from_dict", "config_to_dict",
           "dump_config", "find_config", "flat_keys", "get_key", "key_applies", "load_config", "read_yaml_file",
           "replace", "show_notices", "validate", "yaml_load", *_schema_names]
