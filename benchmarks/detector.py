"""Side-by-side speed of ``retina`` and torchvision's ``retinanet_resnet50_fpn`` in one process.

Both models get the same batch (and the same weights when ``retina/deploy/convert.py`` can copy them);
each timed part alternates ours, theirs, ours, theirs... after a warmup, and reports the median of
each and the ratio ours / theirs. Parts:

- ``train``: forward, backward and an SGD step on ``batch_size`` images of ``image_size``;
- ``infer``: eval-mode forward including post-processing;
- ``loss``: target assignment + loss (forward and backward to the head outputs) from the same
  head outputs and anchors: torchvision's ``model.compute_loss`` against retina's
  ``compute_loss`` (assigner + ``retinanet_losses``);
- ``post``: post-processing alone from the same head outputs: torchvision's
  ``model.postprocess_detections`` against retina's ``PostProcessor``.

Run from the top of the repository:

    python -m benchmarks.detector --device cpu --batch-size 2 --image-size 800x1056 --repeats 5 \
        --json runs/bench.json

Shape legend: N images, R anchors per image, M ground-truth boxes, K classes.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
import torchvision
from torch import Tensor, nn

from benchmarks.timing import PeakMemory, timed
from retina.config import Config, load_config
from retina.data import dataset_num_classes, resolve_num_classes
from retina.deploy import convert
from retina.io import write_json
from retina.model import RetinaNet, build_model

Part = Literal["train", "infer", "loss", "post"]
PARTS: tuple[Part, ...] = ("train", "infer", "loss", "post")

# torchvision's builder with weights_backbone=None uses trainable BatchNorm2d (eps 1e-5) everywhere.
TV_RANDOM_INIT = ("model.backbone.norm=bn", "model.backbone.norm_eps=1e-5")


def input_size_overrides(height: int, width: int) -> tuple[str, ...]:
    """Config overrides under which the model keeps an H x W image as it is, in training and at
    inference (the test keys too: a config's own test size would otherwise resize it)."""
    short, long = min(height, width), max(height, width)
    return (f"model.input.min_size=[{short}]", f"model.input.max_size={long}",
            f"model.input.test_min_size={short}", f"model.input.test_max_size={long}")


@dataclass(frozen=True)
class BenchSpec:
    device: str = "cpu"
    batch_size: int = 2  # N of the train / infer parts
    image_size: tuple[int, int] = (800, 1056)  # H, W of the train / infer parts
    dtype: Literal["fp32", "bf16"] = "fp32"
    repeats: int = 5  # timed calls of each model per part
    warmup: int = 1  # untimed calls of each model per part first
    parts: tuple[Part, ...] = PARTS
    depth: int = 50  # ResNet depth of both models (torchvision's builder is R50; others built alike)
    part_batch_size: int = 8  # N of the loss / post parts
    part_image_size: tuple[int, int] = (800, 1333)  # H, W whose anchors the loss / post parts use
    num_gt: int = 50  # M ground-truth boxes per image
    config: Optional[str] = None  # retina config; default: torchvision's, through retina.deploy.convert
    overrides: tuple[str, ...] = ()  # extra dotted overrides of the retina config
    seed: int = 0
    # retina's model.channels_last (NHWC activations and weights; off in the configs by default).
    # torchvision's model runs as its builder makes it (NCHW).
    channels_last: bool = True


# ---------------------------------------------------------------------------------- models
def benchmark_config(config: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """``config`` with ``model.num_classes`` resolved as training would: from its data when the
    data can be read (the bundled sets always), else COCO's 80 (a speed benchmark needs no data)."""
    cfg = load_config(config, list(overrides))
    k = dataset_num_classes(cfg)
    if k is None:  # no data to read: the config's own count, else COCO's
        k = cfg.model.num_classes or 80
    return resolve_num_classes(cfg, k, f"the data at data.root={cfg.data.root}")


def build_models(spec: BenchSpec, image_size: tuple[int, int]) -> tuple[RetinaNet, nn.Module, str, str]:
    """Retina and torchvision models of the same architecture; returns (ours, theirs, config
    description, how the weights were made equal).

    Default: ``retina.deploy.convert`` builds retina's torchvision-parity model (the model section of
    ``configs/torchvision_retinanet_r50_fpn.yaml``) from torchvision's random-init state dict, so
    both hold the same weights; with trainable BatchNorm, as torchvision has without pretrained
    weights. With ``spec.config`` both are built from one seed.
    """
    h, w = image_size
    sizes = (*input_size_overrides(h, w), f"model.backbone.depth={spec.depth}", "model.backbone.weights=null",
             f"model.channels_last={str(spec.channels_last).lower()}")
    if spec.config is None:
        overrides = TV_RANDOM_INIT + sizes + tuple(spec.overrides)
        torch.manual_seed(spec.seed)
        theirs = torchvision_retinanet(spec.depth, 80, min(h, w), max(h, w), 300)
        ours, _, _, _ = convert.convert_to_model(theirs.state_dict(), "v1", overrides=overrides)
        return (ours, theirs, "retina.deploy.convert.torchvision_config('v1') " + " ".join(overrides),
                "torchvision's random init copied into retina by retina.deploy.convert")
    config, overrides = spec.config, sizes + tuple(spec.overrides)
    cfg = benchmark_config(config, overrides)
    torch.manual_seed(spec.seed)
    ours = build_model(cfg)
    torch.manual_seed(spec.seed)
    theirs = torchvision_retinanet(spec.depth, cfg.model.num_classes, min(h, w), max(h, w),
                                   cfg.model.inference.detections_per_image)
    return ours, theirs, f"{config} " + " ".join(overrides), "same seed, different weights"


def torchvision_retinanet(depth: int, num_classes: int, min_size: int, max_size: int,
                          detections_per_img: int) -> nn.Module:
    """``retinanet_resnet50_fpn(weights=None, weights_backbone=None)``, or the same builder's
    architecture on another ResNet depth (for quick runs)."""
    from torchvision.models.detection import RetinaNet as TVRetinaNet, retinanet_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    kwargs = dict(min_size=min_size, max_size=max_size, detections_per_img=detections_per_img)
    if depth == 50:
        return retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                      **kwargs)
    trunk = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = _resnet_fpn_extractor(trunk, 5, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256))
    return TVRetinaNet(backbone, num_classes, **kwargs)


