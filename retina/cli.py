"""``retina`` command line: train, eval, predict, ablate, analyze, convert, export, data. Thin: parse
arguments, call the library.

Every error a user can fix (config, missing file, bad checkpoint: a ``retina.errors.RetinaError``)
is printed as one line ``retina: error: ...`` with exit status 2; any other exception is a bug
and keeps its traceback; an interrupted run exits 128 + the signal number after
saving a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from retina.config import find_config, show_notices
from retina.errors import RetinaError, UsageError

DEFAULT_CONFIG = "shapes.yaml"


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    """``--set K=V ...``; repeated ``--set`` flags add up (argparse's default keeps the last)."""
    p.add_argument("--set", "-s", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help)


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
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")


def _add_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", "-w", required=True,
                   help="checkpoint file or run directory, or a file of retina export (.onnx, .pt2)")
    p.add_argument("--config", "-c", help="config to use instead of the one the checkpoint holds")
    _add_set(p, "config overrides, e.g. data.root=/data/coco model.inference.score_thresh=0.1")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")


def _load(args: argparse.Namespace):
    """(model, cfg, class_names, cat_ids, device) from --weights, with --config / --set applied."""
    from retina.config import load_config
    from retina.deploy.runtime import load_detector
    from retina.engine.dist import resolve_device

    device = resolve_device(args.device)
    cfg = load_config(find_config(args.config), args.set) if args.config else None
    return (*load_detector(args.weights, device, tuple(args.set), cfg), device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retina", description="RetinaNet training and evaluation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a detector (default: the bundled shapes set)")
    _add_config_args(p)
    p.add_argument("--out", "-o", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--init", metavar="CKPT", help="start from a retina checkpoint's weights (model.init; a run "
                                                  "directory: its newest checkpoint): every tensor that "
                                                  "fits; ignored on --resume")

    p = sub.add_parser("eval", help="COCO evaluation of a checkpoint on the val split")
    _add_weights_args(p)
    p.add_argument("--out", "-o", help="where detections.json and metrics.json go (default: <run dir>/eval, "
                                       "or eval2, 3, ... when it holds an earlier evaluation: kept)")

    p = sub.add_parser("predict", help="detect objects in image files; write drawn images + JSON")
    _add_weights_args(p)
    p.add_argument("--input", "-i", required=True, nargs="+", metavar="PATH",
                   help="image files, directories (their .jpg/.jpeg/.png/.bmp) and quoted globs, "
                        "e.g. a.jpg photos/ 'shots/**/*.png'")
    p.add_argument("--out", "-o", help="output directory (default: predictions, or predictions2, 3, ... "
                                       "when it already holds files: an earlier prediction is kept)")
    p.add_argument("--score-thresh", type=float, default=0.3,
                   help="detections scoring lower are neither drawn nor written (default: 0.3; "
                        "the model itself keeps those above model.inference.score_thresh)")

    p = sub.add_parser("ablate", help="train + evaluate a grid of configs; tables and plots")
    p.add_argument("--config", "-c", help="base config (a path or a bundled config's name)")
    p.add_argument("--grid", "-g", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept key; several --grid multiply (default: the config's ablate.grids)")
    _add_set(p, "overrides shared by every run")
    p.add_argument("--out", "-o", help="sweep directory (default: runs/ablate/<config name>)")
    p.add_argument("--jobs", "-j", type=int, default=1, help="runs at once")
    p.add_argument("--device", default="auto")
    p.add_argument("--report", metavar="DIR", help="only rebuild table.md/.csv and ablation.png")
    p.add_argument("--metrics", default="metrics.json", metavar="FILE",
                   help="with --report: each run's metrics file to report, e.g. eval_thr0/metrics.json "
                        "after `retina eval --weights RUN --out RUN/eval_thr0 ...` (written as "
                        "table.eval_thr0.md etc.; default: metrics.json, the training's own)")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="run every combination with train.seed=0..N-1 (runs named ...,seed=S); the "
                        "report shows mean +- std (default: the config's ablate.seeds, else one run)")

    p = sub.add_parser("analyze", help="analyses: loss-cdf (paper Fig. 4), errors (PR curves, "
                                       "confusion, TIDE), model (parameters, FLOPs), imbalance "
                                       "(anchors, positives, negative pairs, CE shares)")
    p.add_argument("kind", choices=["loss-cdf", "errors", "model", "imbalance"])
    p.add_argument("--weights", "-w", help="checkpoint file or run directory (loss-cdf: required)")
    p.add_argument("--config", "-c", help="config instead of the checkpoint's (model: the config to count)")
    _add_set(p, "errors, model, imbalance: config overrides, e.g. data.root=/data/coco")
    p.add_argument("--gammas", default="0,0.5,1,2", help="loss-cdf: comma-separated gammas")
    p.add_argument("--num-images", type=_positive_int, default=100, help="loss-cdf, imbalance: val images to sample")
    p.add_argument("--coco", action="store_true",
                   help="imbalance: add COCO's initial figures at 800x1333 (R and K counted, positives assumed)")
    p.add_argument("--coco-positives", type=float, default=100.0,
                   help="imbalance: positive anchors assumed per COCO image (default: 100; 10x is shown too)")
    p.add_argument("--detections", help="errors: a COCO results json instead of --weights")
    p.add_argument("--ann", help="errors: the COCO ground truth of --detections")
    p.add_argument("--score-thresh", type=float,
                   help="errors: confusion-matrix threshold (default: the F1-best, else 0.3)")
    p.add_argument("--json", help="model: also write the numbers to this json file")
    p.add_argument("--out", "-o", help="output directory (default: <run dir>/analysis, "
                                       "errors: <run dir>/analysis/errors or <detections dir>/errors)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("convert", help="convert another framework's weights into a retina checkpoint")
    p.add_argument("source", choices=["torchvision"])
    p.add_argument("--in", dest="in_path", required=True, help="torchvision RetinaNet state dict (.pth)")
    p.add_argument("--out", "-o", required=True, help="retina checkpoint to write")
    p.add_argument("--variant", choices=["v1", "v2"], default="v1",
                   help="v1: retinanet_resnet50_fpn; v2: retinanet_resnet50_fpn_v2")
    _add_set(p, "config overrides stored in the checkpoint, e.g. data.root=/data/coco")

    p = sub.add_parser("export", help="the whole detector as one ONNX / torch.export file; parity "
                                      "with PyTorch checked on a few images")
    p.add_argument("--weights", "-w", required=True, help="checkpoint file or run directory")
    p.add_argument("--format", "-f", choices=["onnx", "torchscript"], default="onnx",
                   help="onnx (onnxruntime) or torchscript (a torch.export program, .pt2)")
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

    p = sub.add_parser("data", help="generate the bundled synthetic sets (shapes, or the Table 1 "
                                    "benchmark: dense), check a dataset, convert a VOC / YOLO "
                                    "folder to COCO json, or show samples as the model gets them")
    p.add_argument("what", choices=["shapes", "dense", "check", "convert", "show"])
    p.add_argument("--config", "-c",
                   help=f"show: the config whose data and augmentation to draw (default: {DEFAULT_CONFIG}); "
                        "dense: the config whose data.dense and data.root to generate (default: dense)")
    _add_set(p, "show, dense: config overrides, e.g. data.root=../photos data.augment.crop_prob=0.5")
    p.add_argument("--num", "-n", type=int, default=16, help="show: samples to draw (default: 16)")
    p.add_argument("--split", choices=["train", "val"], default="train",
                   help="show: train (augmented, in training order) or val (as read)")
    p.add_argument("--ann", help="check: COCO annotation json")
    p.add_argument("--images", help="check: image directory")
    p.add_argument("--root", help="check, convert: a VOC or YOLO folder (or a YOLO data.yaml)")
    p.add_argument("--format", "--from", dest="format", choices=["auto", "voc", "yolo"], default="auto",
                   help="check, convert: the layout of --root (default: detected)")
    p.add_argument("--to", choices=["coco"], default="coco", help="convert: the output format")
    p.add_argument("--splits", default="train,val", help="check, convert: comma-separated split names")
    p.add_argument("--classes", default="", help="VOC: comma-separated class names in label order "
                                                 "(default: every object name, sorted)")
    p.add_argument("--keep-difficult", action="store_true",
                   help="VOC: difficult objects as boxes, not ignore regions")
    p.add_argument("--out", "-o", help="shapes: dataset directory (default: data/shapes); dense: "
                                       "dataset directory (default: the config's data.root); "
                                       "convert: where instances_<split>.json go; show: where the "
                                       "PNGs go (default: runs/show/<config name>)")
    p.add_argument("--train", type=int, default=2000, help="shapes: number of training images")
    p.add_argument("--val", type=int, default=200, help="shapes: number of validation images")
    p.add_argument("--size", type=int, default=128, help="shapes: image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _train(args: argparse.Namespace) -> int:
    from retina.config import load_config
    from retina.engine.train import Trainer

    config_path = find_config(args.config or DEFAULT_CONFIG)
    out = Path(args.out) if args.out else Path("runs") / config_path.stem
    if args.resume and args.config is None and (out / "config.yaml").is_file():
        config_path = out / "config.yaml"  # the run's own (what "continue with: ..." means), --set on top
    # --init is model.init, set as --set is (so the config rules see it: model.backbone.freeze_at
    # applies with it), quoted: a path is not parsed as YAML
    init = [f"model.init={json.dumps(args.init)}"] if args.init else []
    cfg = load_config(config_path, [*args.set, *init])
    Trainer(cfg, out, args.device, args.resume).train()
    return 0


def _eval(args: argparse.Namespace) -> int:
    from retina.data import build_dataset
    from retina.engine.evaluate import check_same_classes, evaluate, format_metrics_table
    from retina.io import unused_dir, weights_dir

    model, cfg, class_names, _, device = _load(args)
    out = Path(args.out) if args.out else unused_dir(weights_dir(args.weights) / "eval")
    dataset = build_dataset(cfg, "val")
    check_same_classes(class_names, dataset, args.weights)
    metrics = evaluate(model, dataset, cfg.eval.batch_size, device, out_dir=out,
                       progress=sys.stderr.isatty(), num_workers=cfg.data.num_workers,
                       backend=cfg.eval.backend)
    print(format_metrics_table(metrics))
    print(f"metrics: {out / 'metrics.json'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from retina.engine.predict import list_images, predict_paths
    from retina.io import unused_dir

    paths = list_images(args.input)  # before loading the model: a wrong path fails at once
    model, _, class_names, cat_ids, device = _load(args)
    out = Path(args.out) if args.out else unused_dir("predictions")
    dets = predict_paths(model, paths, out, class_names, cat_ids, device, args.score_thresh)
    print(f"{len(dets)} detections in {len(paths)} images -> {out / 'detections.json'}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from retina.studies.ablate import ablate_cli

    return ablate_cli(args.config, args.grid, args.set, args.out, args.jobs, args.device, args.report,
                      args.seeds, args.metrics)


def _analyze(args: argparse.Namespace) -> int:
    if args.kind == "errors":
        from retina.studies.errors import errors_cli

        return errors_cli(args.weights, args.detections, args.ann, args.config, args.set, args.out,
                          args.device, args.score_thresh)
    if args.kind == "imbalance":
        from retina.studies.imbalance import imbalance_cli

        return imbalance_cli(args.config, args.weights, args.set, args.num_images, args.coco,
                             args.coco_positives, args.device)
    if args.kind == "model":
        from retina.studies.model_stats import model_cli

        return model_cli(args.config, args.weights, args.set, args.json, args.device)
    from retina.studies.loss_cdf import analyze_cli

    if args.weights is None:
        raise UsageError("retina analyze loss-cdf needs --weights RUN")
    return analyze_cli(args.kind, args.config, args.weights, args.gammas, args.out, args.device,
                       args.num_images)


def _convert(args: argparse.Namespace) -> int:
    from retina.deploy.convert import convert_cli

    print(convert_cli(args.in_path, args.out, args.variant, args.set))
    return 0


def _export(args: argparse.Namespace) -> int:
    from retina.deploy.export import export_cli

    return export_cli(args.weights, args.format, args.out, args.dynamic, args.opset, args.images,
                      args.config, args.set, args.input_dtype, args.num_images, args.box_tol)


def _names(text: str) -> tuple[str, ...]:
    """"train, val" -> ("train", "val")."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _data(args: argparse.Namespace) -> int:
    from retina.data import ensure_shapes

    if args.what == "check":
        from retina.data.check import data_check_cli

        folder = dict(fmt=args.format, splits=_names(args.splits), classes=_names(args.classes),
                      keep_difficult=args.keep_difficult)  # fmt: skip
        if args.root:
            return data_check_cli(root=args.root, **folder)
        if not args.ann or not args.images:
            raise UsageError("retina data check needs --ann A.json and --images DIR, or --root DIR "
                             "(a VOC or YOLO folder)")  # fmt: skip
        return data_check_cli(args.ann, args.images)
    if args.what == "convert":
        from retina.data.convert import data_convert_cli

        if not args.root or not args.out:
            raise UsageError("retina data convert needs --root DIR (a VOC or YOLO folder) and --out DIR")
        return data_convert_cli(args.root, args.format, args.out, _names(args.splits),
                                _names(args.classes), args.keep_difficult)  # fmt: skip
    if args.what == "show":
        from retina.config import load_config
        from retina.data.show import data_show_cli

        config_path = find_config(args.config or DEFAULT_CONFIG)
        out = Path(args.out) if args.out else Path("runs") / "show" / config_path.stem
        return data_show_cli(load_config(config_path, args.set), args.split, args.num, out)

    if args.what == "dense":
        from retina.config import load_config
        from retina.data.dense import ensure_dense

        cfg = load_config(find_config(args.config or "dense"), args.set)
        d = cfg.data.dense
        root = ensure_dense(args.out or cfg.data.root, d.num_train, d.num_val, d.image_size, d.num_classes, d.seed)
        print(f"dense dataset ready in {root}")
        return 0
    root = ensure_shapes(args.out or "data/shapes", args.train, args.val, args.size, args.seed)
    print(f"shapes dataset ready in {root}")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "predict": _predict, "ablate": _ablate,
            "analyze": _analyze, "convert": _convert, "export": _export, "data": _data}


def main(argv: Optional[Sequence[str]] = None) -> int:
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
    from retina.engine.train import Interrupted  # imports torch: seconds in which Ctrl-C may come

    try:
        with show_notices():  # a config key dropped for the choice an override made: one line each
            return COMMANDS[args.command](args)
    except Interrupted as e:
        print(f"retina: {e}", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
