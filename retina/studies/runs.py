"""What a sweep directory holds: its runs (swept values, resolved config, metrics, last losses,
wall time), read from the run directories alone, and the runs grouped over seeds.

A run directory is a direct subdirectory holding ``ablate_run.json`` or ``config.yaml``. The swept
keys are the keys of its grid overrides plus any config key whose resolved value differs between
runs; values come from the run's resolved ``config.yaml`` (else its overrides, else the defaults).

Seeds: runs that differ only in ``train.seed`` are one *setting*. Its AP is the mean over the
finished seeds with the sample standard deviation (n - 1 in the denominator). Two settings are
a *tie* when their means differ by less than twice the larger of their two standard deviations:
|mean_a - mean_b| < 2 max(std_a, std_b); with fewer than 2 finished seeds on either side there is
no standard deviation and no verdict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from retina.config import Config, config_to_dict, flat_keys, yaml_load
from retina.io import read_jsonl

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SEED_KEY = "train.seed"
CURVE_KEY = "val/AP"  # the validation AP of an evaluation during training, in metrics.jsonl
TIE_STDS = 2.0  # a difference under 2 std is a tie


@dataclass
class RunRow:
    name: str
    status: str  # done | failed | running | interrupted | unfinished
    values: dict[str, Any]  # swept key -> resolved value
    metrics: dict[str, Optional[float]] = field(default_factory=dict)
    loss_cls: Optional[float] = None
    loss_box: Optional[float] = None
    wall_s: Optional[float] = None
    error: Optional[str] = None
    cfg: Config = field(default_factory=Config)  # the run's config, as written (not re-validated)
    curve: dict[int, float] = field(default_factory=dict)  # val AP by iteration (train.eval_period)

    @property
    def ap(self) -> Optional[float]:
        return self.metrics.get("AP")


def short_keys(keys: Sequence[str]) -> list[str]:
    """The shortest dotted suffix of each key that no other key shares: loss.gamma -> gamma,
    unless loss.focal_star.gamma is there too (then loss.gamma and focal_star.gamma)."""
    out = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out.append(suffix)
    return out


def _config_as_written(flat: dict[str, Any]) -> Config:
    """The defaults with the run's flat values put in, without validation: a run made before a
    rule existed (e.g. OHEM with loss.gamma 2, before gamma had to be 0) still gets its row."""

    def fill(section: Any, prefix: str) -> Any:
        changes = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                changes[f.name] = fill(value, f"{prefix}{f.name}.")
            elif f"{prefix}{f.name}" in flat:
                changes[f.name] = _as_field(value, flat[f"{prefix}{f.name}"])
        return dataclasses.replace(section, **changes)

    return fill(Config(), "")


def _as_field(default: Any, value: Any) -> Any:
    """A YAML list as the tuple its field holds (the type of the field's default), nested too, so
    the config equals the one ``load_config`` gives and validates like it."""
    if isinstance(default, tuple) and isinstance(value, list):
        inner = default[0] if default else None
        return tuple(_as_field(inner, v) for v in value)
    return value


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_losses(records: Sequence[dict]) -> tuple[Optional[float], Optional[float]]:
    """(loss_cls, loss_box) of the last logged training record of metrics.jsonl."""
    last = next((r for r in reversed(records) if "loss_cls" in r), {})
    return last.get("loss_cls"), last.get("loss_box")


def _val_curve(records: Sequence[dict]) -> dict[int, float]:
    """{iteration: val AP} of the evaluations logged in metrics.jsonl; a resumed run that
    evaluated an iteration twice keeps the later record."""
    return {int(r["iter"]): float(r[CURVE_KEY]) for r in records
            if "iter" in r and _number(r.get(CURVE_KEY)) is not None}


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def sort_key(v: Any) -> tuple:
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, float(v), "")
    return (2, 0.0, str(v))


def collect_runs(out_dir: str | Path, metrics_file: str = "metrics.json") -> tuple[list[str], list[RunRow]]:
    """(swept keys, one row per run directory of ``out_dir``, sorted by the swept values).

    ``metrics_file``: where in each run directory the metrics are read, e.g.
    ``eval_thr0/metrics.json`` for a re-evaluation (``retina eval --weights RUN --out RUN/eval_thr0``);
    a run is finished when its training wrote ``metrics.json``, whichever file is read."""
    dirs = sorted(d for d in Path(out_dir).iterdir()
                  if d.is_dir() and ((d / "ablate_run.json").is_file() or (d / "config.yaml").is_file()))
    infos = []
    for d in dirs:
        run_file = _read_json(d / "ablate_run.json") or {}
        overrides = {k.strip(): yaml_load(v) for k, _, v in
                     (o.partition("=") for o in run_file.get("overrides", []))}
        try:
            config = flat_keys(yaml.safe_load((d / "config.yaml").read_text()) or {})
        except (OSError, yaml.YAMLError):
            config = None
        infos.append((d, run_file, overrides, config))
    keys: list[str] = []
    for _, _, overrides, _ in infos:
        keys += [k for k in overrides if k not in keys]
    configs = [c for *_, c in infos if c is not None]
    if len(configs) > 1:
        keys += [k for k in configs[0] if k not in keys and any(c.get(k) != configs[0][k] for c in configs)]
    defaults = flat_keys(config_to_dict(Config()))

    rows = []
    for d, run_file, overrides, config in infos:
        flat = {**defaults, **overrides, **(config or {})}
        finished = _read_json(d / "metrics.json")
        status = "done" if finished is not None else run_file.get("status", "unfinished")
        status = "unfinished" if status == "done" and finished is None else status
        metrics = finished if metrics_file == "metrics.json" else _read_json(d / metrics_file)
        log = read_jsonl(d / "metrics.jsonl")
        loss_cls, loss_box = _last_losses(log)
        rows.append(RunRow(d.name, status, {k: flat.get(k) for k in keys},
                           {m: _number((metrics or {}).get(m)) for m in METRICS},
                           _number(loss_cls), _number(loss_box), _number(run_file.get("wall_s")),
                           run_file.get("error") if finished is None else None, _config_as_written(flat),
                           _val_curve(log)))
    order = [k for k in keys if k != SEED_KEY] + [k for k in keys if k == SEED_KEY]  # a setting's seeds together
    rows.sort(key=lambda r: tuple(sort_key(r.values[k]) for k in order) + (r.name,))
    return keys, rows


# ------------------------------------------------------------------------------------- seeds
@dataclass
class Setting:
    """The runs of one combination of swept values, over seeds."""

    name: str  # the run name without its seed
    values: dict[str, Any]  # swept keys other than train.seed
    runs: list[RunRow]

    @property
    def cfg(self) -> Config:
        return self.runs[0].cfg

    def scores(self, metric: str = "AP") -> list[float]:
        return [r.metrics[metric] for r in self.runs if r.metrics.get(metric) is not None]

    @property
    def n(self) -> int:
        """Finished seeds."""
        return len(self.scores())

    def mean(self, metric: str = "AP") -> Optional[float]:
        s = self.scores(metric)
        return statistics.fmean(s) if s else None

    def std(self, metric: str = "AP") -> Optional[float]:
        """Sample standard deviation over the finished seeds (n - 1); None with fewer than 2."""
        s = self.scores(metric)
        return statistics.stdev(s) if len(s) >= 2 else None

    @property
    def ap(self) -> Optional[float]:
        return self.mean("AP")


_SEED_PART = re.compile(r"(^|,)(train\.)?seed=[^,]*")


def group_seeds(keys: Sequence[str], rows: Sequence[RunRow]) -> tuple[list[str], list[Setting]]:
    """(the swept keys but the seed, one Setting per combination of their values), in row order."""
    setting_keys = [k for k in keys if k != SEED_KEY]
    settings: dict[tuple, Setting] = {}
    for r in rows:
        ident = tuple(json.dumps(r.values[k], sort_keys=True, default=str) for k in setting_keys)
        if ident not in settings:
            name = _SEED_PART.sub("", r.name).lstrip(",") or "default"
            settings[ident] = Setting(name, {k: r.values[k] for k in setting_keys}, [])
        settings[ident].runs.append(r)
    return setting_keys, list(settings.values())


def tied(a: Setting, b: Setting, metric: str = "AP") -> Optional[bool]:
    """|mean_a - mean_b| < 2 max(std_a, std_b), or equal means (e.g. every seed of both at 0 AP,
    std 0); None when either side has fewer than 2 seeds."""
    sa, sb = a.std(metric), b.std(metric)
    if sa is None or sb is None:
        return None
    diff = abs(a.mean(metric) - b.mean(metric))
    return diff == 0 or diff < TIE_STDS * max(sa, sb)
