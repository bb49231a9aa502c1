"""The focal loss's advantage against the imbalance: in a sweep over ``data.shapes.extra_classes``
(E classes the data never contains: K = 3 + E, the images, anchors and positives unchanged), at
each E, FL (gamma 2, alpha .25) minus the better alpha-balanced CE (gamma 0, the alpha of the
higher mean AP), against the negatives' share of the initial CE at that E.

The difference is paired by seed: the mean and sample std (n - 1) of FL_s - CE_s over the seeds s
both settings finished. The verdict is the report's 2-std rule (``runs.tied``) on the two settings.
The shares come from the caller (``Shares``; ``measured_shares`` measures them with
``retina analyze imbalance``'s code), so this module is arithmetic, a table and a plot.
``retina ablate --report`` writes them as a table.md section and ``advantage.png``: FL - CE against
the share (logit axis) with the shapes set's share (E = 0) and COCO's marked, and the raw APs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from retina.config import Config
from retina.studies.runs import Setting, tied

E_KEY = "data.shapes.extra_classes"
PRIOR = 0.01  # pi of every Table 1 run (Sec. 4.1); FL without the prior is not on this figure


@dataclass(frozen=True)
class Shares:
    """The negatives' share of the initial CE and the class count K at each E, and COCO's share
    (800 x 1333) at 100 and 1000 assumed positive anchors per image (``imbalance.coco_imbalance``)."""

    by_extra_classes: dict[int, float]
    classes: dict[int, int]
    coco: tuple[float, float]


@dataclass(frozen=True)
class Point:
    extra_classes: int
    share: float
    fl: Setting
    ce: Setting  # the better alpha-balanced CE at this E
    diff: float  # mean of FL - CE over the paired seeds
    diff_std: Optional[float]  # their sample std; None with fewer than 2 pairs
    pairs: int
    tie: Optional[bool]  # runs.tied(fl, ce)


def _is_fl(cfg: Config) -> bool:
    loss = cfg.loss
    return loss.type == "focal" and loss.gamma == 2 and loss.alpha == 0.25 and cfg.model.head.prior_prob == PRIOR


def _is_ce(cfg: Config) -> bool:
    loss = cfg.loss
    return (loss.type in ("focal", "ce") and loss.gamma == 0 and loss.alpha is not None
            and cfg.model.head.prior_prob == PRIOR)


def _paired(fl: Setting, ce: Setting) -> list[float]:
    """FL - CE per seed both finished, in seed order."""
    def by_seed(s: Setting) -> dict[int, float]:
        return {r.cfg.train.seed: r.ap for r in s.runs if r.ap is not None}

    a, b = by_seed(fl), by_seed(ce)
    return [a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())]


def advantage_points(settings: Sequence[Setting], shares: Shares) -> list[Point]:
    """One point per E that has a finished FL (gamma 2, alpha .25) and a finished alpha-balanced CE
    sharing a seed, in E order; the other settings (OHEM, other gammas, no prior) are left out."""
    points = []
    for e in sorted({s.cfg.data.shapes.extra_classes for s in settings}):
        here = [s for s in settings if s.cfg.data.shapes.extra_classes == e and s.n]
        fls = [s for s in here if _is_fl(s.cfg)]
        ces = sorted((s for s in here if _is_ce(s.cfg)), key=lambda s: -s.ap)
        if len(fls) != 1 or not ces or e not in shares.by_extra_classes:
            continue
        fl, ce = fls[0], ces[0]
        diffs = _paired(fl, ce)
        if not diffs:
            continue
        points.append(Point(e, shares.by_extra_classes[e], fl, ce, statistics.fmean(diffs),
                            statistics.stdev(diffs) if len(diffs) >= 2 else None, len(diffs), tied(fl, ce)))
    return points


def _stat(s: Setting) -> str:
    std = s.std()
    return f"{s.ap:.1f}" + ("" if std is None else f" ± {std:.1f}")


def _verdict(p: Point) -> str:
    if p.tie is None:
        return "no std: fewer than 2 seeds"
    if p.tie:
        return "tie"
    return "FL ahead, beyond 2 std" if p.diff > 0 else "CE ahead, beyond 2 std"


def advantage_markdown(points: Sequence[Point], shares: Shares) -> str:
    """The table.md section: per E, the share, both settings' AP, FL - CE and the verdict."""
    lo, hi = sorted(shares.coco)
    lines = ["", "## FL against CE as the negatives' share grows (advantage.png)", "",
             "At each number of absent classes E: FL (gamma 2, alpha .25) against the better "
             "alpha-balanced CE (gamma 0, the alpha of the higher mean AP); FL - CE paired by seed, "
             "mean ± std. The share is the negatives' share of the initial CE "
             f"(`retina analyze imbalance`); COCO's at 800 x 1333 is {100 * lo:.1f}-{100 * hi:.1f}%.", "",
             "| E | K | negatives' share | FL | CE | CE alpha | FL - CE | seeds | verdict |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in points:
        diff = f"{p.diff:+.1f}" + ("" if p.diff_std is None else f" ± {p.diff_std:.1f}")
        lines.append(f"| {p.extra_classes} | {shares.classes[p.extra_classes]} | "
                     f"{100 * p.share:.1f}% | {_stat(p.fl)} | {_stat(p.ce)} | {p.ce.cfg.loss.alpha:g} | "
                     f"{diff} | {p.pairs} | {_verdict(p)} |")
    return "\n".join(lines) + "\n"


def plot_advantage(path: Path, title: str, points: Sequence[Point], shares: Shares) -> None:
    """Two panels against the share (logit axis): FL - CE with a 1-std bar, and the raw APs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    x = [p.share for p in points]
    fig, (ax_d, ax_ap) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax_d.errorbar(x, [p.diff for p in points], yerr=[p.diff_std or 0.0 for p in points], marker="o", capsize=3,
                  label="FL - CE (mean ± std over seeds)")
    ax_d.axhline(0.0, color="grey", lw=0.8)
    ax_d.set_ylabel("FL - CE (AP)")
    for pick, name, marker in ((lambda p: p.fl, "FL (gamma 2, alpha .25)", "o"),
                               (lambda p: p.ce, "better CE (gamma 0)", "s")):
        ax_ap.errorbar(x, [pick(p).ap for p in points], yerr=[pick(p).std() or 0.0 for p in points],
                       marker=marker, capsize=3, label=name)
    ax_ap.set_ylabel("val AP")
    lo, hi = sorted(shares.coco)
    for ax in (ax_d, ax_ap):
        ax.set_xscale("logit")
        ax.axvspan(lo, hi, color="tab:red", alpha=0.12, label=f"COCO 800 x 1333 ({100 * lo:.1f}-{100 * hi:.1f}%)")
        if 0 in shares.by_extra_classes:
            ax.axvline(shares.by_extra_classes[0], color="tab:green", ls="--", lw=1,
                       label=f"shapes ({100 * shares.by_extra_classes[0]:.1f}%)")
        ax.set_xticks(x, [f"{100 * p.share:.1f}%\nE = {p.extra_classes}" for p in points], fontsize=7)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("negatives' share of the initial CE (logit axis)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_d.set_title(f"{title}: FL - CE against the imbalance")
    ax_ap.set_title("the APs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measured_shares(cfg: Config, extra_classes: Sequence[int], num_images: int = 200) -> Shares:
    """``Shares`` measured on ``cfg``'s val set with its untrained model at each E
    (``imbalance.extra_class_imbalance``) and COCO's from the bundled R-50 config."""
    from retina.config import find_config, load_config
    from retina.studies.imbalance import COCO_POSITIVES, coco_imbalance, extra_class_imbalance

    stats = extra_class_imbalance(cfg, extra_classes, num_images)
    coco_cfg = load_config(find_config("retinanet_r50_fpn_1x_coco"))
    lo, hi = (coco_imbalance(coco_cfg, p).initial_negative_share for p in (COCO_POSITIVES, 10 * COCO_POSITIVES))
    return Shares({e: s.initial_negative_share for e, s in stats.items()},
                  {e: s.num_classes for e, s in stats.items()}, (lo, hi))
