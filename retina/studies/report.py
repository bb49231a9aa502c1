"""The tables and plot of a sweep, rebuilt from its run directories alone (``retina ablate
--report DIR``): ``table.csv`` and ``table.md`` (one row per run), the paper's views in
``table.md`` (AP over gamma x alpha, the best alpha for each gamma as in Table 1a/1b, the other
loss types as in Table 1d / appendix A) and ``ablation.png`` (AP against gamma, one line per alpha).

A run directory is a direct subdirectory holding ``ablate_run.json`` or ``config.yaml``. The swept
keys are the keys of its grid overrides plus any config key whose resolved value differs between
runs; values come from the run's resolved ``config.yaml`` (else its overrides, else the defaults).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from retina.config import Config, config_to_dict, yaml_load

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_losses(path: Path) -> tuple[Optional[float], Optional[float]]:
    """(loss_cls, loss_box) of the last logged training record in metrics.jsonl."""
    last: dict = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if isinstance(rec, dict) and "loss_cls" in rec:
            last = rec
    return last.get("loss_cls"), last.get("loss_box")


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def collect_runs(out_dir: str | Path) -> tuple[list[str], list[RunRow]]:
    """(swept keys, one row per run directory of ``out_dir``, sorted by the swept values)."""
    dirs = sorted(d for d in Path(out_dir).iterdir()
                  if d.is_dir() and ((d / "ablate_run.json").is_file() or (d / "config.yaml").is_file()))
    infos = []
    for d in dirs:
        run_file = _read_json(d / "ablate_run.json") or {}
        overrides = {k.strip(): yaml_load(v) for k, _, v in
                     (o.partition("=") for o in run_file.get("overrides", []))}
        try:
            config = _flatten(yaml.safe_load((d / "config.yaml").read_text()) or {})
        except (OSError, yaml.YAMLError):
            config = None
        infos.append((d, run_file, overrides, config))
    keys: list[str] = []
    for _, _, overrides, _ in infos:
        keys += [k for k in overrides if k not in keys]
    configs = [c for *_, c in infos if c is not None]
    if len(configs) > 1:
        keys += [k for k in configs[0] if k not in keys and any(c.get(k) != configs[0][k] for c in configs)]
    defaults = _flatten(config_to_dict(Config()))

    rows = []
    for d, run_file, overrides, config in infos:
        values = {}
        for k in keys:
            if config is not None and k in config:
                values[k] = config[k]
            else:
                values[k] = overrides.get(k, defaults.get(k))
        metrics = _read_json(d / "metrics.json")
        status = "done" if metrics is not None else run_file.get("status", "unfinished")
        status = "unfinished" if status == "done" and metrics is None else status
        loss_cls, loss_box = _last_losses(d / "metrics.jsonl")
        rows.append(RunRow(d.name, status, values, {m: _number((metrics or {}).get(m)) for m in METRICS},
                           _number(loss_cls), _number(loss_box), _number(run_file.get("wall_s")),
                           run_file.get("error") if metrics is None else None))
    rows.sort(key=lambda r: tuple(_sort_key(r.values[k]) for k in keys) + (r.name,))
    return keys, rows


def _sort_key(v: Any) -> tuple:
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, float(v), "")
    return (2, 0.0, str(v))


# --------------------------------------------------------------------------------- formatting
def fmt_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ",".join(fmt_value(x) for x in v) + "]"
    return str(v)


def _fmt_metric(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.1f}"


def _fmt_loss(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.4f}"


def _fmt_wall(v: Optional[float]) -> str:
    if v is None:
        return ""
    s = int(round(v))
    return f"{s // 60}:{s % 60:02d}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


# ------------------------------------------------------------------------------- paper views
def _loss_family(row: RunRow) -> tuple[str, Optional[float], Optional[float]]:
    """(type, effective gamma, alpha); ce is FL with gamma 0 (losses.py)."""
    t = row.values.get("loss.type", "focal")
    gamma = row.values.get("loss.gamma", 2.0)
    return t, (0.0 if t == "ce" else gamma), row.values.get("loss.alpha", 0.25)


def _group_of(row: RunRow, keys: Sequence[str]) -> tuple:
    """The values of swept keys outside the loss: one set of views per combination."""
    return tuple((k, fmt_value(row.values[k])) for k in keys if not k.startswith("loss."))


def _grid_views(rows: list[RunRow], keys: Sequence[str]) -> list[str]:
    """AP over gamma x alpha and the best alpha per gamma (Table 1a/1b), per group."""
    fl_rows = [r for r in rows if r.ap is not None and _loss_family(r)[0] in ("focal", "ce")]
    if not fl_rows or not {"loss.gamma", "loss.alpha"} & set(keys):
        return []
    lines: list[str] = []
    groups = sorted({_group_of(r, keys) for r in fl_rows})
    for group in groups:
        members = [r for r in fl_rows if _group_of(r, keys) == group]
        suffix = f" ({', '.join(f'{k}={v}' for k, v in group)})" if group else ""
        gammas = sorted({_loss_family(r)[1] for r in members}, key=_sort_key)
        alphas = sorted({_loss_family(r)[2] for r in members}, key=_sort_key)
        cell = {(_loss_family(r)[1], _loss_family(r)[2]): r for r in members}
        lines += ["", f"## AP: gamma x alpha{suffix}", "",
                  "Focal loss, gamma 0 being alpha-balanced CE (Table 1a is its row; Table 1b the rest).", ""]
        body = [[fmt_value(g)] + [_fmt_metric(cell[(g, a)].ap) if (g, a) in cell else "" for a in alphas]
                for g in gammas]
        lines += _md_table(["gamma \\ alpha"] + [fmt_value(a) for a in alphas], body, 1)
        lines += ["", f"## Best alpha for each gamma{suffix}", ""]
        best = []
        for g in gammas:
            r = max((r for r in members if _loss_family(r)[1] == g), key=lambda r: r.ap)
            best.append([fmt_value(g), fmt_value(_loss_family(r)[2])]
                        + [_fmt_metric(r.metrics[m]) for m in ("AP", "AP50", "AP75")])
        lines += _md_table(["gamma", "alpha", "AP", "AP50", "AP75"], best, 2)
    return lines


def _summary(rows: list[RunRow]) -> list[str]:
    """The best run of each loss family, for the paper's ordering (FL > CE, FL > OHEM)."""
    families = {"FL (gamma > 0)": [], "alpha-balanced CE (gamma 0)": [], "OHEM": [], "FL*": []}
    for r in rows:
        if r.ap is None:
            continue
        t, gamma, _ = _loss_family(r)
        if t in ("focal", "ce"):
            families["FL (gamma > 0)" if gamma else "alpha-balanced CE (gamma 0)"].append(r)
        else:
            families["OHEM" if t == "ohem" else "FL*"].append(r)
    found = {k: max(v, key=lambda r: r.ap) for k, v in families.items() if v}
    if len(found) < 2:
        return []
    lines = ["", "## Best of each loss", ""]
    body = [[k, r.name] + [_fmt_metric(r.metrics[m]) for m in ("AP", "AP50", "AP75")]
            for k, r in sorted(found.items(), key=lambda kv: -kv[1].ap)]
    return lines + _md_table(["loss", "run", "AP", "AP50", "AP75"], body, 2)


