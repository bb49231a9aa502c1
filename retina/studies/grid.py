"""Grids of config overrides for ``retina ablate``: ``key=v1,v2,...`` items, the ``ablate:``
section of a config file (``grids``, ``seeds``), their expansion into each run's ``--set``
overrides, and run names. The grammar and the section are described in ``ablate.py``.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from retina.config import ConfigError, read_yaml_file, yaml_load
from retina.studies.runs import short_keys

__all__ = ["expand_grid", "grids_from_config", "parse_grid", "run_name", "seeds_from_config", "check_seeds"]


# ------------------------------------------------------------------------------------- grids
def split_values(raw: str) -> list[str]:
    """``"0,[96,128],'a,b'"`` -> ``["0", "[96,128]", "'a,b'"]``: commas at depth 0 split."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(raw):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    parts.append(raw[start:])
    return [p.strip() for p in parts]


def parse_grid(item: str) -> tuple[str, list[str]]:
    """``"loss.gamma=0,0.5"`` -> ``("loss.gamma", ["0", "0.5"])``; values checked as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"--grid {item}: expected key=v1,v2,..., e.g. loss.gamma=0,0.5,1,2")
    values = split_values(raw)
    seen: dict[str, Any] = {}
    for v in values:
        if not v:
            raise ConfigError(f"--grid {item}: empty value")
        try:
            parsed = yaml_load(v)
        except yaml.YAMLError:
            raise ConfigError(f"--grid {item}: value {v!r} is not valid YAML") from None
        same = [u for u, p in seen.items() if p == parsed and isinstance(p, bool) == isinstance(parsed, bool)]
        if same:  # 0 and 0.0 set the same config: the same run twice
            raise ConfigError(f"--grid {item}: value {v} is {same[0]} again; list each value once")
        seen[v] = parsed
    return key, values


def expand_grid(grids: Sequence[str]) -> list[list[str]]:
    """Every combination of the grids as ``--set`` overrides; no grid: one run, no override.

    ``["loss.gamma=0,1", "loss.alpha=0.25,0.75"]`` -> ``[["loss.gamma=0", "loss.alpha=0.25"],
    ["loss.gamma=0", "loss.alpha=0.75"], ["loss.gamma=1", "loss.alpha=0.25"], ...]``.
    """
    parsed = [parse_grid(g) for g in grids]
    keys = [k for k, _ in parsed]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"--grid: key '{repeated[0]}' given twice; list its values once")
    return [[f"{k}={v}" for k, v in zip(keys, combo)]
            for combo in itertools.product(*(values for _, values in parsed))]


def _yaml_value_text(value: Any) -> str:
    """A value of an ``ablate:`` section back to ``--set`` text (JSON is YAML)."""
    if isinstance(value, str) and yaml_load(value) == value:
        return value
    return json.dumps(value)


def _ablate_section(path: str | Path) -> dict:
    """The ``ablate:`` mapping of a config file (its own text, not its base's); {} when none."""
    data = read_yaml_file(path) or {}
    section = data.get("ablate") if isinstance(data, dict) else None
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: ablate should be a mapping with grids and/or seeds")
    unknown = sorted(set(section) - {"grids", "seeds"})
    if unknown:
        raise ConfigError(f"{path}: unknown key 'ablate.{unknown[0]}'; expected ablate.grids or ablate.seeds")
    return section


def grids_from_config(path: str | Path) -> list[list[str]]:
    """The ``ablate: grids:`` of a config file (its own text, not its base's) as lists of
    ``--grid`` items, one list per product; [] when it has none."""
    grids = _ablate_section(path).get("grids", [])
    if not isinstance(grids, list) or not all(isinstance(g, dict) and g for g in grids):
        raise ConfigError(f"{path}: ablate.grids should be a list of mappings key: [values]")
    out = []
    for g in grids:
        items = []
        for key, values in g.items():
            values = values if isinstance(values, list) else [values]
            items.append(f"{key}=" + ",".join(_yaml_value_text(v) for v in values))
        out.append(items)
    return out


def seeds_from_config(path: str | Path) -> Optional[int]:
    """The ``ablate: seeds:`` of a config file; None when it has none."""
    seeds = _ablate_section(path).get("seeds")
    if seeds is not None:
        check_seeds(seeds, f"{path}: ablate.seeds")
    return seeds


def check_seeds(seeds: Any, where: str) -> None:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"{where}={seeds!r}: the number of seeds must be an integer >= 1")


# ------------------------------------------------------------------------------------ naming
def _clean_value(raw: str) -> str:
    v = raw.strip().strip("'\"")
    v = re.sub(r"[\[\]{}'\" ]", "", v).replace(",", "-")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", v) or "_"


def run_name(overrides: Sequence[str]) -> str:
    """``["loss.gamma=0.5", "loss.alpha=0.25"]`` -> ``"gamma=0.5,alpha=0.25"``, a directory name.

    Keys shortened to their shortest unambiguous suffix, values stripped of brackets and quotes
    (list items joined by ``-``), any other character outside ``[A-Za-z0-9._+-]`` -> ``_``.
    No override: ``"default"``.
    """
    if not overrides:
        return "default"
    pairs = [o.split("=", 1) for o in overrides]
    keys = short_keys([k.strip() for k, _ in pairs])
    name = ",".join(f"{re.sub(r'[^A-Za-z0-9._+-]', '_', k)}={_clean_value(v)}"
                    for k, (_, v) in zip(keys, pairs))
    return name if len(name) <= 200 else name[:200]
