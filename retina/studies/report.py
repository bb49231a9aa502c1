"""The tables and plot of a sweep, rebuilt from its run directories alone (``retina ablate
--report DIR``): ``table.csv`` and ``table.md`` (one row per run), the paper's views in
``table.md`` and ``ablation.png`` (AP against gamma, one line per alpha); with evaluations during
training (``train.eval_period``), the learning curves too (``curves.py``); over
``data.shapes.extra_classes``, FL against CE by the negatives' share (``advantage.py``).

The paper's views are computed over *settings* (``runs.py``: the runs of one combination of
swept values, over seeds): AP as mean +- std over the seeds when a sweep has several, ties marked
(|difference| < 2 x the larger std), and the paper's own numbers (``PAPER``) beside ours:

- AP over gamma x alpha and the best alpha for each gamma (Table 1a is the gamma 0 row, 1b the rest);
- the best setting of each loss (FL, alpha-balanced CE, OHEM, FL*, QFL) and the paper's questions: does
  FL (gamma 2, alpha .25) beat the best CE, does OHEM stay below it;
- the other losses (Table 1d: OHEM; appendix A: FL*; GFL's QFL, beyond the paper).

A key that a run's choices do not read (``loss.gamma`` of OHEM, ``loss.ohem.*`` of FL) shows as
"-": ``retina.config.key_applies`` decides, not this module.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from retina.config import Config, get_key, key_applies
from retina.errors import MissingFileError, RetinaError
from retina.studies.advantage import (E_KEY, Shares, advantage_markdown, advantage_points, measured_shares,
                                      plot_advantage)
from retina.studies.curves import curves_markdown, plot_curves, sweep_curves, write_curves_csv
from retina.studies.runs import (METRICS, SEED_KEY, RunRow, Setting, collect_runs, group_seeds, short_keys,
                                 sort_key, tied)

__all__ = ["PAPER", "build_report", "collect_runs", "fmt_value", "short_keys"]


@dataclass(frozen=True)
class PaperResult:
    """One number of the paper's Table 1 and the config values that reproduce its setting."""

    table: str  # "1a", "1b", "1d"
    ap: float
    when: tuple[tuple[str, tuple], ...]  # (key, accepted values)


_PRIOR = ("model.head.prior_prob", (0.01,))  # pi = 0.01 in every Table 1 run (Sec. 4.1)
# Only entries quoted with certainty: Table 1a's best CE and Table 1b's best FL (R-50, 600 px).
PAPER: tuple[PaperResult, ...] = (
    PaperResult("1a", 31.1, (("loss.type", ("focal", "ce")), ("loss.gamma", (0.0,)), ("loss.alpha", (0.75,)), _PRIOR)),
    PaperResult("1b", 34.0, (("loss.type", ("focal",)), ("loss.gamma", (2.0,)), ("loss.alpha", (0.25,)), _PRIOR)),
)
PAPER_OHEM = (32.8, 36.0)  # Table 1d: OHEM's best setting against FL


def paper_result(s: Setting) -> Optional[PaperResult]:
    """The paper's number for this setting's loss, if Table 1 has it (in ``PAPER``)."""
    for p in PAPER:
        if all(get_key(s.cfg, k) in v for k, v in p.when):
            return p
    return None


def family(s: Setting) -> str:
    """The paper's loss families: FL (gamma > 0), alpha-balanced CE (FL at gamma 0), OHEM, FL*;
    and QFL (quality_focal, GFL), beyond the paper."""
    t = s.cfg.loss.type
    if t in ("focal", "ce"):
        return "FL (gamma > 0)" if t == "focal" and s.cfg.loss.gamma > 0 else "alpha-balanced CE (gamma 0)"
    return {"ohem": "OHEM", "focal_star": "FL*", "quality_focal": "QFL"}[t]


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


def _fmt_stat(s: Setting, metric: str = "AP", seeds: bool = True) -> str:
    """``34.1 +- 0.8`` over seeds; a single run: its value."""
    mean, std = s.mean(metric), s.std(metric)
    if mean is None or not seeds:
        return _fmt_metric(mean)
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f} (n=1)"


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


def _shown(row: RunRow, key: str) -> str:
    """A swept value, or "-" where the run's choices do not read the key (``key_applies``)."""
    return fmt_value(row.values[key]) if key_applies(key, row.cfg) else "-"


def _verdict(a: Setting, b: Setting) -> str:
    """a against b: the AP difference and whether the seeds separate it (runs.tied)."""
    diff = a.ap - b.ap
    tie = tied(a, b)
    mark = {True: "tie", False: "beyond 2 std", None: "no std: fewer than 2 seeds"}[tie]
    return f"{diff:+.1f} AP ({mark})"


# ------------------------------------------------------------------------------- paper views
def _group_of(s: Setting, keys: Sequence[str]) -> tuple:
    """The values of swept keys outside the loss: one set of views per combination."""
    return tuple((k, fmt_value(s.values[k])) for k in keys if not k.startswith("loss."))


