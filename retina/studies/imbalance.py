"""``retina analyze imbalance``: how lopsided the classification problem is (Sec. 3, 4.1).

With the sigmoid classifier every (anchor, class) pair of a non-ignored anchor is one binary
example: the positive pairs are (foreground anchor, its class), every other pair is a negative,
the K - 1 other classes of a foreground anchor included (as in the loss). Per image, averaged
over N validation images at the test size, this counts:

- anchors R, ignored anchors, positive anchors P (= positive pairs), negative pairs
  Q = (R - ignored) K - P, and the ratio Q / P (of the means, i.e. of the totals);
- the share of the initial CE carried by the negatives: at the start every logit sits at the
  prior p = pi (Sec. 4.1), so each negative pair costs -log(1 - pi) and each positive pair
  -log(pi), and the share is Q (-log(1 - pi)) / (Q (-log(1 - pi)) + P (-log(pi))); with no prior
  (``model.head.prior_prob: 0``, bias 0) p = 0.5 and both cost log 2;
- with trained weights: the share of the (unweighted) CE of all pairs carried by the easy
  negatives, those the model gives p < ``EASY_P`` (0.1), and the share of negative pairs that
  are easy.

The counts come from the model itself: its resize and padding (``preprocess``), its backbone's
feature sizes, its anchor generator and its assigner; nothing here re-implements matching.
K is the val set's class count, absent classes included: the shapes set's
``data.shapes.extra_classes`` raise K, hence Q by (R - ignored) per absent class, and leave R,
the ignored anchors and P as they are (``--grid data.shapes.extra_classes=0,77``: one row each).

COCO's initial figures need only R, K and P (``coco_imbalance``): R is counted the same way for
an 800 x 1333 image under a COCO config; P is an assumption, since it needs COCO's boxes: by
default 100 positive anchors per image (COCO train2017 has 7.3 boxes per image, 860,001 /
117,266; a box the anchors fit gets ~10-20 anchors at IoU >= 0.5: 9 anchors per cell, stride
1/4 of the anchor side), and the share is given for 10x more positives as a bound.

Shape legend: N images, R anchors per image, K classes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from retina.config import Config, load_config, replace
from retina.model.assigner import pad_targets
from retina.studies.grid import expand_grid, run_name

EASY_P = 0.1  # a negative the model gives p < 0.1 is "easy" (Sec. 3.2's well-classified examples)
COCO_SIZE = (800, 1333)  # (H, W): shorter side 800, longer 1333 (Sec. 4.1)
COCO_CLASSES = 80
COCO_POSITIVES = 100.0  # assumed positive anchors per COCO image (module docstring)


@dataclass(frozen=True)
class Imbalance:
    """Per-image means over ``images`` images (counts are floats: means)."""

    images: int
    num_classes: int  # K
    prior: float  # pi of the initial logits (0.5 when the config has no prior)
    anchors: float  # R
    ignored: float  # anchors between the IoU thresholds
    positives: float  # P: foreground anchors = positive (anchor, class) pairs
    negative_pairs: float  # Q = (R - ignored) K - P

    @property
    def ratio(self) -> float:
        """Negative pairs per positive (inf when there is no positive)."""
        return self.negative_pairs / self.positives if self.positives else math.inf

    @property
    def initial_negative_share(self) -> float:
        return initial_negative_share(self.negative_pairs, self.positives, self.prior)


@dataclass(frozen=True)
class TrainedShares:
    """How the trained model's CE splits (totals over the images, so shares of sums)."""

    easy_negative_share: float  # CE of negatives with p < EASY_P / CE of all pairs
    negative_share: float  # CE of all negatives / CE of all pairs
    easy_fraction: float  # negatives with p < EASY_P / all negatives


def initial_negative_share(negative_pairs: float, positives: float, prior: float) -> float:
    """Share of the CE at p = ``prior`` for every logit carried by the negative pairs:
    Q (-log(1 - pi)) / (Q (-log(1 - pi)) + P (-log(pi)))."""
    neg = negative_pairs * -math.log1p(-prior)
    pos = positives * -math.log(prior)
    return neg / (neg + pos) if neg + pos > 0 else 0.0


def _start_prior(cfg: Config) -> float:
    """p of every logit at initialisation: pi, or 0.5 with no prior (bias 0)."""
    return cfg.model.head.prior_prob or 0.5


def _untrained(cfg: Config):
    """The config's model with random weights: no pretrained trunk is fetched (its weights do not
    change a count)."""
    from retina.model import build_model

    m = cfg.model
    return build_model(replace(cfg, model=dataclasses.replace(
        m, backbone=dataclasses.replace(m.backbone, weights=None)))).eval()


@torch.no_grad()
def _anchors(model, batch: Tensor) -> tuple[list[Tensor], Tensor, list[int]]:
    """(FPN features, (R, 4) anchors, anchors per level) of a padded batch (N, 3, H, W), from
    the model's own backbone and anchor generator."""
    features = model.features(batch)
    return (features, *model.anchors_of(features, batch))


