"""Inference speed, lever by lever: what ``retina eval`` / ``predict`` gain from each step.

For one model and input shape, each variant runs the same batch in eval mode (post-processing
included), after one untimed call each (``torch.compile`` compiles there: its time is reported
apart), alternating variant by variant for ``repeats`` rounds; the table gives each one's median
wall and CPU time (this process, all threads) and their ratio to torchvision's eager model on
the same weights (the R50 parity model) or to retina eager (any other config).

Variants (``LEVERS``):

- ``eager``: the model as built from its config (NCHW, BatchNorm modules);
- ``fold_bn``: BatchNorm folded into the convolutions (``retina.deploy.fuse.fold_batchnorm``);
- ``fold_bn+channels_last``: and NHWC activations and weights (``inference_model``, what
  ``retina eval``/``predict`` run);
- ``compile``: that model with backbone, FPN and head through ``torch.compile`` (inductor,
  ``freezing``);
- ``onnxruntime``: ``retina export --dynamic``'s ONNX file run by onnxruntime (CPU);
- ``torchvision``: ``torchvision.models.detection.retinanet_resnet50_fpn`` (parity model only).

Run from the top of the repository (the R50 parity model, or ``--config``'s model):

    python -m benchmarks.inference --image-size 800x1056 --batch-sizes 1 2 --repeats 3
    python -m benchmarks.inference --config shapes --image-size 128x128 --batch-sizes 1 2

Shape legend: N images.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from benchmarks.detector import BenchSpec, benchmark_config, build_models, input_size_overrides, parse_hxw
from benchmarks.timing import timed
from retina.config import find_config
from retina.deploy.fuse import fold_batchnorm, inference_model
from retina.io import write_json
from retina.model import RetinaNet, build_model

Lever = Literal["eager", "fold_bn", "fold_bn+channels_last", "compile", "onnxruntime", "torchvision"]
LEVERS: tuple[Lever, ...] = ("eager", "fold_bn", "fold_bn+channels_last", "compile", "onnxruntime",
                             "torchvision")


@dataclass(frozen=True)
class InferenceSpec:
    model: Literal["parity", "config"] = "parity"  # parity: R50 converted from torchvision's init
    config: str = "shapes"  # with model="config": a retina config, random init from ``seed``
    image_size: tuple[int, int] = (800, 1056)  # H, W; the config's test size is set to it
    batch_sizes: tuple[int, ...] = (1, 2)
    repeats: int = 3
    levers: tuple[Lever, ...] = LEVERS
    seed: int = 0


def _models(spec: InferenceSpec) -> tuple[RetinaNet, Optional[nn.Module], str]:
    """(retina model as its config builds it, torchvision's model or None, description)."""
    h, w = spec.image_size
    if spec.model == "parity":
        ours, theirs, desc, _ = build_models(BenchSpec(channels_last=False, seed=spec.seed), spec.image_size)
        return ours.eval(), theirs.eval(), "R50 parity model (torchvision's random init converted), " + desc
    overrides = input_size_overrides(h, w)
    torch.manual_seed(spec.seed)
    cfg = benchmark_config(find_config(spec.config), overrides)
    return build_model(cfg, pretrained=False).eval(), None, f"{spec.config} (random init) " + " ".join(overrides)


def _compiled(model: RetinaNet) -> RetinaNet:
    """Backbone, FPN and head through inductor with ``freezing`` (weights as constants: conv
    weight prepacking and conv + ReLU fusion on the CPU); pre/post-processing stay eager."""
    for name in ("backbone", "fpn", "head"):
        setattr(model, name, torch.compile(getattr(model, name), options={"freezing": True}))
    return model


def _onnx(model: RetinaNet, folder: Path, example: Tensor) -> Callable[[list[Tensor]], object]:
    from retina.deploy.export import export_model
    from retina.deploy.runtime import OnnxDetector

    meta = {"retina_export": "1", "input_dtype": "float32", "input_shape": '["batch", 3, "height", "width"]'}
    path = export_model(copy.deepcopy(model), folder / "model.onnx", "onnx", example, meta, dynamic=True)
    return OnnxDetector(path)


def build_variants(spec: InferenceSpec, folder: Path, example: Tensor
                   ) -> tuple[dict[str, Callable[[list[Tensor]], object]], dict[str, float], str]:
    """The selected levers as callables on a list of images; setup seconds (export) per lever."""
    ours, theirs, desc = _models(spec)
    variants: dict[str, Callable] = {}
    setup: dict[str, float] = {}
    for lever in spec.levers:
        t0 = time.perf_counter()
        if lever == "eager":
            variants[lever] = ours
        elif lever == "fold_bn":
            folded = copy.deepcopy(ours)
            fold_batchnorm(folded.backbone)
            variants[lever] = folded
        elif lever == "fold_bn+channels_last":
            variants[lever] = inference_model(copy.deepcopy(ours), channels_last=True)
        elif lever == "compile":
            variants[lever] = _compiled(inference_model(copy.deepcopy(ours), channels_last=True))
        elif lever == "onnxruntime":
            variants[lever] = _onnx(ours, folder, example)
        elif lever == "torchvision" and theirs is not None:
            variants[lever] = theirs
        setup[lever] = time.perf_counter() - t0
    return variants, setup, desc


def run(spec: InferenceSpec, log: Callable[[str], None] = print) -> dict:
    """Time every variant at every batch size; returns the JSON-ready result."""
    g = torch.Generator().manual_seed(spec.seed)
    h, w = spec.image_size
    images = [torch.rand(3, h, w, generator=g) for _ in range(max(spec.batch_sizes))]  # in [0, 1]
    result: dict = {"spec": {**spec.__dict__}, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        variants, setup, result["model"] = build_variants(spec, Path(tmp), images[0][None])
        for n in spec.batch_sizes:
            batch = images[:n]
            calls = {k: (lambda f=f: _infer(f, batch)) for k, f in variants.items()}
            first = {}
            for name, call in calls.items():
                log(f"N={n} {name}: first call ...")
                first[name] = timed(call)[0]
            wall: dict[str, list[float]] = {k: [] for k in calls}
            cpu: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(spec.repeats):
                for name, call in calls.items():
                    t, c = timed(call)
                    wall[name].append(t)
                    cpu[name].append(c)
            base = "torchvision" if "torchvision" in calls else "eager"
            for name in calls:
                row = {"batch": n, "lever": name, "wall_s": statistics.median(wall[name]),
                       "cpu_s": statistics.median(cpu[name]), "times_s": wall[name],
                       "first_call_s": first[name], "setup_s": setup.get(name, 0.0), "baseline": base}
                row["ratio"] = row["wall_s"] / statistics.median(wall[base])
                row["cpu_ratio"] = row["cpu_s"] / statistics.median(cpu[base])
                result["rows"].append(row)
    return result


def _infer(model: Callable, images: list[Tensor]) -> None:
    if isinstance(model, nn.Module):
        model.eval()
    with torch.inference_mode():
        model(images)


def format_table(result: dict) -> str:
    rows = result["rows"]
    base = rows[0]["baseline"] if rows else "torchvision"
    lines = [f"model: {result['model']}", f"torch {result['torch']}, {result['threads']} threads",
             f"{'N':>2} {'lever':<22} {'wall s':>8} {'cpu s':>8} {'/' + base[:5]:>7} {'cpu /':>7} "
             f"{'1st call s':>10} {'setup s':>8}"]
    for r in rows:
        lines.append(f"{r['batch']:>2} {r['lever']:<22} {r['wall_s']:>8.3f} {r['cpu_s']:>8.3f} "
                     f"{r['ratio']:>7.3f} {r['cpu_ratio']:>7.3f} {r['first_call_s']:>10.1f} {r['setup_s']:>8.1f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="a retina config's model, random init "
                   "(default: the R50 parity model, beside torchvision's)")
    p.add_argument("--image-size", type=parse_hxw, default=(800, 1056), help="HxW of the images")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of every lever")
    p.add_argument("--skip", nargs="*", default=[], choices=LEVERS, help="levers to leave out, e.g. compile")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = InferenceSpec(model="config" if a.config else "parity", config=a.config or "shapes",
                         image_size=a.image_size, batch_sizes=tuple(a.batch_sizes), repeats=a.repeats,
                         seed=0, levers=tuple(v for v in LEVERS if v not in a.skip))
    result = run(spec, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result))
    if a.json is not None:
        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