def _seed_table(settings: list[Setting]) -> list[str]:
    """Mean +- std over seeds per setting, the paper's AP beside it, each against the best."""
    done = [s for s in settings if s.ap is not None]
    if not done:
        return []
    best = max(done, key=lambda s: s.ap)
    body = []
    for s in sorted(done, key=lambda s: -s.ap):
        paper = paper_result(s)
        body.append([s.name, str(s.n), _fmt_stat(s), _fmt_stat(s, "AP50"), _fmt_stat(s, "AP75"),
                     f"{paper.ap:.1f} ({paper.table})" if paper else "",
                     "best" if s is best else _verdict(s, best)])
    return ["", "## Mean ± std over seeds", "",
            "Sample std over the finished seeds (n - 1). A difference is a tie when it is under "
            "2 x the larger of the two settings' std. Paper: Table 1 (R-50, 600 px, COCO minival).", "",
            *_md_table(["setting", "seeds", "AP", "AP50", "AP75", "paper AP", "vs best"], body, 1)]


def _grid_views(keys: Sequence[str], settings: list[Setting], seeds: bool) -> list[str]:
    """AP over gamma x alpha and the best alpha per gamma (Table 1a/1b), per group of two or
    more settings (one setting alone, e.g. FL without the prior, is no grid)."""
    fl = [s for s in settings if s.ap is not None and s.cfg.loss.type in ("focal", "ce")]
    if not fl or not {"loss.gamma", "loss.alpha"} & set(keys):
        return []
    lines: list[str] = []
    for group in sorted({_group_of(s, keys) for s in fl}):
        members = [s for s in fl if _group_of(s, keys) == group]
        if len(members) < 2:
            continue
        suffix = f" ({', '.join(f'{k}={v}' for k, v in group)})" if group else ""
        gammas = sorted({s.cfg.loss.gamma for s in members}, key=sort_key)
        alphas = sorted({s.cfg.loss.alpha for s in members}, key=sort_key)
        cell = {(s.cfg.loss.gamma, s.cfg.loss.alpha): s for s in members}
        lines += ["", f"## AP: gamma x alpha{suffix}", "",
                  "Focal loss, gamma 0 being alpha-balanced CE (Table 1a is its row; Table 1b the rest).", ""]
        body = [[fmt_value(g)] + [_fmt_stat(cell[(g, a)], seeds=seeds) if (g, a) in cell else "" for a in alphas]
                for g in gammas]
        lines += _md_table(["gamma \\ alpha"] + [fmt_value(a) for a in alphas], body, 1)
        lines += ["", f"## Best alpha for each gamma{suffix}", ""]
        best_rows = []
        for g in gammas:
            row = [s for s in members if s.cfg.loss.gamma == g]
            b = max(row, key=lambda s: s.ap)
            ties = [fmt_value(s.cfg.loss.alpha) for s in row if s is not b and tied(s, b)]
            best_rows.append([fmt_value(g), fmt_value(b.cfg.loss.alpha)]
                             + [_fmt_stat(b, m, seeds) for m in ("AP", "AP50", "AP75")]
                             + ([", ".join(ties) or "none"] if seeds else []))
        lines += _md_table(["gamma", "alpha", "AP", "AP50", "AP75"] + (["tied alphas"] if seeds else []),
                           best_rows, 2)
    return lines


def _summary(settings: list[Setting], seeds: bool) -> list[str]:
    """The best setting of each loss family, then the paper's questions with our answers."""
    families: dict[str, list[Setting]] = {}
    for s in settings:
        if s.ap is not None:
            families.setdefault(family(s), []).append(s)
    found = {k: max(v, key=lambda s: s.ap) for k, v in families.items()}
    if len(found) < 2:
        return []
    body = [[k, s.name] + [_fmt_stat(s, m, seeds) for m in ("AP", "AP50", "AP75")]
            for k, s in sorted(found.items(), key=lambda kv: -kv[1].ap)]
    lines = ["", "## Best of each loss", "", *_md_table(["loss", "setting", "AP", "AP50", "AP75"], body, 2)]
    fl = next((s for s in families.get("FL (gamma > 0)", []) if paper_result(s) is PAPER[1]), None)
    questions = []
    if fl is not None and "alpha-balanced CE (gamma 0)" in found:
        ce = found["alpha-balanced CE (gamma 0)"]
        questions.append(f"- FL (gamma 2, alpha .25) against the best alpha-balanced CE ({ce.name}): "
                         f"{_verdict(fl, ce)}. Paper (Table 1a/1b): 34.0 against 31.1, +2.9 AP.")
    if fl is not None and "OHEM" in found:
        ohem = found["OHEM"]
        questions.append(f"- The best OHEM ({ohem.name}) against FL (gamma 2, alpha .25): "
                         f"{_verdict(ohem, fl)}. Paper (Table 1d, R-101): {PAPER_OHEM[0]} against "
                         f"{PAPER_OHEM[1]}, {PAPER_OHEM[0] - PAPER_OHEM[1]:+.1f} AP.")
    return lines + (["", "## The paper's questions", "", *questions] if questions else [])


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
    seeds = SEED_KEY in keys
    setting_keys, settings = group_seeds(keys, rows)
    if seeds:
        lines += _seed_table(settings)
    lines += _grid_views(setting_keys, settings, seeds) + _summary(settings, seeds)
    others = [s for s in settings if s.ap is not None and s.cfg.loss.type in ("ohem", "focal_star", "quality_focal")]
    if others:
        lines += ["", "## Other losses (Table 1d: OHEM; appendix A: FL*; QFL)", ""]
        lines += _md_table(["setting", "AP", "AP50", "AP75"],
                           [[s.name] + [_fmt_stat(s, m, seeds) for m in ("AP", "AP50", "AP75")]
                            for s in others], 1)
    return "\n".join(lines) + "\n"