# ------------------------------------------------------------------------------------ data
def make_batch(n: int, image_size: tuple[int, int], num_gt: int, num_classes: int,
               device: torch.device, seed: int) -> tuple[list[Tensor], list[dict]]:
    """N random images (3, H, W) in [0, 1] and M random boxes of 16..H/2 px per image."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        wh = 16 + torch.rand(num_gt, 2, generator=g) * (min(h, w) / 2 - 16)  # (M, 2)
        xy = torch.rand(num_gt, 2, generator=g) * (torch.tensor([w, h]) - wh)  # (M, 2)
        boxes = torch.cat([xy, xy + wh], dim=1)  # (M, 4)
        labels = torch.randint(0, num_classes, (num_gt,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def part_anchors(model: RetinaNet, image_size: tuple[int, int], device: torch.device
                 ) -> tuple[Tensor, list[int]]:
    """(R, 4) anchors of ``model`` for a padded image of ``image_size`` and R split by level; every
    stride-2 layer maps a side s to ceil(s / 2)."""
    d = model.input_spec.size_divisibility
    padded = tuple(int(math.ceil(s / d) * d) for s in image_size)
    h, w = padded
    levels = range(model.fpn.min_level, model.fpn.max_level + 1)
    sizes = []
    for level in range(1, max(levels) + 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        if level in levels:
            sizes.append((h, w))
    anchors = model.anchor_generator(sizes, device, padded)  # (R, 4)
    return anchors, model.anchor_generator.num_anchors_per_level(sizes)


def head_outputs(n: int, r: int, k: int, dtype: torch.dtype, device: torch.device,
                 seed: int) -> tuple[Tensor, Tensor]:
    """Random (N, R, K) logits and (N, R, 4) deltas. Logits ~ N(-7, 1.5): about 0.35% of scores
    pass the 0.05 threshold, an assumption for a trained detector (an untrained one at the
    prior, logit -4.6, passes none)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, r, k, generator=g) * 1.5 - 7.0).to(device, dtype)  # (N, R, K)
    deltas = (torch.randn(n, r, 4, generator=g) * 0.1).to(device, dtype)  # (N, R, 4)
    return logits, deltas


