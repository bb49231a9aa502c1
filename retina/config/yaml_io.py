"""YAML as the config reads it: YAML 1.2 scalars on PyYAML's SafeLoader.

``yaml_load`` and ``read_yaml_file`` are public: the sweep code reads grids and run configs with
the same rules.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from retina.config.errors import ConfigError


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


def yaml_load(text: str) -> Any:
    """Parse YAML text with YAML 1.2 booleans and floats (see ``_YamlLoader``)."""
    return yaml.load(text, Loader=_YamlLoader)


def read_yaml_file(path: str | Path) -> Any:
    """The YAML of a config file; ``ConfigError`` (one line naming the file, and the line of a
    syntax error) when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where} YAML syntax error: {problem}") from None