def _plot(path: Path, title: str, keys: Sequence[str], rows: list[RunRow]) -> None:
    """AP vs gamma, one line per alpha (and group), error bars of 1 std over seeds; other losses
    as dashed levels. Without a gamma sweep: a bar of AP per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setting_keys, settings = group_seeds(keys, rows)
    finished = [s for s in settings if s.ap is not None]
    fl = [s for s in finished if s.cfg.loss.type in ("focal", "ce")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_gamma = len({s.cfg.loss.gamma for s in fl}) >= 2
    if by_gamma:
        lines: dict[tuple, list[tuple[float, float, float]]] = {}
        for s in fl:
            lines.setdefault((_group_of(s, setting_keys), s.cfg.loss.alpha), []).append(
                (s.cfg.loss.gamma, s.ap, s.std() or 0.0))
        for (group, alpha), pts in sorted(lines.items(), key=lambda kv: (kv[0][0], sort_key(kv[0][1]))):
            pts.sort()
            label = f"alpha={fmt_value(alpha)}" + "".join(f", {k.split('.')[-1]}={v}" for k, v in group)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=label)
        for i, s in enumerate(s for s in finished if s not in fl):
            ax.axhline(s.ap, linestyle="--", color=f"C{(i + len(lines)) % 10}", label=f"{s.name} ({s.ap:.1f})")
        ax.set_xlabel("gamma")
        ax.set_ylabel("AP" + (" (mean ± std over seeds)" if SEED_KEY in keys else ""))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.barh([s.name for s in finished], [s.ap for s in finished], xerr=[s.std() or 0.0 for s in finished])
        ax.set_xlabel("AP")
        ax.invert_yaxis()
    ax.set_title(f"{title}: AP vs gamma" if by_gamma else f"{title}: AP by setting")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(out_dir: str | Path, metrics_file: str = "metrics.json",
                 shares: Callable[[Config, list[int]], Shares] = measured_shares) -> dict[str, Path]:
    """Write table.md, table.csv and ablation.png into ``out_dir``; returns their paths.

    A sweep over ``data.shapes.extra_classes`` also gets FL against CE by the negatives' share
    (``advantage.py``: a table.md section and advantage.png), the shares from ``shares(config of
    a run, the swept values of E)``.

    ``metrics_file`` other than the training's ``metrics.json`` (a re-evaluation of every run, e.g.
    ``eval_thr0/metrics.json``): the same report from those metrics, as table.eval_thr0.md,
    table.eval_thr0.csv and ablation.eval_thr0.png (the name of the file's folder)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise MissingFileError(f"{out_dir}: no such sweep directory")
    keys, rows = collect_runs(out_dir, metrics_file)
    if not rows:
        raise MissingFileError(f"{out_dir}: no run directories (with ablate_run.json or config.yaml)")
    source = Path(metrics_file)
    tag = "" if metrics_file == "metrics.json" else "." + (source.parent.name or source.stem)
    paths = {"table.md": out_dir / f"table{tag}.md", "table.csv": out_dir / f"table{tag}.csv",
             "ablation.png": out_dir / f"ablation{tag}.png"}
    _write_csv(paths["table.csv"], keys, rows)
    title = out_dir.name if not tag else f"{out_dir.name}, metrics from each run's {metrics_file}"
    settings = group_seeds(keys, rows)[1]
    curves = sweep_curves(settings)
    points, extra = [], ""
    if E_KEY in keys:
        try:
            measured = shares(settings[0].cfg, sorted({s.cfg.data.shapes.extra_classes for s in settings}))
        except RetinaError as e:  # no val set here: the tables still come out, without this section
            print(f"warning: no FL against CE by share: {e}", file=sys.stderr)
        else:
            points = advantage_points(settings, measured)
            extra = advantage_markdown(points, measured) if points else ""
    paths["table.md"].write_text(_markdown(title, keys, rows) + extra + (curves_markdown(curves) if curves else ""))
    if points:
        paths["advantage.png"] = out_dir / f"advantage{tag}.png"
        plot_advantage(paths["advantage.png"], title, points, measured)
    _plot(paths["ablation.png"], title, keys, rows)
    if curves:
        paths["curves.csv"], paths["curves.png"] = out_dir / "curves.csv", out_dir / "curves.png"
        write_curves_csv(paths["curves.csv"], curves)
        plot_curves(paths["curves.png"], out_dir.name, curves)
    return paths
