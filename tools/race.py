"""retina against torchvision's own RetinaNet, trained from scratch on the same photos for the same
wall-clock time (see retina/bench/race.py): a table, the learning curves as a plot, JSON per run.

    python tools/race.py --root ../shared/data/raccoon-voc --recipe photos_cpu --budget-min 15 \
        --out runs/race
    python tools/race.py --root ../shared/data/raccoon-voc --contestants retina-recipe --budget-min 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retina.bench.race import CONTESTANTS, RaceSpec, format_table, load_curves, plot, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    sys.exit(main())