@torch.no_grad()
def measure(model, dataset, num_images: int, prior: float, device: torch.device, batch_size: int = 8,
            trained: bool = False) -> tuple[Imbalance, Optional[TrainedShares]]:
    """The imbalance of the first ``num_images`` images of ``dataset`` under ``model`` (eval
    mode, test size); with ``trained``, also how the model's CE splits (``TrainedShares``)."""
    model.eval()
    count = min(num_images, len(dataset))
    k = model.num_classes
    totals = dict(anchors=0.0, ignored=0.0, positives=0.0, negative_pairs=0.0)
    ce = dict(all=0.0, neg=0.0, easy=0.0, easy_count=0.0)
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        images = [img.to(device).float().div(255) for img, _ in items]
        batch, _, _, targets = model.preprocess(images, [t for _, t in items])
        features, anchors, per_level = _anchors(model, batch)  # (R, 4)
        gt_classes = model.assigner(pad_targets(targets, batch.device), anchors, per_level).gt_classes  # (N, R)
        n, r = gt_classes.shape
        valid = gt_classes >= 0  # (N, R): -1 is an ignored anchor
        num_pos = (valid & (gt_classes < k)).sum().item()  # K is background
        totals["anchors"] += n * r
        totals["ignored"] += n * r - valid.sum().item()
        totals["positives"] += num_pos
        totals["negative_pairs"] += valid.sum().item() * k - num_pos
        if trained:
            _add_trained_ce(ce, model, features, gt_classes)
    stats = Imbalance(count, k, prior, **{key: v / max(count, 1) for key, v in totals.items()})
    if not trained:
        return stats, None
    shares = TrainedShares(ce["easy"] / ce["all"] if ce["all"] else 0.0,
                           ce["neg"] / ce["all"] if ce["all"] else 0.0,
                           ce["easy_count"] / totals["negative_pairs"] if totals["negative_pairs"] else 0.0)
    return stats, shares


def _add_trained_ce(ce: dict, model, features: list[Tensor], gt_classes: Tensor) -> None:
    """Add one batch's CE sums: all pairs, negatives, easy negatives (p < EASY_P), and the count
    of easy negatives, for ``gt_classes`` (N, R) in the assigner's encoding (-1 ignored, 0..K-1
    foreground, K background). CE from the logit x: -log(p) = softplus(-x), -log(1 - p) =
    softplus(x)."""
    logits, _ = model.head(features)  # (N, R, K)
    x = logits.float()
    k = torch.arange(x.shape[-1], device=x.device)
    valid = (gt_classes >= 0)[..., None]  # (N, R, 1)
    positive = gt_classes[..., None] == k  # (N, R, K); background (K) and ignored (-1) never hit
    negative = valid & ~positive  # (N, R, K)
    easy = negative & (torch.sigmoid(x) < EASY_P)  # (N, R, K)
    neg_ce = F.softplus(x)  # (N, R, K): -log(1 - p)
    ce["neg"] += neg_ce[negative].double().sum().item()
    ce["easy"] += neg_ce[easy].double().sum().item()
    ce["all"] += neg_ce[negative].double().sum().item() + F.softplus(-x[positive]).double().sum().item()
    ce["easy_count"] += easy.sum().item()


def anchors_per_image(cfg: Config, height: int, width: int) -> int:
    """R for one ``height`` x ``width`` image under ``cfg``'s model: its resize, padding, feature
    sizes and anchor generator (the trunk is built with random weights at depth 18: every ResNet
    has the same strides, so R does not depend on the depth)."""
    m = cfg.model
    model = _untrained(replace(cfg, model=dataclasses.replace(
        m, backbone=dataclasses.replace(m.backbone, depth=18))))
    batch, _, _, _ = model.preprocess([torch.zeros(3, height, width)])
    return int(_anchors(model, batch)[1].shape[0])


def coco_imbalance(cfg: Config, positives: float = COCO_POSITIVES, size: tuple[int, int] = COCO_SIZE,
                   num_classes: int = COCO_CLASSES) -> Imbalance:
    """COCO's initial figures from R (``anchors_per_image`` at ``size``), K and an assumed P
    (see the module docstring); the ignored anchors are left out (not countable without boxes:
    they would lower Q by a few percent at most)."""
    r = anchors_per_image(cfg, *size)
    return Imbalance(0, num_classes, _start_prior(cfg), float(r), 0.0, positives, r * num_classes - positives)


def with_extra_classes(stats: Imbalance, extra: int) -> Imbalance:
    """``stats`` with ``extra`` more absent classes: K + extra, and (R - ignored) more negative
    pairs per image for each (R, the ignored anchors and P do not change: the module docstring)."""
    return dataclasses.replace(stats, num_classes=stats.num_classes + extra,
                               negative_pairs=stats.negative_pairs + extra * (stats.anchors - stats.ignored))


