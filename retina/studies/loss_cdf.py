"""``retina analyze loss-cdf``: the paper's Figure 4 on a trained model.

Sec. 5.1 ("Analysis of the Focal Loss"): run a converged model over images, take the predicted
probability of every negative and positive example, compute FL for several gamma (whatever gamma
the model was trained with), normalise positives' and negatives' losses separately to sum to one,
sort them from lowest to highest and plot the cumulative sum against the fraction of examples.
With the sigmoid classifier an example is one (anchor, class) pair of a non-ignored anchor: the
positive pairs are (foreground anchor, its class), every other pair is a negative. alpha scales
all positives (or all negatives) alike, so it cancels in the normalisation and is left out.

Losses are computed from the margin x_t = +x (positive) or -x (negative) of the logit x:
CE = softplus(-x_t) and 1 - p_t = sigmoid(-x_t), so easy negatives with p ~ 1e-7 keep their
precision. Negatives are uniformly subsampled to ``MAX_NEG_PER_IMAGE`` per image (the paper
samples ~1e7 negatives and ~1e5 positives in all); uniform sampling keeps the distribution.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from retina.model.assigner import pad_targets
from retina.config import Config, load_config
from retina.io import weights_dir

MAX_NEG_PER_IMAGE = 50_000
CURVE_POINTS = 1001  # fractions 0, 0.001, ..., 1 in the CSV


def focal_loss_of_margin(x_t: Tensor, gamma: float) -> Tensor:
    """FL without alpha from margins x_t (S,): (1 - p_t)^gamma CE, gamma 0 being CE."""
    x_t = x_t.double()
    ce = F.softplus(-x_t)  # -log(sigmoid(x_t)) = -log(p_t)
    return ce if gamma == 0 else torch.sigmoid(-x_t).pow(gamma) * ce


def normalized_cdf(losses: Tensor) -> tuple[Tensor, Tensor]:
    """losses (S,) -> (fraction of examples (S,), cumulative normalised loss (S,)).

    Sorted from lowest to highest loss, so the curve ends at (1, 1); all-zero losses give 0s.
    """
    s = losses.double().sort().values
    total = s.sum()
    cum = s.cumsum(0) / total if total > 0 else torch.zeros_like(s)
    fraction = torch.arange(1, len(s) + 1, dtype=torch.float64) / max(len(s), 1)
    return fraction, cum


def sample_curve(fraction: Tensor, cum: Tensor, points: int = CURVE_POINTS) -> tuple[Tensor, Tensor]:
    """The CDF at ``points`` evenly spaced fractions 0..1: the value after the first
    ceil(f * S) examples (0 at f = 0)."""
    grid = torch.linspace(0, 1, points, dtype=torch.float64)
    if len(cum) == 0:
        return grid, torch.zeros_like(grid)
    count = torch.ceil(grid * len(cum) - 1e-9).long()  # examples included at each fraction
    padded = torch.cat([cum.new_zeros(1), cum])  # padded[c] = cumulative loss of c examples
    return grid, padded[count.clamp(0, len(cum))]


@torch.no_grad()
def example_margins(model: torch.nn.Module, dataset, num_images: int, device: torch.device,
                    batch_size: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Margins x_t of the positive (P,) and negative (Q,) examples of the first ``num_images``
    images of ``dataset``, from the model in eval mode (the eval input size)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    pos, neg = [], []
    k = torch.arange(model.num_classes, device=device)
    count = min(num_images, len(dataset))
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        images = [img.to(device) for img, _ in items]  # uint8: the model converts them
        batch, _, _, targets = model.preprocess(images, [t for _, t in items])
        features = model.features(batch)
        logits, _ = model.head(features)  # (N, R, K)
        anchors, per_level = model.anchors_of(features, batch)  # (R, 4), R split by level
        gt_classes = model.assigner(pad_targets(targets, batch.device), anchors, per_level).gt_classes  # (N, R)
        valid = (gt_classes >= 0)[..., None]  # (N, R, 1): -1 is an ignored anchor
        onehot = gt_classes[..., None] == k  # (N, R, K); background (class K) never hits
        x = logits.float()
        for i in range(x.shape[0]):  # per image: the negative subsample is per image
            pos.append(x[i][onehot[i]].cpu())
            neg_i = -x[i][valid[i] & ~onehot[i]].cpu()
            if len(neg_i) > MAX_NEG_PER_IMAGE:
                neg_i = neg_i[torch.randperm(len(neg_i), generator=gen)[:MAX_NEG_PER_IMAGE]]
            neg.append(neg_i)
    return torch.cat(pos) if pos else torch.zeros(0), torch.cat(neg) if neg else torch.zeros(0)


def loss_cdf(cfg: Optional[Config], weights: str | Path, gammas: Sequence[float], out_dir: str | Path,
             num_images: int = 100, device: str = "auto") -> dict:
    """Figure 4 of a trained model: ``loss_cdf.csv`` (gamma, fraction, cdf_pos, cdf_neg) and
    ``loss_cdf.png`` (positives left, negatives right, one line per gamma) in ``out_dir``.

    ``cfg`` None: the checkpoint's config. Returns the paths, the example counts and, per gamma,
    the share of the negatives' loss carried by their hardest 1% (``neg_top1pct``).
    """
    from retina.data import build_dataset
    from retina.engine.checkpoint import load_model
    from retina.engine.dist import resolve_device

    dev = resolve_device(device)
    model, cfg, _, _ = load_model(weights, dev, cfg=cfg)
    x_pos, x_neg = example_margins(model, build_dataset(cfg, "val"), num_images, dev, cfg.eval.batch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves, top1 = {}, {}
    for g in gammas:
        pos = sample_curve(*normalized_cdf(focal_loss_of_margin(x_pos, g)))
        neg = sample_curve(*normalized_cdf(focal_loss_of_margin(x_neg, g)))
        curves[g] = (pos, neg)
        top1[g] = float(1 - neg[1][int(0.99 * (CURVE_POINTS - 1))])  # loss above the 99th pct
    csv_path, png_path = out_dir / "loss_cdf.csv", out_dir / "loss_cdf.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["gamma", "fraction", "cdf_pos", "cdf_neg"])
        for g, ((fx, py), (_, ny)) in curves.items():
            w.writerows([f"{g:g}", f"{a:.3f}", f"{b:.6g}", f"{c:.6g}"]
                        for a, b, c in zip(fx.tolist(), py.tolist(), ny.tolist()))
    _plot(png_path, curves, len(x_pos), len(x_neg))
    return {"csv": csv_path, "png": png_path, "num_pos": len(x_pos), "num_neg": len(x_neg),
            "neg_top1pct": top1}


def _plot(path: Path, curves: dict, num_pos: int, num_neg: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, idx, title in ((axes[0], 0, f"positive examples ({num_pos})"),
                           (axes[1], 1, f"negative examples ({num_neg})")):
        for g, pair in curves.items():
            ax.plot(pair[idx][0].numpy(), pair[idx][1].numpy(), label=f"gamma={g:g}")
        ax.set_title(f"Cumulative normalized loss, {title}")
        ax.set_xlabel("fraction of examples (sorted by loss, lowest first)")
        ax.set_ylabel("cumulative normalized loss")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_gammas(gammas: str | Sequence[float]) -> list[float]:
    if isinstance(gammas, str):
        try:
            return [float(g) for g in gammas.split(",") if g.strip()]
        except ValueError:
            raise ValueError(f"--gammas {gammas}: expected numbers like 0,0.5,1,2") from None
    return [float(g) for g in gammas]


def analyze_cli(kind: str, config: Optional[str], weights: str, gammas: str | Sequence[float] = "0,0.5,1,2",
                out: Optional[str] = None, device: str = "auto", num_images: int = 100) -> int:
    """``retina analyze loss-cdf --weights W [--config C] [--gammas 0,0.5,1,2] [--out DIR]``;
    default out: <run dir>/analysis. Returns the exit status."""
    if kind != "loss-cdf":
        raise ValueError(f"unknown analysis {kind!r}; choose loss-cdf")
    cfg = None
    if config is not None:
        from retina.config import find_config

        cfg = load_config(find_config(config))
    out_dir = Path(out) if out else weights_dir(weights) / "analysis"
    res = loss_cdf(cfg, weights, _parse_gammas(gammas), out_dir, num_images, device)
    print(f"{res['num_pos']} positive and {res['num_neg']} negative examples")
    for g, share in res["neg_top1pct"].items():
        print(f"gamma {g:g}: the hardest 1% of negatives carry {100 * share:.1f}% of the negatives' loss")
    print(f"csv: {res['csv']}\nplot: {res['png']}")
    return 0
