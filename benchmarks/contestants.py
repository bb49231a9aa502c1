"""The contestants of the training race (``race.py``): ``retina train`` against torchvision's own
RetinaNet, each trained for a budget of wall-clock time and evaluated along the way.

Contestants (``CONTESTANTS``):

- ``torchvision``: ``torchvision.models.detection.RetinaNet`` (ResNet trunk with trainable
  BatchNorm, FPN 256 on P3-P7 with P6 from P5, 4-conv heads; ``benchmarks.detector.torchvision_retinanet``),
  its own loss and ``GeneralizedRCNNTransform`` (resize, normalise, pad), trained by a loop in the
  style of torchvision's detection references (``train_one_epoch``: SGD with momentum and weight
  decay, linear warm-up, then a cosine schedule, as ``--lr-scheduler cosineannealinglr`` does).
  Images are decoded by retina's reader (the same files, the same decoder) and flipped; the model
  resizes them. The recipe's ``train.amp`` (``auto`` resolved as the trainer resolves it) is
  applied as ``torch.autocast`` around forward and loss.
- ``retina-same``: ``retina train`` with ``retina.deploy.convert.torchvision_config('v1')``: the same
  architecture, preprocessing and loss (focal + L1, each image normalised by its positives),
  the same solver (the references', ``same_overrides``), image size, batch and precision. Only
  the system differs.
- ``retina-recipe``: ``retina train`` with retina's recommended config for photos.

Each trains for the budget of training time (data + step; evaluations, checkpoints and start-up
excluded, for all contestants alike), its schedule's length re-estimated from its pace as it runs
so that the cosine ends on time (``retina.engine.budget``: ``solver.max_minutes`` for retina, the
same ``TimeBudget`` in the torchvision loop). A short calibration first (``calib_iters``
iterations, the last two thirds timed) spaces the ``eval_points`` evaluations of the learning curve
(COCO AP on the val split) along the run (``cap_and_period``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from benchmarks.detector import torchvision_retinanet
from retina.config import Config, SolverConfig, find_config, load_config
from retina.data import build_dataset, dataset_source
from retina.data.coco import CocoDetection, collate
from retina.data.transforms import hflip
from retina.engine.budget import TimeBudget
from retina.engine.evaluate import evaluate_detections, inference, to_coco_results
from retina.engine.optim import lr_factor
from retina.engine.precision import autocast_dtype

CONTESTANTS = ("torchvision", "retina-same", "retina-recipe")
TV_SAME = "torchvision_retinanet_r50_fpn"  # bundled: convert.torchvision_config('v1')'s model


@dataclass
class RaceSpec:
    root: str  # the photo folder (VOC, YOLO or COCO; data.format auto)
    recipe: str  # retina's config for photos (a bundled name or a path)
    out: Path
    budget_s: float = 900.0  # training seconds per contestant
    calib_iters: int = 30
    eval_points: int = 6  # evaluations along the run (the last one at the end)
    seed: int = 0
    contestants: Sequence[str] = CONTESTANTS
    overrides: Sequence[str] = ()  # --set for every contestant's config (e.g. data.num_workers=1)


@dataclass
class Curve:
    """AP (0.5:0.95) and AP50 in percent after ``seconds`` of training, at ``iters``."""

    name: str
    sec_per_iter: float = math.nan  # measured over the run
    max_iter: int = 0  # the iterations the budget held
    iters: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    ap: list[float] = field(default_factory=list)
    ap50: list[float] = field(default_factory=list)

    def add(self, it: int, seconds: float, metrics: dict) -> None:
        self.iters.append(it)
        self.seconds.append(seconds)
        self.ap.append(float(metrics["AP"]))
        self.ap50.append(float(metrics["AP50"]))


# ----------------------------------------------------------------------------- configs
def recipe_config(spec: RaceSpec) -> Config:
    return load_config(find_config(spec.recipe), [f"data.root={spec.root}", f"train.seed={spec.seed}",
                                     *spec.overrides])


def same_overrides(recipe: Config, num_train: int, depth: Optional[int] = None,
                   num_classes: Optional[int] = None) -> list[str]:
    """``--set`` keys for (a): torchvision's v1 architecture, loss and preprocessing with the solver
    of torchvision's detection references, at the recipe's image size, batch, precision and data
    (with ``num_classes``: the photos' class count).

    References' solver (``references/detection/train.py``): SGD, momentum 0.9, weight decay 1e-4,
    lr 0.01 at 16 images scaled linearly to the batch, warm-up from 1/1000 over
    ``min(1000, len(data_loader) - 1)`` iterations, flip only; their cosine option
    (``--lr-scheduler cosineannealinglr``). The cosine schedule reads no steps: they go back to the
    schema's default, which the rules accept."""
    inp, batch = recipe.model.input, recipe.solver.batch_size
    return [
        f"model.backbone.depth={depth or recipe.model.backbone.depth}", "model.backbone.norm=bn",
        "model.backbone.norm_eps=1e-5", "model.backbone.weights=null",
        f"model.input.min_size=[{','.join(map(str, inp.min_size))}]", f"model.input.max_size={inp.max_size}",
        f"model.inference.detections_per_image={recipe.model.inference.detections_per_image}",
        f"data.root={recipe.data.root}", f"data.num_workers={recipe.data.num_workers}",
        f"data.hflip_prob={recipe.data.hflip_prob}", "data.aspect_grouping=false",
        "solver.optimizer=sgd", f"solver.lr={0.01 * batch / 16:g}", "solver.momentum=0.9",
        "solver.weight_decay=0.0001", f"solver.batch_size={batch}",
        "solver.schedule=cosine", f"solver.steps=[{','.join(map(str, SolverConfig().steps))}]",
        f"solver.warmup_iters={max(min(1000, num_train // batch - 1), 1)}", "solver.warmup_factor=0.001",
        f"train.seed={recipe.train.seed}", f"eval.batch_size={recipe.eval.batch_size}",
        f"train.amp={recipe.train.amp}",
        # the photos' class count (torchvision's config says COCO's 80)
        *([f"model.num_classes={num_classes}"] if num_classes is not None else []),
    ]


# ---------------------------------------------------------------------- retina contestants
def sec_per_iter_from_log(rows: list[dict], skip: int) -> float:
    """Mean data + step seconds per iteration over the logged periods after iteration ``skip``."""
    total, count, prev = 0.0, 0, 0
    for row in rows:
        if "time/step_per_iter" not in row:
            continue
        n = row["iter"] - prev
        if prev >= skip:
            total += (row["time/data_per_iter"] + row["time/step_per_iter"]) * n
            count += n
        prev = row["iter"]
    if count == 0:
        raise ValueError(f"no logged iterations after iteration {skip}")
    return total / count


def curve_from_log(name: str, rows: list[dict], final: Optional[dict]) -> Curve:
    """Training seconds (data + step, summed over the logged periods) at each ``val/AP`` row, and
    the final metrics at the last logged iteration (where the run ended)."""
    at: dict[int, float] = {0: 0.0}
    elapsed, prev = 0.0, 0
    for row in rows:
        if "time/step_per_iter" in row:
            elapsed += (row["time/data_per_iter"] + row["time/step_per_iter"]) * (row["iter"] - prev)
            prev = row["iter"]
            at[prev] = elapsed
    curve = Curve(name, sec_per_iter=elapsed / max(prev, 1), max_iter=prev)
    for row in rows:
        if "val/AP" in row and (final is None or row["iter"] < prev):  # the final one: below
            curve.add(row["iter"], at[row["iter"]], {"AP": row["val/AP"], "AP50": row["val/AP50"]})
    if final is not None:
        curve.add(prev, at[prev], final)
    return curve


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _retina_train(config: str, overrides: Sequence[str], out: Path) -> None:
    cmd = [sys.executable, "-m", "retina.cli", "train", "--config", config, "--out", str(out),
           "--set", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_retina(name: str, config: str, overrides: Sequence[str], spec: RaceSpec) -> Curve:
    out = spec.out / name
    calib = [*overrides, f"solver.max_iter={spec.calib_iters}", "train.log_period=1",
             "train.eval_at_end=false", "train.checkpoint_period=1000000"]
    _retina_train(config, calib, out / "calib")
    s_it = sec_per_iter_from_log(_read_rows(out / "calib" / "metrics.jsonl"), spec.calib_iters // 3)
    cap, period = cap_and_period(s_it, spec)
    log_period = math.gcd(period, 10)
    _retina_train(config, [*overrides, f"solver.max_minutes={spec.budget_s / 60:g}", f"solver.max_iter={cap}",
                           f"train.eval_period={period}", f"train.log_period={log_period}",
                           "train.checkpoint_period=1000000", "train.tb_images=0"], out / "run")
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    return curve_from_log(name, _read_rows(out / "run" / "metrics.jsonl"), metrics)


def cap_and_period(sec_per_iter: float, spec: RaceSpec) -> tuple[int, int]:
    """From the calibrated pace: a cap of twice the iterations the budget should hold (the budget
    ends the run), and the evaluation period that spreads ``eval_points`` over it."""
    expected = max(int(spec.budget_s / sec_per_iter), spec.eval_points)
    return 2 * expected, -(-expected // spec.eval_points)  # evaluations at period, 2 period, ...


# ---------------------------------------------------------------- torchvision contestant
def _tv_train_transform(prob: float):
    def transform(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if torch.rand(()) < prob:
            image, target = hflip(image, target)
        keep = ~target["iscrowd"]  # torchvision's RetinaNet has no ignore regions
        return image, {"boxes": target["boxes"][keep], "labels": target["labels"][keep]}
    return transform


class TorchvisionRun:
    """torchvision's RetinaNet with the recipe's depth, size, batch and solver."""

    def __init__(self, cfg: Config, seed: int) -> None:
        self.cfg = cfg
        ann, image_dir, _ = dataset_source(cfg, "train")
        self.train_set = CocoDetection(ann, image_dir, _tv_train_transform(cfg.data.hflip_prob))
        self.val_set = build_dataset(cfg, "val")
        inp = cfg.model.input
        torch.manual_seed(seed)
        self.model = torchvision_retinanet(cfg.model.backbone.depth, self.train_set.num_classes,
                                           min(inp.min_size), inp.max_size,
                                           cfg.model.inference.detections_per_image)
        self.model.transform.min_size = tuple(inp.min_size)  # one drawn per image, as retina
        s = cfg.solver
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        # the recipe's precision, resolved once as retina's trainer resolves it
        self.amp_dtype, self.amp_line = autocast_dtype(cfg.train.amp, torch.device("cpu"))

    def _autocast(self):
        return torch.autocast("cpu", dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _batches(self):
        loader = DataLoader(self.train_set, batch_size=self.cfg.solver.batch_size, drop_last=True,
                            sampler=RandomSampler(self.train_set, generator=self.generator),
                            num_workers=self.cfg.data.num_workers, collate_fn=collate)
        while True:
            yield from loader

    def train(self, budget: TimeBudget, on_eval=None, eval_every: int = 0) -> int:
        """Steps until ``budget``'s horizon (its seconds, or its ``max_iter`` without a limit), the
        cosine ending there as it moves (retina's trainer does the same); returns the step count.
        ``on_eval(iteration, training seconds)`` every ``eval_every`` steps before the end."""
        self.model.train()
        batches, it, end = self._batches(), 0, budget.horizon(0)
        while it < end:
            t0 = time.perf_counter()
            images, targets = next(batches)
            images = [img.float().div_(255) for img in images]
            for g in self.optimizer.param_groups:
                g["lr"] = self.cfg.solver.lr * lr_factor(self.cfg.solver, it, end)  # warm-up, cosine to the end
            with self._autocast():
                losses = self.model(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"torchvision: loss is {loss.item()} at iteration {it}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            budget.add(time.perf_counter() - t0)
            it += 1
            end = budget.horizon(it)
            if on_eval is not None and eval_every and it % eval_every == 0 and it < end:
                on_eval(it, budget.spent)
                self.model.train()
        return it

    def evaluate(self) -> dict:
        outputs, ids = inference(_Float01(self.model, self._autocast), self.val_set,
                                 self.cfg.eval.batch_size, "cpu", progress=False,
                                 num_workers=self.cfg.data.num_workers)
        cat_ids = list(self.val_set.cat_ids)
        results = to_coco_results(outputs, ids, cat_ids)
        return evaluate_detections(self.val_set.coco, results, list(self.val_set.class_names),
                                   cat_ids, ids)


class _Float01(torch.nn.Module):
    """torchvision's model behind retina's inference, which hands over uint8 images."""

    def __init__(self, model: torch.nn.Module, autocast: Callable[[], ContextManager]) -> None:
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, images: list[Tensor]) -> list[dict]:
        with self.autocast():
            return self.model([img.float() / 255 for img in images])


def run_torchvision(cfg: Config, spec: RaceSpec) -> Curve:
    calib = TimeBudget(math.inf, spec.calib_iters, settle=spec.calib_iters // 3)
    TorchvisionRun(cfg, spec.seed).train(calib)
    cap, period = cap_and_period(calib.pace, spec)
    curve = Curve("torchvision")
    run = TorchvisionRun(cfg, spec.seed)

    def on_eval(it: int, seconds: float) -> None:
        metrics = run.evaluate()
        curve.add(it, seconds, metrics)
        print(f"torchvision iter {it} {seconds:.0f} s: AP {metrics['AP']:.1f} AP50 {metrics['AP50']:.1f}",
              flush=True)

    if run.amp_line is not None:  # what train.amp=auto picked, as retina's trainer logs it
        print(f"torchvision: {run.amp_line}", flush=True)
    print(f"torchvision: {calib.pace:.3f} s/it calibrated; {spec.budget_s / 60:g} min of training, "
          f"at most {cap} iterations", flush=True)
    budget = TimeBudget(spec.budget_s, cap)
    curve.max_iter = run.train(budget, on_eval, period)
    curve.sec_per_iter = budget.spent / curve.max_iter
    on_eval(curve.max_iter, budget.spent)
    torch.save(run.model.state_dict(), spec.out / "torchvision" / "model_final.pth")
    return curve
