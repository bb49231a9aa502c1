"""Loading a config: YAML files (one ``base:`` each), dotted overrides, typed conversion.

A config file may name one ``base`` file (a path relative to itself, or a bundled config's name);
its own keys override the base's. Overrides (``loss.gamma=1``) are parsed as YAML scalars.
``_Sources`` records which file or ``--set`` item set each key, and how specific that source is
(a base below the file naming it, ``--set`` above both): ``rules.validate`` drops a key that a
more specific source's choice does not read, and refuses one written beside that choice. Every
error is a ``ConfigError`` whose message is one line naming the source of the value and the key:
the ``--set`` item, or the file that set the key (a base file when the value comes from there).
The CLI prints it and exits with status 2. Bundled configs (``configs/`` at the top of the
repository, ``retina/configs`` in the wheel) are found by name with ``find_config``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import yaml

from retina.config.errors import ConfigError
from retina.config.rules import validate
from retina.config.schema import Config
from retina.config.yaml_io import read_yaml_file, yaml_load


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _scalar(text: str) -> Any:
    """One comma-separated item of a list given as a string: a YAML scalar, else the text."""
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text.strip()


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
        if isinstance(value, str) and "," in value:  # `--set data.classes=cat,dog`, `min_size=224,256`
            value = [v.strip() if args[0] is str else _scalar(v) for v in value.split(",")]
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


def _build(cls: type, data: Any, prefix: str, source_of: Callable[[str], str]) -> Any:
    """``cls`` filled from ``data``; ``source_of(key)`` names where a bad key's value came from."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".")
        raise ConfigError(f"{source_of(section)}: {section or 'top level'} should be a mapping")
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise ConfigError(f"{source_of(key)}: unknown key '{key}'"
                              f"{_nearest(str(name), list(types_))}")
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{key}.", source_of)
        else:
            kwargs[name] = _convert(value, tp, key, source_of(key))
    return cls(**kwargs)


class _Sources:
    """Which file or ``--set`` item set each dotted key, in the order they were applied, and how
    specific that source is (``rules.Origins``): its rank, 0 for the schema default, then one
    per file in the order they apply (a base below the file naming it), then the ``--set`` items
    together, above every file."""

    def __init__(self, fallback: str) -> None:
        self.fallback = fallback  # for keys nobody set (or a whole file's shape)
        self._set: dict[str, tuple[int, str, int]] = {}  # key -> (when, source, rank)
        self._clock = 0
        self._ranks = 0

    def next_rank(self) -> int:
        """A rank above every rank given so far: for the next file, or for the overrides."""
        self._ranks += 1
        return self._ranks

    def record(self, data: Any, source: str, rank: int, prefix: str = "") -> None:
        """Every key of ``data`` (nested mappings: their keys) as set by ``source``, now."""
        if isinstance(data, dict):
            for k, v in data.items():
                self.record(v, source, rank, f"{prefix}.{k}" if prefix else str(k))
        elif prefix:
            self._clock += 1
            self._set[prefix] = (self._clock, source, rank)

    def forget(self, key: str) -> None:
        """``key`` and the keys under it: an override replaced the value as a whole."""
        for k in [k for k in self._set if k == key or k.startswith(key + ".")]:
            del self._set[k]

    def _entry(self, key: str) -> Optional[tuple[int, str, int]]:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):  # the key, else a section that was set as a whole
            found = self._set.get(".".join(parts[:n]))
            if found is not None:
                return found
        return None

    def blame(self, keys: Sequence[str]) -> Optional[str]:
        """The source that set the last-applied of ``keys``; None when none was set."""
        found = [e for e in map(self._entry, keys) if e is not None]
        return max(found)[1] if found else None

    def rank(self, key: str) -> int:
        """The rank of the source that set ``key``; 0 when none did (the schema default)."""
        found = self._entry(key)
        return found[2] if found is not None else 0

    def of(self, key: str) -> str:
        return self.blame([key]) or self.fallback


