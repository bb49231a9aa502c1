"""A training race at equal wall-clock time: ``retina train`` against torchvision's own RetinaNet
(the contestants: ``contestants.py``), trained from scratch on the same photos one after the
other; a table, the learning curves as a plot, a JSON file per contestant. Run from the top of the
repository:

    python -m benchmarks.race --root ../shared/data/raccoon-voc --recipe photos_cpu --budget-min 15 \
        --out runs/race
    python -m benchmarks.race --root ../shared/data/raccoon-voc --contestants retina-recipe --budget-min 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.contestants import (CONTESTANTS, TV_SAME, Curve, RaceSpec, recipe_config, run_retina,
                                    run_torchvision, same_overrides)
from retina.config import find_config, load_config
from retina.data import dataset_source
from retina.data.coco import CocoDetection
from retina.io import write_json

# ------------------------------------------------------------------------------ the race
def run(spec: RaceSpec) -> list[Curve]:
    unknown = set(spec.contestants) - set(CONTESTANTS)
    if unknown:
        raise ValueError(f"unknown contestants {sorted(unknown)}; choose from {', '.join(CONTESTANTS)}")
    recipe = recipe_config(spec)
    train_set = CocoDetection(*dataset_source(recipe, "train")[:2])
    same = same_overrides(recipe, len(train_set), num_classes=train_set.num_classes)
    curves = []
    for name in spec.contestants:
        (spec.out / name).mkdir(parents=True, exist_ok=True)
        if name == "torchvision":
            curve = run_torchvision(load_config(find_config(TV_SAME), same), spec)
        elif name == "retina-same":
            curve = run_retina(name, TV_SAME, same, spec)
        else:
            curve = run_retina(name, spec.recipe, [f"data.root={spec.root}", f"train.seed={spec.seed}",
                                                   *spec.overrides], spec)
        curves.append(curve)
        write_json(spec.out / f"{name}.json", curve.__dict__)
    return curves



def load_curves(out: Path) -> list[Curve]:
    """Every contestant's curve written to ``out`` so far (races can be run one contestant at a
    time), in ``CONTESTANTS`` order."""
    return [Curve(**json.loads((out / f"{name}.json").read_text()))
            for name in CONTESTANTS if (out / f"{name}.json").is_file()]


def format_table(curves: Sequence[Curve], budget_s: float) -> str:
    lines = ["| contestant | s/it | iterations | training time | AP | AP50 |", "|---|---|---|---|---|---|"]
    for c in curves:
        lines.append(f"| {c.name} | {c.sec_per_iter:.2f} | {c.max_iter} | {c.seconds[-1] / 60:.1f} min "
                     f"| {c.ap[-1]:.1f} | {c.ap50[-1]:.1f} |")
    return "\n".join(lines) + f"\n\nbudget: {budget_s / 60:.1f} min of training per contestant"


def plot(curves: Sequence[Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for c in curves:
        minutes = [0.0] + [s / 60 for s in c.seconds]
        axes[0].plot(minutes, [0.0] + c.ap, marker="o", label=c.name)
        axes[1].plot(minutes, [0.0] + c.ap50, marker="o", label=c.name)
    for ax, what in zip(axes, ("AP (0.5:0.95)", "AP50")):
        ax.set_xlabel("training time (min)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.race", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="photo folder (VOC, YOLO or COCO layout)")
    p.add_argument("--recipe", default="photos_cpu", help="retina's config for retina-recipe; its image "
                   "size, batch and solver are also the torchvision and retina-same settings")
    p.add_argument("--budget-min", type=float, default=15.0, help="training minutes per contestant")
    p.add_argument("--calib-iters", type=int, default=30)
    p.add_argument("--eval-points", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contestants", nargs="+", default=list(CONTESTANTS), choices=CONTESTANTS)
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="for every contestant (repeated --set flags add up)")
    p.add_argument("--out", default="runs/race")
    args = p.parse_args(argv)
    if not Path(args.root).is_dir():
        p.error(f"--root {args.root}: no such folder")
    spec = RaceSpec(root=args.root, recipe=args.recipe, out=Path(args.out), budget_s=args.budget_min * 60,
                    calib_iters=args.calib_iters, eval_points=args.eval_points, seed=args.seed,
                    contestants=args.contestants, overrides=args.set)
    run(spec)
    curves = load_curves(spec.out)  # with contestants of earlier invocations into the same --out
    table = format_table(curves, spec.budget_s)
    print(table)
    (spec.out / "race.md").write_text(table + "\n")
    plot(curves, spec.out / "race.png")
    print(f"table: {spec.out / 'race.md'}; curves: {spec.out / 'race.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