def extra_class_imbalance(cfg: Config, extra_classes: Sequence[int], num_images: int,
                          dev: torch.device = torch.device("cpu")) -> dict[int, Imbalance]:
    """{E: the imbalance of ``cfg``'s shapes val set read with E absent classes}: measured once,
    at the smallest E, with ``cfg``'s untrained model; the others by ``with_extra_classes``."""
    from retina.data import build_dataset

    base = min(extra_classes)
    cfg = replace(cfg, data=dataclasses.replace(cfg.data, shapes=dataclasses.replace(cfg.data.shapes, extra_classes=base)))
    dataset = build_dataset(cfg, "val")
    cfg = replace(cfg, model=dataclasses.replace(cfg.model, num_classes=dataset.num_classes))
    stats, _ = measure(_untrained(cfg).to(dev), dataset, num_images, _start_prior(cfg), dev, cfg.eval.batch_size)
    return {e: with_extra_classes(stats, e - base) for e in extra_classes}


# --------------------------------------------------------------------------------------- CLI
def format_table(rows: list[tuple[str, Imbalance, Optional[TrainedShares]]]) -> str:
    """A markdown table, one row per measured set."""
    header = ["set", "images", "K", "anchors R", "positives P", "negative pairs Q", "Q / P",
              "negatives' share of initial CE", "easy negatives' share of CE (p < 0.1)"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, s, t in rows:
        lines.append("| " + " | ".join([
            name, str(s.images) if s.images else "-", str(s.num_classes), f"{s.anchors:,.0f}",
            f"{s.positives:,.1f}", f"{s.negative_pairs:,.0f}", f"1:{s.ratio:,.0f}",
            f"{100 * s.initial_negative_share:.1f}%",
            f"{100 * t.easy_negative_share:.1f}%" if t else "-"]) + " |")
    return "\n".join(lines)


def _config_rows(config: str, sets: Sequence[str], grids: Sequence[str], num_images: int,
                 dev: torch.device) -> list[tuple[str, Imbalance, None]]:
    """One row per combination of ``grids`` (``retina ablate``'s ``key=v1,v2`` items; none: one
    row) of ``config`` with ``sets``: its untrained model (K = the val set's classes) on its val
    set, named ``<config> <run name>``."""
    from retina.config import find_config
    from retina.data import build_dataset

    path, rows = find_config(config), []
    for combo in expand_grid(grids):
        cfg = load_config(path, [*sets, *combo])
        dataset = build_dataset(cfg, "val")
        cfg = replace(cfg, model=dataclasses.replace(cfg.model, num_classes=dataset.num_classes))
        stats, _ = measure(_untrained(cfg).to(dev), dataset, num_images, _start_prior(cfg), dev,
                           cfg.eval.batch_size)  # fmt: skip
        rows.append((" ".join([Path(config).stem, *([run_name(combo)] if combo else [])]), stats, None))
    return rows


def imbalance_cli(config: Optional[str], weights: Optional[str], sets: Sequence[str] = (),
                  num_images: int = 100, coco: bool = False, coco_positives: float = COCO_POSITIVES,
                  device: str = "auto", grids: Sequence[str] = ()) -> int:
    """``retina analyze imbalance [--config C] [--weights RUN] [--set k=v ...] [--num-images N]
    [--coco] [--coco-positives P] [--grid KEY=V1,V2 ...]``: print the table; with ``--weights``
    the trained model's config (or ``--config``) and its CE shares. ``grids`` (``key=v1,v2,...``,
    as ``retina ablate --grid``): one row per combination of ``config``, e.g.
    ``data.shapes.extra_classes=0,77``."""
    from retina.config import find_config
    from retina.data import build_dataset
    from retina.engine.dist import resolve_device
    from retina.errors import UsageError

    if config is None and weights is None and not coco:
        raise UsageError("retina analyze imbalance needs --config C, --weights RUN or --coco")
    if grids and (config is None or weights is not None):
        raise UsageError("retina analyze imbalance: a grid is measured on --config C, without --weights")
    dev = resolve_device(device)
    rows: list[tuple[str, Imbalance, Optional[TrainedShares]]] = []
    if weights is not None:
        from retina.engine.checkpoint import load_model

        cfg = load_config(find_config(config), sets) if config is not None else None
        model, cfg, _, _ = load_model(weights, dev, tuple(sets), cfg)
        stats, shares = measure(model, build_dataset(cfg, "val"), num_images, _start_prior(cfg), dev,
                                cfg.eval.batch_size, trained=True)  # fmt: skip
        rows.append((Path(weights).name, stats, shares))
    elif config is not None:
        rows += _config_rows(config, sets, grids, num_images, dev)
    if coco:
        coco_cfg = load_config(find_config("retinanet_r50_fpn_1x_coco"))
        for p in (coco_positives, 10 * coco_positives):
            rows.append((f"COCO {COCO_SIZE[0]}x{COCO_SIZE[1]}, P={p:g} assumed", coco_imbalance(coco_cfg, p), None))
    print(format_table(rows))
    for name, _, t in rows:
        if t is not None:
            print(f"{name}: after training, negatives carry {100 * t.negative_share:.1f}% of the CE; "
                  f"{100 * t.easy_fraction:.2f}% of negative pairs are easy (p < {EASY_P}) and carry "
                  f"{100 * t.easy_negative_share:.1f}% of the CE")
    return 0