# ------------------------------------------------------------------------------------ loading
def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, sources: _Sources, _chain: tuple[Path, ...] = ()) -> dict:
    """The merged keys of ``path`` and its bases; ``sources`` learns which file set each."""
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level should be a mapping")
    data.pop("ablate", None)  # a sweep's grid, read only by retina/studies/ablate.py
    base = data.pop("base", None)
    if base is not None:
        base_path = (path.parent / str(base)).resolve()
        if not base_path.is_file():  # else a bundled config by name: base: photos_cpu
            base_path = next((c for c in (CONFIG_DIR / str(base), CONFIG_DIR / f"{base}.yaml")
                              if c.is_file()), base_path).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: base file '{base}' not found (beside it, or a bundled config)")
        chain = _chain + (path.resolve(),)
        if base_path in chain:  # a.yaml -> b.yaml -> a.yaml would recurse forever
            raise ConfigError(f"{path}: base file '{base}' makes a cycle of bases")
        base_data = _read_yaml(base_path, sources, chain)  # recorded first: the file overrides it
        sources.record(data, str(path), sources.next_rank())
        return _merge(base_data, data)
    sources.record(data, str(path), sources.next_rank())
    return data


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. loss.gamma=1.0")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else None
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
    """``data`` (nested mappings), then ``overrides``, type-checked and validated; errors name
    ``source`` for the keys of ``data``."""
    sources = _Sources(source)
    sources.record(data, source, sources.next_rank())
    return _from_dict(data, overrides, sources)


def _from_dict(data: dict, overrides: Sequence[str], sources: _Sources) -> Config:
    data = copy.deepcopy(data)  # the overrides edit nested sections: the caller's stay as they are
    rank = sources.next_rank()  # every --set item alike: above the files, whatever their order
    for item in overrides:
        key_path, value = _parse_override(item)
        data = _apply_override(data, key_path, value)
        # Overrides are checked against the schema with their own name in the message.
        _build(Config, _apply_override({}, key_path, value), "", lambda _: f"--set {item}")
        key = ".".join(key_path)
        sources.forget(key)
        sources.record(value, f"--set {item}", rank, key)
    return validate(_build(Config, data, "", sources.of), sources.fallback, sources)


# The bundled configs: configs/ at the top of a checkout, shipped in the wheel as retina/configs
# (pyproject's package-dir), so an installed retina finds them by name too.
_PACKAGE = Path(__file__).resolve().parent.parent
CONFIG_DIR = _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"


def find_config(name: str | Path) -> Path:
    """A path as given, else a bundled config: ``shapes``, ``shapes.yaml``, ``ablations/shapes_focal``
    or ``configs/shapes.yaml`` (from any folder) all name the bundled ``configs/shapes.yaml``."""
    path = Path(name)
    if path.is_file():
        return path
    rel = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    for candidate in (CONFIG_DIR / rel, CONFIG_DIR / f"{rel}.yaml"):
        if candidate.is_file():
            return candidate
    return path  # load_config reports it as missing


def bundled_configs() -> list[str]:
    """The bundled configs' names, as ``--config`` takes them: ``shapes``, ``ablations/table1_core``."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def _config_hint(path: Path) -> str:
    """"; did you mean 'shapes'?" for a mistyped bundled name, else the list to choose from."""
    name = str(path.with_suffix("")) if path.suffix == ".yaml" else str(path)
    close = difflib.get_close_matches(name, bundled_configs(), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f" (bundled: {', '.join(bundled_configs())})"


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (a path, or a bundled config's name: ``load_config("shapes")``) and its
    base, apply ``key=value`` overrides, type-check, validate: the effective values (``rules``)."""
    if path is not None:
        path = find_config(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found{_config_hint(path)}")
    sources = _Sources(str(path) if path is not None else "<defaults>")
    data = _read_yaml(path, sources) if path is not None else {}
    return _from_dict(data, overrides, sources)


def config_to_dict(cfg: Config) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def flat_keys(data: dict, prefix: str = "") -> dict[str, Any]:
    """The leaves of nested mappings under their dotted keys: {"loss": {"gamma": 2}} -> {"loss.gamma": 2}."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(before: dict, after: Config) -> list[str]:
    """``key: old -> new`` for each key whose value differs between ``before`` (a stored
    ``config_to_dict``, e.g. a checkpoint's) and ``after``; keys only one side has count too."""
    old, new = flat_keys(before), flat_keys(config_to_dict(after))
    missing = "(absent)"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
            for k in sorted(old.keys() | new.keys()) if old.get(k, missing) != new.get(k, missing)]


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def replace(cfg: Config, **sections: Any) -> Config:
    """``replace(cfg, model=dataclasses.replace(cfg.model, num_classes=3))``, re-validated; every
    value ranks alike here, so a key its choice does not read is refused, not dropped."""
    return validate(dataclasses.replace(cfg, **sections))
