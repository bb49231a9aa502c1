"""``retina`` command line: train, eval, predict, ablate, analyze, convert, export, data.

This module is the parser: one builder per verb (``_add_<verb>``); ``data`` and ``analyze`` have a
subcommand per job, each with only its own options. What a verb then runs is in
``retina.commands``, which imports the library when the verb runs: ``--help``, argument errors
and config errors answer without importing torch.

Every error a user can fix (config, missing file, bad checkpoint: a ``retina.errors.RetinaError``)
is printed as one line ``retina: error: ...`` with exit status 2; any other exception is a bug
and keeps its traceback; an interrupted run exits 128 + the signal number after
saving a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Optional, Sequence

from retina.commands import COMMANDS, DEFAULT_CONFIG, PREDICT_OUT
from retina.config import ShapesConfig, show_notices
from retina.errors import RetinaError

DEVICE_HELP = "auto (cuda if available), cpu, cuda, cuda:1"


# ------------------------------------------------------------------------------ shared options
def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    """``--set K=V ...``; repeated ``--set`` flags add up (argparse's default keeps the last)."""
    p.add_argument("--set", "-s", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def _positive_int(text: str) -> int:
    """argparse type of a count that must be >= 1 (``--num-images 0`` analysed nothing, exit 0)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c",
                   help=f"YAML config: a path or a bundled config's name, e.g. shapes or "
                        f"ablations/shapes_focal (default: {DEFAULT_CONFIG}; with --resume, the "
                        f"run's own config.yaml)")
    _add_set(p, "dotted overrides, e.g. loss.gamma=1.0 solver.max_iter=500")
    _add_device(p)


def _add_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", "-w", required=True,
                   help="checkpoint file or run directory, or a file of retina export (.onnx, .pt2)")
    p.add_argument("--config", "-c", help="config to use instead of the one the checkpoint holds")
    _add_set(p, "config overrides, e.g. data.root=/data/coco model.inference.score_thresh=0.1")
    _add_device(p)


def _verb(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` opens with its one-line ``help``."""
    return sub.add_parser(name, help=help, description=help)


# ------------------------------------------------------------------------------ verbs' parsers
def _add_train(sub: Any) -> None:
    p = _verb(sub, "train", "train a detector (default: the bundled shapes set)")
    _add_config_args(p)
    p.add_argument("--out", "-o", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--init", metavar="CKPT", help="start from a retina checkpoint's weights (model.init; a run "
                                                  "directory: its newest checkpoint): every tensor that "
                                                  "fits; ignored on --resume")


def _add_eval(sub: Any) -> None:
    p = _verb(sub, "eval", "COCO evaluation of a checkpoint on the val split")
    _add_weights_args(p)
    p.add_argument("--out", "-o", help="where detections.json and metrics.json go (default: <run dir>/eval, "
                                       "or eval2, 3, ... when it holds an earlier evaluation: kept)")


def _add_predict(sub: Any) -> None:
    p = _verb(sub, "predict", "detect objects in image files; write drawn images + JSON")
    _add_weights_args(p)
    p.add_argument("--input", "-i", required=True, nargs="+", metavar="PATH",
                   help="image files, directories (their .jpg/.jpeg/.png/.bmp) and quoted globs, "
                        "e.g. a.jpg photos/ 'shots/**/*.png'")
    p.add_argument("--out", "-o", help=f"output directory (default: {PREDICT_OUT.as_posix()}, or "
                                       f"{PREDICT_OUT.name}2, 3, ... when it already holds files: an "
                                       f"earlier prediction is kept)")
    p.add_argument("--score-thresh", type=float, default=0.3,
                   help="detections scoring lower are neither drawn nor written (default: 0.3; "
                        "the model itself keeps those above model.inference.score_thresh)")


def _add_ablate(sub: Any) -> None:
    p = _verb(sub, "ablate", "train + evaluate a grid of configs; tables and plots")
    p.add_argument("--config", "-c", help="base config (a path or a bundled config's name)")
    p.add_argument("--grid", "-g", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept key; several --grid multiply (default: the config's ablate.grids)")
    _add_set(p, "overrides shared by every run")
    p.add_argument("--out", "-o", help="sweep directory (default: runs/ablate/<config name>)")
    p.add_argument("--jobs", "-j", type=int, default=1, help="runs at once")
    _add_device(p)
    p.add_argument("--report", metavar="DIR", help="only rebuild table.md/.csv and ablation.png")
    p.add_argument("--metrics", default="metrics.json", metavar="FILE",
                   help="with --report: each run's metrics file to report, e.g. eval_thr0/metrics.json "
                        "after `retina eval --weights RUN --out RUN/eval_thr0 ...` (written as "
                        "table.eval_thr0.md etc.; default: metrics.json, the training's own)")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="run every combination with train.seed=0..N-1 (runs named ...,seed=S); the "
                        "report shows mean +- std (default: the config's ablate.seeds, else one run)")


def _add_convert(sub: Any) -> None:
    p = _verb(sub, "convert", "convert another framework's weights into a retina checkpoint")
    p.add_argument("source", choices=["torchvision"])
    p.add_argument("--in", dest="in_path", required=True, help="torchvision RetinaNet state dict (.pth)")
    p.add_argument("--out", "-o", required=True, help="retina checkpoint to write")
    p.add_argument("--variant", choices=["v1", "v2"], default="v1",
                   help="v1: retinanet_resnet50_fpn; v2: retinanet_resnet50_fpn_v2")
    _add_set(p, "config overrides stored in the checkpoint, e.g. data.root=/data/coco")


def _add_export(sub: Any) -> None:
    p = _verb(sub, "export", "the whole detector as one ONNX / torch.export file; parity with PyTorch "
                             "checked on a few images")
    p.add_argument("--weights", "-w", required=True, help="checkpoint file or run directory")
    p.add_argument("--format", "-f", choices=["onnx", "pt2", "torchscript"], default="onnx",
                   help="onnx (run by onnxruntime) or pt2 (a torch.export program; torchscript: the "
                        "former name of pt2, deprecated)")
    p.add_argument("--out", "-o", help="file to write (default: <run dir>/model.onnx or model.pt2)")
    p.add_argument("--dynamic", action="store_true",
                   help="any batch size and image size (default: the first check image's shape)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--input", dest="input_dtype", choices=["uint8", "float32"], default="uint8",
                   help="the file's input dtype: uint8 0..255 or float32 in [0, 1] (default: uint8)")
    p.add_argument("--images", "-i", nargs="+", default=[], metavar="PATH",
                   help="images for the parity check (default: the first val images of the config)")
    p.add_argument("--num-images", type=_positive_int, default=4, help="images for the parity check")
    p.add_argument("--box-tol", type=float, default=1e-3, help="parity: largest box difference, px")
    p.add_argument("--config", "-c", help="config to use instead of the one the checkpoint holds")
    _add_set(p, "config overrides, e.g. data.root=/data/coco model.inference.score_thresh=0.1")


def _add_analyze(sub: Any) -> None:
    kinds = _verb(sub, "analyze", "analyses: errors (PR curves, confusion, TIDE), model (parameters, "
                                  "FLOPs), loss-cdf (paper Fig. 4), imbalance (anchors, positives, "
                                  "negative pairs, CE shares)").add_subparsers(dest="kind", required=True)
    p = _verb(kinds, "errors", "where a detector's AP goes: PR curves, confusion matrix, TIDE, AP by "
                               "size, from a run or from a detections json")
    p.add_argument("--weights", "-w", help="checkpoint file, run directory or exported model")
    p.add_argument("--detections", help="a COCO results json instead of --weights")
    p.add_argument("--ann", help="the COCO ground truth of --detections")
    p.add_argument("--config", "-c", help="config instead of the checkpoint's")
    _add_set(p, "config overrides, e.g. data.root=/data/coco")
    p.add_argument("--score-thresh", type=float,
                   help="confusion-matrix threshold (default: the F1-best, else 0.3)")
    p.add_argument("--out", "-o", help="output directory (default: <run dir>/analysis/errors or "
                                       "<detections dir>/errors, then errors2, 3, ...: kept)")
    _add_device(p)
    p = _verb(kinds, "model", "parameters (total, trainable, per part) and FLOPs of a config or a run")
    p.add_argument("--config", "-c", help="the config to count")
    p.add_argument("--weights", "-w", help="checkpoint file or run directory (its config)")
    _add_set(p, "config overrides, e.g. model.backbone.depth=50")
    p.add_argument("--json", help="also write the numbers to this json file")
    _add_device(p)
    p = _verb(kinds, "loss-cdf", "cumulative focal loss of positives and negatives at several gammas "
                                 "(the paper's Figure 4)")
    p.add_argument("--weights", "-w", required=True, help="checkpoint file or run directory")
    p.add_argument("--config", "-c", help="config instead of the checkpoint's")
    p.add_argument("--gammas", default="0,0.5,1,2", help="comma-separated gammas (default: 0,0.5,1,2)")
    p.add_argument("--num-images", type=_positive_int, default=100, help="val images to sample (default: 100)")
    p.add_argument("--out", "-o", help="output directory (default: <run dir>/analysis)")
    _add_device(p)
    p = _verb(kinds, "imbalance", "anchors, positives, negative pairs and the negatives' share of the CE "
                                  "per image, of a config or a trained run")
    p.add_argument("--config", "-c", help="the config to count (with --weights: instead of the run's)")
    p.add_argument("--weights", "-w", help="checkpoint file or run directory: adds the trained CE shares")
    _add_set(p, "config overrides, e.g. data.root=/data/coco")
    p.add_argument("--num-images", type=_positive_int, default=100, help="val images to sample (default: 100)")
    p.add_argument("--coco", action="store_true",
                   help="add COCO's initial figures at 800x1333 (R and K counted, positives assumed)")
    p.add_argument("--coco-positives", type=float, default=100.0,
                   help="positive anchors assumed per COCO image (default: 100; 10x is shown too)")
    p.add_argument("--grid", "-g", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                   help="with --config: one row per combination, as retina ablate --grid, e.g. "
                        "data.shapes.extra_classes=0,77")
    _add_device(p)


def _add_folder_args(p: argparse.ArgumentParser) -> None:
    """The options of ``data check --root`` and ``data convert``: how a VOC / YOLO folder is read."""
    p.add_argument("--root", help="a VOC or YOLO folder (or a YOLO data.yaml)")
    p.add_argument("--format", "--from", dest="format", choices=["auto", "voc", "yolo"], default="auto",
                   help="the layout of --root (default: detected)")
    p.add_argument("--splits", default="train,val", help="comma-separated split names (default: train,val)")
    p.add_argument("--classes", default="", help="VOC: comma-separated class names in label order "
                                                 "(default: every object name, sorted)")
    p.add_argument("--keep-difficult", action="store_true",
                   help="VOC: difficult objects as boxes, not ignore regions")


def _add_data(sub: Any) -> None:
    jobs = _verb(sub, "data", "check a dataset, convert a VOC / YOLO folder to COCO json, show samples as "
                              "the model gets them, or generate the bundled synthetic sets (shapes, or the "
                              "Table 1 benchmark: dense)").add_subparsers(dest="what", required=True)
    p = _verb(jobs, "check", "every problem of a dataset, counted and named: a COCO json and its images "
                             "(--ann, --images) or a VOC / YOLO folder (--root)")
    p.add_argument("--ann", help="COCO annotation json")
    p.add_argument("--images", help="image directory of --ann")
    _add_folder_args(p)
    p = _verb(jobs, "convert", "write a VOC or YOLO folder's splits as COCO json (instances_<split>.json)")
    _add_folder_args(p)
    p.add_argument("--to", choices=["coco"], default="coco", help="the output format")
    p.add_argument("--out", "-o", help="where instances_<split>.json go")
    p = _verb(jobs, "show", "draw training (augmented) or val samples as the model gets them")
    p.add_argument("--config", "-c", help=f"the config whose data and augmentation to draw (default: "
                                          f"{DEFAULT_CONFIG})")
    _add_set(p, "config overrides, e.g. data.root=../photos data.augment.crop_prob=0.5")
    p.add_argument("--num", "-n", type=int, default=16, help="samples to draw (default: 16)")
    p.add_argument("--split", choices=["train", "val"], default="train",
                   help="train (augmented, in training order) or val (as read)")
    p.add_argument("--out", "-o", help="where the PNGs go (default: runs/show/<config name>)")
    p = _verb(jobs, "shapes", "generate the bundled synthetic shapes set, as training on the config would")
    p.add_argument("--config", "-c", help=f"the config whose data.shapes and data.root to generate (default: "
                                          f"{DEFAULT_CONFIG})")
    _add_set(p, "config overrides, e.g. data.shapes.num_train=500")
    p.add_argument("--out", "-o", help="dataset directory (default: the config's data.root)")
    for flag, key, what in (("--train", "num_train", "training images"), ("--val", "num_val", "val images"),
                            ("--size", "image_size", "image side in pixels"), ("--seed", "seed", "seed")):
        p.add_argument(flag, dest=key, type=int, metavar="N",
                       help=f"{what} (default: the config's data.shapes.{key}, else {getattr(ShapesConfig, key)})")
    p = _verb(jobs, "dense", "generate the Table 1 benchmark set (many classes of COCO-sized objects)")
    p.add_argument("--config", "-c", help="the config whose data.dense and data.root to generate (default: dense)")
    _add_set(p, "config overrides, e.g. data.dense.num_classes=20")
    p.add_argument("--out", "-o", help="dataset directory (default: the config's data.root)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retina", description="RetinaNet training and evaluation")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_predict, _add_ablate, _add_analyze, _add_convert, _add_export,
                _add_data):
        add(sub)
    return parser


# -------------------------------------------------------------------------------------- main
def share_cores(env: dict) -> None:
    """Let torch's OpenMP threads spin only briefly at a barrier before they sleep
    (``GOMP_SPINCOUNT=1000``, GNU OpenMP's own figure for more threads than cores, against its
    default of 300000), unless ``env`` already chooses how they wait (``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY``). A spinning thread holds a core that another process needs: beside one
    other CPU-bound process a training step took 4-48x its time alone with the default, 2.2x with
    this, at the same speed alone (``python -m benchmarks.contention``, docs/speed.md).
    GNU OpenMP (what torch's Linux wheels load) reads the variable once, when torch loads:
    ``main`` sets it before any verb imports torch, and the processes a verb starts (``ablate
    --jobs``, DataLoader workers) inherit it."""
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = "1000"


def main(argv: Optional[Sequence[str]] = None) -> int:
    share_cores(os.environ)
    args = build_parser().parse_args(argv)
    if os.environ.get("RETINA_DEBUG"):  # full tracebacks for developers
        return _run(args)
    try:
        return _run(args)
    except RetinaError as e:  # meant for the user; any other exception is a bug: its traceback
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"retina: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves a checkpoint and raises
        # Interrupted): while torch is imported, during eval, predict or an analysis
        print("retina: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(args: argparse.Namespace) -> int:
    try:
        with show_notices():  # a config key dropped for the choice an override made: one line each
            return COMMANDS[args.command](args)
    except Exception as e:
        # Interrupted (SIGINT/SIGTERM in training, a checkpoint saved) comes from retina.engine.train:
        # looked up only once a verb has imported it, so that a verb without torch needs none
        train = sys.modules.get("retina.engine.train")
        if train is None or not isinstance(e, train.Interrupted):
            raise
        print(f"retina: {e}", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
