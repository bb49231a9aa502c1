"""What each ``retina`` verb runs: the arguments ``retina.cli`` parsed, handed to the library.

Each verb imports the library it needs when it runs, and reads and checks its config before it
imports torch (seconds): a config error is reported at once. ``COMMANDS`` maps each verb to its
function, ``ANALYSES`` and ``DATA_JOBS`` the subcommands of ``analyze`` and ``data``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from retina.config import find_config
from retina.errors import UsageError

DEFAULT_CONFIG = "shapes.yaml"
PREDICT_OUT = Path("runs") / "predict"  # then runs/predict2, 3, ... (ultralytics' runs/detect/predict*)


def load_weights(args: argparse.Namespace):
    """(model, cfg, class_names, cat_ids, device) from --weights, with --config / --set applied."""
    from retina.config import load_config

    cfg = load_config(find_config(args.config), args.set) if args.config else None  # before torch loads

    from retina.deploy.runtime import load_detector
    from retina.engine.dist import resolve_device

    device = resolve_device(args.device)
    return (*load_detector(args.weights, device, tuple(args.set), cfg), device)


def run_train(args: argparse.Namespace) -> int:
    from retina.config import load_config

    config_path = find_config(args.config or DEFAULT_CONFIG)
    out = Path(args.out) if args.out else Path("runs") / config_path.stem
    if args.resume and args.config is None and (out / "config.yaml").is_file():
        config_path = out / "config.yaml"  # the run's own (what "continue with: ..." means), --set on top
    # --init is model.init, set as --set is (so the config rules see it: model.backbone.freeze_at
    # applies with it), quoted: a path is not parsed as YAML
    init = [f"model.init={json.dumps(args.init)}"] if args.init else []
    cfg = load_config(config_path, [*args.set, *init])
    from retina.engine.train import Trainer  # torch: after the config is known to be good

    Trainer(cfg, out, args.device, args.resume).train()
    return 0


def run_eval(args: argparse.Namespace) -> int:
    model, cfg, class_names, _, device = load_weights(args)
    from retina.data import build_dataset
    from retina.engine.evaluate import check_same_classes, evaluate, format_metrics_table
    from retina.io import unused_dir, weights_dir

    out = Path(args.out) if args.out else unused_dir(weights_dir(args.weights) / "eval")
    dataset = build_dataset(cfg, "val")
    check_same_classes(class_names, dataset, args.weights)
    scored = scored_weights(args.weights)
    iteration = "" if scored["iteration"] is None else f" (iteration {scored['iteration']})"
    print(f"evaluating {scored['path']}{iteration}")
    metrics = evaluate(model, dataset, cfg.eval.batch_size, device, out_dir=out,
                       progress=sys.stderr.isatty(), num_workers=cfg.data.num_workers,
                       backend=cfg.eval.backend, checkpoint=scored)
    print(format_metrics_table(metrics))
    print(f"metrics: {out / 'metrics.json'}")
    return 0


def scored_weights(weights: str) -> dict:
    """``{"path", "iteration"}`` of what ``--weights`` names: the checkpoint file (a run directory's
    newest, the one loaded) and the training iteration it records, or an exported file (None: the
    file keeps no iteration)."""
    from retina.deploy.runtime import is_exported
    from retina.engine.checkpoint import checkpoint_file, load_checkpoint

    if is_exported(weights):
        return {"path": str(weights), "iteration": None}
    path = checkpoint_file(weights)
    iteration = load_checkpoint(path).get("iteration")
    return {"path": str(path), "iteration": None if iteration is None else int(iteration)}


def run_predict(args: argparse.Namespace) -> int:
    from retina.engine.predict import list_images, predict_paths
    from retina.io import unused_dir

    paths = list_images(args.input)  # before loading the model: a wrong path fails at once
    model, _, class_names, cat_ids, device = load_weights(args)
    out = Path(args.out) if args.out else unused_dir(PREDICT_OUT)
    dets = predict_paths(model, paths, out, class_names, cat_ids, device, args.score_thresh)
    print(f"{len(dets)} detections in {len(paths)} images -> {out / 'detections.json'}")
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from retina.studies.ablate import ablate_cli

    return ablate_cli(args.config, args.grid, args.set, args.out, args.jobs, args.device, args.report,
                      args.seeds, args.metrics)


def run_convert(args: argparse.Namespace) -> int:
    from retina.deploy.convert import convert_cli

    print(convert_cli(args.in_path, args.out, args.variant, args.set))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from retina.deploy.export import export_cli

    return export_cli(args.weights, args.format, args.out, args.dynamic, args.opset, args.images,
                      args.config, args.set, args.input_dtype, args.num_images, args.box_tol)


# ------------------------------------------------------------------------------ analyze KIND
def _analyze_errors(args: argparse.Namespace) -> int:
    from retina.studies.errors import errors_cli

    return errors_cli(args.weights, args.detections, args.ann, args.config, args.set, args.out, args.device,
                      args.score_thresh)


def _analyze_model(args: argparse.Namespace) -> int:
    from retina.studies.model_stats import model_cli

    return model_cli(args.config, args.weights, args.set, args.json, args.device)


def _analyze_loss_cdf(args: argparse.Namespace) -> int:
    from retina.studies.loss_cdf import analyze_cli

    return analyze_cli("loss-cdf", args.config, args.weights, args.gammas, args.out, args.device, args.num_images)


def _analyze_imbalance(args: argparse.Namespace) -> int:
    from retina.studies.imbalance import imbalance_cli

    return imbalance_cli(args.config, args.weights, args.set, args.num_images, args.coco, args.coco_positives,
                         args.device, args.grid)


ANALYSES = {"errors": _analyze_errors, "model": _analyze_model, "loss-cdf": _analyze_loss_cdf,
            "imbalance": _analyze_imbalance}


def run_analyze(args: argparse.Namespace) -> int:
    return ANALYSES[args.kind](args)


# --------------------------------------------------------------------------------- data WHAT
def _names(text: str) -> tuple[str, ...]:
    """"train, val" -> ("train", "val")."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _data_check(args: argparse.Namespace) -> int:
    from retina.data.check import data_check_cli

    if args.root:
        return data_check_cli(root=args.root, fmt=args.format, splits=_names(args.splits),
                              classes=_names(args.classes), keep_difficult=args.keep_difficult)
    if not args.ann or not args.images:
        raise UsageError("retina data check needs --ann A.json and --images DIR, or --root DIR "
                         "(a VOC or YOLO folder)")  # fmt: skip
    return data_check_cli(args.ann, args.images)


