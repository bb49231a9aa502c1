"""retina vs torchvision RetinaNet, side by side in one process (see retina/bench/detector.py);
with --levers, inference lever by lever (see retina/bench/inference.py).

    python tools/benchmark.py --device cpu --batch-size 2 --image-size 800x1056 --repeats 5 \
        --json runs/bench.json
    python tools/benchmark.py --levers --image-size 800x1056 --batch-sizes 1 2 --repeats 3
    python tools/benchmark.py --levers --config shapes --image-size 128x128 --batch-sizes 1 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retina.bench.detector import PARTS, BenchSpec, format_table, run  # noqa: E402
from retina.engine.evaluate import write_json  # noqa: E402


def size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 800x1056, got {text!r}") from None
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=2, help="images per train / infer step")
    p.add_argument("--image-size", type=size, default=(800, 1056), help="HxW of train / infer")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each model per part")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    p.add_argument("--depth", type=int, choices=[18, 34, 50, 101], default=50)
    p.add_argument("--part-batch-size", type=int, default=8, help="images of the loss / post parts")
    p.add_argument("--part-image-size", type=size, default=(800, 1333),
                   help="HxW whose anchors the loss / post parts use")
    p.add_argument("--num-gt", type=int, default=50, help="ground-truth boxes per image")
    p.add_argument("--config", default=None, help="retina config, both models from one seed "
                   "(default: torchvision's architecture and weights, through retina.deploy.convert)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="retina config overrides (repeated --set flags add up)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="run retina with model.channels_last=false (default: true)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--levers", action="store_true",
                   help="inference lever by lever (eager, fold_bn, channels_last, compile, onnxruntime, "
                        "torchvision) on the R50 parity model, or on --config's model")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2], help="--levers: batch sizes")
    p.add_argument("--skip", nargs="*", default=[], help="--levers: levers to leave out, e.g. compile")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.levers:
        return _levers(a)
    spec = BenchSpec(device=a.device, batch_size=a.batch_size, image_size=a.image_size, dtype=a.dtype,
                     repeats=a.repeats, warmup=a.warmup, parts=tuple(a.only), depth=a.depth,
                     part_batch_size=a.part_batch_size, part_image_size=a.part_image_size,
                     num_gt=a.num_gt, config=a.config, overrides=tuple(a.set),
                     channels_last=not a.no_channels_last)
    result = run(spec, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"config: {result.get('config')}\nweights: {result.get('weights')}")
    print(format_table(result))
    if a.json is not None:
        write_json(a.json, result)
    return 0


def _levers(a: argparse.Namespace) -> int:
    from retina.bench import inference

    spec = inference.InferenceSpec(model="config" if a.config else "parity", config=a.config or "shapes",
                                   image_size=a.image_size, batch_sizes=tuple(a.batch_sizes),
                                   repeats=a.repeats, seed=0,
                                   levers=tuple(v for v in inference.LEVERS if v not in a.skip))
    result = inference.run(spec, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(inference.format_table(result))
    if a.json is not None:
        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