# ------------------------------------------------------------------------------------ outputs
def _write_csv(path: Path, keys: Sequence[str], rows: list[RunRow]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "status", *keys, *METRICS, "loss_cls", "loss_box", "wall_s", "error"])
        for r in rows:
            w.writerow([r.name, r.status, *(fmt_value(r.values[k]) for k in keys),
                        *("" if r.metrics[m] is None else f"{r.metrics[m]:.3f}" for m in METRICS),
                        "" if r.loss_cls is None else f"{r.loss_cls:.6g}",
                        "" if r.loss_box is None else f"{r.loss_box:.6g}",
                        "" if r.wall_s is None else f"{r.wall_s:.1f}", r.error or ""])


def _shown(row: RunRow, key: str) -> str:
    """A swept value, or "-" where the run's loss type does not read the key (e.g. loss.gamma
    of an OHEM run, whose CE has gamma 0; see losses.py)."""
    t = row.values.get("loss.type", "focal")
    unused = ((key == "loss.gamma" and t != "focal") or (key.startswith("loss.ohem.") and t != "ohem")
              or (key.startswith("loss.focal_star.") and t != "focal_star"))
    return "-" if unused else fmt_value(row.values[key])


def _markdown(title: str, keys: Sequence[str], rows: list[RunRow]) -> str:
    with_status = any(r.status != "done" for r in rows)
    header = ["run", *(["status"] if with_status else []), *short_keys(keys), *METRICS,
              "loss_cls", "loss_box", "wall"]
    body = [[r.name, *([r.status] if with_status else []), *(_shown(r, k) for k in keys),
             *(_fmt_metric(r.metrics[m]) for m in METRICS), _fmt_loss(r.loss_cls),
             _fmt_loss(r.loss_box), _fmt_wall(r.wall_s)] for r in rows]
    done = sum(r.status == "done" for r in rows)
    lines = [f"# Ablation: {title}", "",
             f"{len(rows)} runs, {done} finished. COCO box AP (%) on the val split; loss_cls and "
             f"loss_box are the last logged training means; wall is each run's time (m:ss).", ""]
    lines += _md_table(header, body, 1 + with_status + len(keys))
    failed = [r for r in rows if r.error]
    if failed:
        lines += ["", *(f"- {r.name}: {r.error}" for r in failed)]
    lines += _grid_views(rows, keys) + _summary(rows)
    others = [r for r in rows if r.ap is not None and _loss_family(r)[0] in ("ohem", "focal_star")]
    if others:
        lines += ["", "## Other losses (Table 1d: OHEM; appendix A: FL*)", ""]
        lines += _md_table(["run", "AP", "AP50", "AP75"],
                           [[r.name] + [_fmt_metric(r.metrics[m]) for m in ("AP", "AP50", "AP75")]
                            for r in others], 1)
    return "\n".join(lines) + "\n"


