"""The figures of ``retina analyze errors``: precision/recall curves, the confusion matrix, the
TIDE breakdown and AP by size / number of objects. Each function writes one PNG (matplotlib, Agg).

Shape legend: K classes, R recall points.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(path: Path, recall: np.ndarray, curves: dict[float, np.ndarray],
                   class_names: Sequence[str], f1_points: Sequence[Optional[dict]]) -> None:
    """One panel per class: precision (K, R) against recall (R,) for each IoU of ``curves``
    (solid .5, dashed .75), the class's AP in the legend and its F1-best operating point (exact
    precision and recall at that score, so on or below the interpolated curve)."""
    plt = _pyplot()
    k = len(class_names)
    cols = k if k <= 4 else math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.axis("off")
            continue
        for (iou, precision), style in zip(curves.items(), styles):
            p = precision[i]  # (R,)
            if (p < 0).all():
                continue
            ap = 100 * p[p > -1].mean()
            ax.plot(recall, p, style, color="C0", label=f"IoU {iou:.2f}: AP {ap:.1f}")
        best = f1_points[i]
        if best is not None:
            ax.plot(best["recall"], best["precision"], "o", color="C3",
                    label=f"F1 {best['f1']:.2f} @ score {best['score_thresh']:.2f}")
        if all((c[i] < 0).all() for c in curves.values()):
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(class_names[i], fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Precision/recall per class (COCOeval, area all, 100 dets/image)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100 if k <= 16 else 60)  # COCO's 80 panels: ~1.8k px wide
    plt.close(fig)


def plot_confusion(path: Path, matrix: np.ndarray, labels: Sequence[str], score_thresh: float,
                   iou_thresh: float) -> None:
    """Counts of a (K+1, K+1) matrix (rows GT, columns predicted, last = background), coloured by
    each row's share so that rare classes read as well as frequent ones."""
    plt = _pyplot()
    n = len(labels)
    side = max(4.5, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    row_sums = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, row_sums, out=np.zeros(matrix.shape, dtype=float), where=row_sums > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for r in range(n):
            for c in range(n):
                if matrix[r, c]:
                    ax.text(c, r, str(int(matrix[r, c])), ha="center", va="center", fontsize=8,
                            color="white" if share[r, c] > 0.6 else "black")
    ax.set_xticks(range(n), labels, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center",
                  fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted\n(background column: GT missed)")
    ax.set_ylabel("ground truth\n(background row: spurious detection)")
    ax.set_title(f"Confusion matrix: score >= {score_thresh:.2f}, IoU >= {iou_thresh:.2f}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tide(path: Path, tide: dict) -> None:
    """Horizontal bars: dAP of each main TIDE error type, then the two special ones."""
    plt = _pyplot()
    names = list(tide["dAP"]) + ["false positives", "false negatives"]
    values = list(tide["dAP"].values()) + list(tide["special"].values())
    counts = [f"{tide['counts'][n]} errors" for n in tide["dAP"]] + ["", ""]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    colors = ["C0"] * len(tide["dAP"]) + ["C7", "C7"]
    y = np.arange(len(names))[::-1]
    ax.barh(y, values, color=colors)
    for yi, v, c in zip(y, values, counts):
        ax.text(v, yi, f" {v:.2f}  {c}", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.set_xlabel("dAP50 (AP gained by fixing that error type alone)")
    ax.set_xlim(0, max(1.0, max(values) * 1.35))
    ax.set_title(f"TIDE error breakdown (AP50 {tide['ap50']:.1f})", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ap_breakdown(path: Path, by_size: dict[str, Optional[float]], by_count: dict[str, dict]) -> None:
    """Two bar panels: COCO AP by object size, AP by number of objects in the image."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    count_bins = {k: v for k, v in by_count.items() if k != "0"}
    panels = [(axes[0], list(by_size), [by_size[s] for s in by_size], None, "AP by object size"),
              (axes[1], list(count_bins), [v["AP"] for v in count_bins.values()],
               [v["images"] for v in count_bins.values()], "AP by objects per image")]
    for ax, labels, values, images, title in panels:
        heights = [v if v is not None else 0.0 for v in values]
        x = np.arange(len(labels))
        ax.bar(x, heights, color="C0")
        for i, v in enumerate(values):
            note = "-" if v is None else f"{v:.1f}"
            if images is not None:
                note += f"\n{images[i]} img"
            ax.text(i, heights[i], note, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, labels)
        ax.set_ylim(0, 112)  # AP in percent; room for the labels above a bar at 100
        ax.set_ylabel("AP (IoU .50:.95)")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
