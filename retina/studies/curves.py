"""Learning curves of a sweep: each run's validation AP against the iteration (``RunRow.curve``,
the ``val/AP`` records its training wrote to ``metrics.jsonl``: every ``train.eval_period`` steps
and at the end), averaged per setting over its seeds, and how much each setting still moved over
the last quarter of its run. ``retina ablate --report`` writes them as ``curves.csv`` and ``curves.png``.

The last-quarter change is the run-length check of a pilot: a run is long enough when the AP of
its better setting changes by less than 1 AP between the last evaluation at or before 3/4 of the
run and the end.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from retina.studies.runs import Setting


@dataclass(frozen=True)
class CurvePoint:
    iteration: int
    ap: float  # mean over the seeds evaluated at this iteration
    std: Optional[float]  # sample std over those seeds; None with fewer than 2
    n: int  # seeds evaluated at this iteration


def setting_curve(curves: Sequence[dict[int, float]]) -> list[CurvePoint]:
    """One setting's curve: at each iteration any of its seeds evaluated, the mean over those seeds."""
    iterations = sorted({i for c in curves for i in c})
    points = []
    for i in iterations:
        aps = [c[i] for c in curves if i in c]
        points.append(CurvePoint(i, statistics.fmean(aps), statistics.stdev(aps) if len(aps) >= 2 else None,
                                 len(aps)))
    return points


def quarter_point(points: Sequence[CurvePoint]) -> Optional[CurvePoint]:
    """The last point at or before 3/4 of the last one's iteration; None when there is none (a run
    evaluated only at the end)."""
    earlier = [p for p in points[:-1] if p.iteration <= 0.75 * points[-1].iteration] if points else []
    return earlier[-1] if earlier else None


def last_quarter_change(points: Sequence[CurvePoint]) -> Optional[float]:
    """AP at the last point minus AP at ``quarter_point``; None without one."""
    at = quarter_point(points)
    return None if at is None else points[-1].ap - at.ap


def sweep_curves(settings: Sequence[Setting]) -> dict[str, list[CurvePoint]]:
    """{setting name: its curve} for the settings whose runs logged a validation AP."""
    curves = {}
    for s in settings:
        runs = [r.curve for r in s.runs if r.curve]
        if runs:
            curves[s.name] = setting_curve(runs)
    return curves


def write_curves_csv(path: Path, curves: dict[str, list[CurvePoint]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "iter", "AP", "AP_std", "seeds"])
        for name, points in curves.items():
            for p in points:
                w.writerow([name, p.iteration, f"{p.ap:.3f}", "" if p.std is None else f"{p.std:.3f}", p.n])


def curves_markdown(curves: dict[str, list[CurvePoint]]) -> str:
    """The table.md section: per setting, its evaluations, the AP at 3/4 and at the end, and the change."""
    lines = ["", "## Learning curves (curves.png, curves.csv)", "",
             "Val AP during training, mean over seeds; the change over the last quarter of the run "
             "(under 1 AP for the better setting: long enough).", "",
             "| setting | evaluations | AP at 3/4 | AP at the end | last-quarter change |", "|---|---:|---:|---:|---:|"]
    for name, points in curves.items():
        change, q = last_quarter_change(points), quarter_point(points)
        at = "-" if q is None else f"{q.ap:.1f} (iter {q.iteration})"
        lines.append(f"| {name} | {len(points)} | {at} | {points[-1].ap:.1f} (iter {points[-1].iteration}) | "
                     f"{'-' if change is None else f'{change:+.1f}'} |")
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, title: str, curves: dict[str, list[CurvePoint]]) -> None:
    """Val AP against the iteration, one line per setting, a band of 1 std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        x = [p.iteration for p in points]
        y = [p.ap for p in points]
        ax.plot(x, y, marker="o", markersize=3, label=name)
        if any(p.std is not None for p in points):
            lo = [p.ap - (p.std or 0.0) for p in points]
            hi = [p.ap + (p.std or 0.0) for p in points]
            ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("val AP")
    ax.set_title(f"{title}: learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