def _data_convert(args: argparse.Namespace) -> int:
    if not args.root or not args.out:
        raise UsageError("retina data convert needs --root DIR (a VOC or YOLO folder) and --out DIR")
    from retina.data.convert import data_convert_cli

    return data_convert_cli(args.root, args.format, args.out, _names(args.splits), _names(args.classes),
                            args.keep_difficult)


def _data_show(args: argparse.Namespace) -> int:
    from retina.config import load_config

    config_path = find_config(args.config or DEFAULT_CONFIG)
    cfg = load_config(config_path, args.set)
    from retina.data.show import data_show_cli

    out = Path(args.out) if args.out else Path("runs") / "show" / config_path.stem
    return data_show_cli(cfg, args.split, args.num, out)


def _data_shapes(args: argparse.Namespace) -> int:
    """The flags are shorthands of ``--set data.shapes.<key>=N``: one value per setting, checked as the
    config's, so the set written is the one training on the config reads."""
    from retina.config import load_config

    flags = [f"data.shapes.{k}={getattr(args, k)}" for k in ("num_train", "num_val", "image_size", "seed")
             if getattr(args, k) is not None]
    cfg = load_config(find_config(args.config or DEFAULT_CONFIG), [*args.set, *flags])
    from retina.data import ensure_shapes

    s = cfg.data.shapes
    root = ensure_shapes(args.out or cfg.data.root, s.num_train, s.num_val, s.image_size, s.seed)
    print(f"shapes dataset ready in {root}")
    return 0


def _data_dense(args: argparse.Namespace) -> int:
    from retina.config import load_config

    cfg = load_config(find_config(args.config or "dense"), args.set)
    from retina.data.dense import ensure_dense

    d = cfg.data.dense
    root = ensure_dense(args.out or cfg.data.root, d.num_train, d.num_val, d.image_size, d.num_classes, d.seed)
    print(f"dense dataset ready in {root}")
    return 0


DATA_JOBS = {"check": _data_check, "convert": _data_convert, "show": _data_show, "shapes": _data_shapes,
             "dense": _data_dense}


def run_data(args: argparse.Namespace) -> int:
    return DATA_JOBS[args.what](args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": run_train, "eval": run_eval, "predict": run_predict, "ablate": run_ablate, "analyze": run_analyze,
    "convert": run_convert, "export": run_export, "data": run_data}
