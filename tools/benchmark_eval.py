"""pycocotools vs faster-coco-eval on a synthetic COCO-like evaluation (see
retina/bench/eval_backends.py).

    python tools/benchmark_eval.py --images 5000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retina.bench.eval_backends import compare_backends  # noqa: E402
from retina.engine.evaluate import write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=1, help="timed evaluations per backend (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    r = compare_backends(a.images, a.repeats, a.seed)
    print(f"{r['num_images']} images, {r['num_gt']} GT boxes, {r['num_detections']} detections")
    print(f"pycocotools      {r['pycocotools_s']:8.2f} s")
    print(f"faster_coco_eval {r['faster_coco_eval_s']:8.2f} s")
    print(f"speedup          {r['speedup']:8.2f} x   (largest metric difference "
          f"{r['max_metric_diff']:.3g}, per class {r['max_per_class_diff']:.3g})")
    if a.json is not None:
        write_json(a.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