# ----------------------------------------------------------------------------------- parts
def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def train_step(model: nn.Module, images: list[Tensor], targets: list[dict], device: torch.device,
               dtype: str) -> Callable[[], None]:
    # A small lr keeps random-init weights from diverging over the repeats.
    opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        model.train()
        with _autocast(device, dtype):
            losses = model(images, targets)
        # retina's num_pos is a count, not a loss; torchvision's keys are classification and
        # bbox_regression, so everything else is summed
        loss = sum(v for k, v in losses.items() if k != "num_pos")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def infer_step(model: nn.Module, images: list[Tensor], device: torch.device, dtype: str) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.inference_mode(), _autocast(device, dtype):
            model(images)

    return step


def loss_steps(ours: RetinaNet, theirs: nn.Module, spec: BenchSpec, device: torch.device,
               dtype: torch.dtype) -> tuple[Callable[[], None], Callable[[], None], str]:
    """Assignment + loss, forward and backward to the head outputs, from identical inputs."""
    n, k = spec.part_batch_size, ours.num_classes
    anchors, per_level = part_anchors(ours, spec.part_image_size, device)  # (R, 4)
    logits, deltas = head_outputs(n, anchors.shape[0], k, dtype, device, spec.seed)
    logits.requires_grad_(True)
    deltas.requires_grad_(True)
    _, targets = make_batch(n, spec.part_image_size, spec.num_gt, k, torch.device("cpu"), spec.seed)
    targets = [{key: v.to(device) for key, v in t.items()} for t in targets]
    theirs_anchors = [anchors] * n

    def ours_step() -> None:
        losses = ours.compute_loss(logits, deltas, targets, anchors, per_level)
        torch.autograd.grad(losses["loss_cls"] + losses["loss_box"], [logits, deltas])

    def theirs_step() -> None:
        losses = theirs.compute_loss(targets, {"cls_logits": logits, "bbox_regression": deltas},
                                     theirs_anchors)
        torch.autograd.grad(sum(losses.values()), [logits, deltas])

    shape = f"N={n} R={anchors.shape[0]} M={spec.num_gt} K={k}"
    return ours_step, theirs_step, shape


def post_steps(ours: RetinaNet, theirs: nn.Module, spec: BenchSpec, device: torch.device,
               dtype: torch.dtype) -> tuple[Callable[[], None], Callable[[], None], str]:
    n, k = spec.part_batch_size, ours.num_classes
    anchors, per_level = part_anchors(ours, spec.part_image_size, device)  # (R, 4)
    logits, deltas = head_outputs(n, anchors.shape[0], k, dtype, device, spec.seed)
    image_sizes = [tuple(spec.part_image_size)] * n
    split = {"cls_logits": list(logits.split(per_level, dim=1)),
             "bbox_regression": list(deltas.split(per_level, dim=1))}
    split_anchors = [list(anchors.split(per_level))] * n

    def ours_step() -> None:
        with torch.inference_mode():
            ours.postprocessor(logits, deltas, anchors, per_level, image_sizes)

    def theirs_step() -> None:
        with torch.inference_mode():
            theirs.postprocess_detections(split, split_anchors, image_sizes)

    return ours_step, theirs_step, f"N={n} R={anchors.shape[0]} K={k}"