def _plot(path: Path, title: str, keys: Sequence[str], rows: list[RunRow]) -> None:
    """AP vs gamma, one line per alpha (and group); other losses as dashed levels. Without a
    gamma sweep: a bar of AP per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in rows if r.ap is not None]
    fl_rows = [r for r in finished if _loss_family(r)[0] in ("focal", "ce")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_gamma = len({_loss_family(r)[1] for r in fl_rows}) >= 2
    if by_gamma:
        lines: dict[tuple, list[tuple[float, float]]] = {}
        for r in fl_rows:
            _, gamma, alpha = _loss_family(r)
            lines.setdefault((_group_of(r, keys), alpha), []).append((gamma, r.ap))
        for (group, alpha), pts in sorted(lines.items(), key=lambda kv: (kv[0][0], _sort_key(kv[0][1]))):
            pts.sort()
            label = f"alpha={fmt_value(alpha)}" + "".join(f", {k.split('.')[-1]}={v}" for k, v in group)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for i, r in enumerate(r for r in finished if r not in fl_rows):
            ax.axhline(r.ap, linestyle="--", color=f"C{(i + len(lines)) % 10}", label=f"{r.name} ({r.ap:.1f})")
        ax.set_xlabel("gamma")
        ax.set_ylabel("AP")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.barh([r.name for r in finished], [r.ap for r in finished])
        ax.set_xlabel("AP")
        ax.invert_yaxis()
    ax.set_title(f"{title}: AP vs gamma" if by_gamma else f"{title}: AP by run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(out_dir: str | Path) -> dict[str, Path]:
    """Write table.md, table.csv and ablation.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: no such sweep directory")
    keys, rows = collect_runs(out_dir)
    if not rows:
        raise FileNotFoundError(f"{out_dir}: no run directories (with ablate_run.json or config.yaml)")
    paths = {name: out_dir / name for name in ("table.md", "table.csv", "ablation.png")}
    _write_csv(paths["table.csv"], keys, rows)
    paths["table.md"].write_text(_markdown(out_dir.name, keys, rows))
    _plot(paths["ablation.png"], out_dir.name, keys, rows)
    return paths