# ---------------------------------------------------------------------------------- timing
def compare(ours: Callable[[], None], theirs: Callable[[], None], spec: BenchSpec,
            device: torch.device, memory: PeakMemory) -> dict:
    """Warmup, then ours, theirs, ours, theirs...; medians, ratio, and one peak-memory call each.

    Besides wall time, the process's CPU time (all threads) of each call: on a shared CPU the
    wall time also counts waiting for cores that other processes hold.
    """
    for _ in range(spec.warmup):
        ours()
        theirs()
    wall: dict[str, list[float]] = {"ours": [], "theirs": []}
    cpu: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(spec.repeats):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            w, c = timed(fn, device)
            wall[name].append(w)
            cpu[name].append(c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"ours_s": med["ours"], "theirs_s": med["theirs"], "ratio": med["ours"] / med["theirs"],
            "ours_cpu_s": med_cpu["ours"], "theirs_cpu_s": med_cpu["theirs"],
            "cpu_ratio": med_cpu["ours"] / max(med_cpu["theirs"], 1e-9),
            "ours_times_s": wall["ours"], "theirs_times_s": wall["theirs"],
            "ours_cpu_times_s": cpu["ours"], "theirs_cpu_times_s": cpu["theirs"],
            "ours_peak_mib": memory.measure(ours), "theirs_peak_mib": memory.measure(theirs)}


def run(spec: BenchSpec, log: Callable[[str], None] = print) -> dict:
    """Run the selected parts; returns the JSON-ready result."""
    device = torch.device(spec.device)
    dtype = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory = PeakMemory(device)
    result: dict = {"spec": asdict(spec), "device": _device_name(device), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
                    "memory_measure": memory.method, "parts": {}}
    model_parts = [p for p in spec.parts if p in ("train", "infer")]
    if model_parts:
        ours, theirs, result["config"], result["weights"] = build_models(spec, spec.image_size)
        ours.to(device)
        theirs.to(device)
        images, targets = make_batch(spec.batch_size, spec.image_size, spec.num_gt, ours.num_classes,
                                     device, spec.seed)
        shape = f"N={spec.batch_size} {spec.image_size[0]}x{spec.image_size[1]}"
        for part in model_parts:
            log(f"{part} ...")
            if part == "train":
                a = train_step(ours, images, targets, device, spec.dtype)
                b = train_step(theirs, images, targets, device, spec.dtype)
            else:
                a = infer_step(ours, images, device, spec.dtype)
                b = infer_step(theirs, images, device, spec.dtype)
            result["parts"][part] = {"shape": shape, **compare(a, b, spec, device, memory)}
        del ours, theirs
    head_parts = [p for p in spec.parts if p in ("loss", "post")]
    if head_parts:
        ours, theirs, result["config"], result["weights"] = build_models(spec, spec.part_image_size)
        ours.to(device)
        theirs.to(device)
    for part in head_parts:
        log(f"{part} ...")
        make = loss_steps if part == "loss" else post_steps
        a, b, shape = make(ours, theirs, spec, device, dtype)
        result["parts"][part] = {"shape": shape, **compare(a, b, spec, device, memory)}
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(result: dict) -> str:
    lines = [f"device: {result['device']}, torch {result['torch']}, torchvision {result['torchvision']}",
             f"peak memory: {result['memory_measure']} (MiB)",
             f"{'part':<6} {'shape':<26} {'ours s':>8} {'tv s':>8} {'ours/tv':>7} {'tv/ours':>7}"
             f" {'cpu o/tv':>8} {'ours MiB':>8} {'tv MiB':>8}"]
    for part, r in result["parts"].items():
        lines.append(f"{part:<6} {r['shape']:<26} {r['ours_s']:>8.4f} {r['theirs_s']:>8.4f}"
                     f" {r['ratio']:>7.3f} {1 / r['ratio']:>7.2f} {r['cpu_ratio']:>8.3f}"
                     f" {r['ours_peak_mib']:>8.0f} {r['theirs_peak_mib']:>8.0f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ command line
def parse_hxw(text: str) -> tuple[int, int]:
    """argparse type of an image size written HxW, e.g. 800x1056."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 800x1056, got {text!r}") from None
    return h, w


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.detector", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=2, help="images per train / infer step")
    p.add_argument("--image-size", type=parse_hxw, default=(800, 1056), help="HxW of train / infer")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each model per part")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    p.add_argument("--depth", type=int, choices=[18, 34, 50, 101], default=50)
    p.add_argument("--part-batch-size", type=int, default=8, help="images of the loss / post parts")
    p.add_argument("--part-image-size", type=parse_hxw, default=(800, 1333),
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
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
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


if __name__ == "__main__":
    raise SystemExit(main())
