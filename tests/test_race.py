"""The training race (benchmarks/race.py, benchmarks/contestants.py): its clock and curves from
hand-made log rows, the matched configs, and one tiny race end to end on a generated VOC folder,
run as the docs run it (``python -m benchmarks.race`` from the top of the repository)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import contestants
from retina.config import find_config, load_config
from retina.engine.optim import lr_factor

from test_voc_yolo import make_voc

ROOT = Path(__file__).resolve().parents[1]

# Three logged periods: iterations 1-5 (1.0 s each), 6-10 (1.2 s each), 11-20 (0.5 s each), and
# evaluations at iteration 10 and at the end.
ROWS = [
    {"iter": 5, "time/data_per_iter": 0.1, "time/step_per_iter": 0.9},
    {"iter": 10, "time/data_per_iter": 0.2, "time/step_per_iter": 1.0},
    {"iter": 10, "val/AP": 3.0, "val/AP50": 9.0},
    {"iter": 20, "time/data_per_iter": 0.0, "time/step_per_iter": 0.5},
    {"iter": 20, "val/AP": 5.0, "val/AP50": 12.0},  # the final evaluation's row
]


def test_seconds_per_iteration_skips_the_first_periods():
    # after iteration 5: 5 x 1.2 + 10 x 0.5 = 11 s over 15 iterations
    assert contestants.sec_per_iter_from_log(ROWS, skip=5) == pytest.approx(11 / 15)
    assert contestants.sec_per_iter_from_log(ROWS, skip=0) == pytest.approx(16 / 20)
    with pytest.raises(ValueError, match="after iteration 20"):
        contestants.sec_per_iter_from_log(ROWS, skip=20)


def test_curve_counts_training_seconds_only():
    curve = contestants.curve_from_log("r", ROWS, {"AP": 5.0, "AP50": 12.0})
    # 5 x 1.0 + 5 x 1.2 = 11 s at iteration 10; + 10 x 0.5 = 16 s at 20, the end: 0.8 s a step
    assert curve.iters == [10, 20] and curve.max_iter == 20
    assert curve.sec_per_iter == pytest.approx(0.8)
    assert curve.seconds == pytest.approx([11.0, 16.0])
    assert (curve.ap, curve.ap50) == ([3.0, 5.0], [9.0, 12.0])


def test_torchvision_schedule_is_warmup_then_cosine():
    """The torchvision loop's schedule (retina's ``lr_factor``, ending where its budget says)."""
    cfg = load_config(find_config("photos_cpu"), ["solver.warmup_iters=100", "solver.warmup_factor=0.001"])
    assert lr_factor(cfg.solver, 0, 200) == pytest.approx(0.001)
    # warm-up 0.001 * 0.5 + 0.5 = 0.5005; cosine 0.5 (1 + cos(pi / 4)) = 0.853553
    assert lr_factor(cfg.solver, 50, 200) == pytest.approx(0.5005 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cfg.solver, 150, 200) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))


def test_cap_and_evaluation_period_from_the_calibrated_pace():
    spec = contestants.RaceSpec(root="r", recipe="photos_cpu", out=Path("o"), budget_s=900.0, eval_points=6)
    # 900 s at 1.2 s: 750 iterations expected; cap 1500; evaluations every ceil(750 / 6) = 125
    assert contestants.cap_and_period(1.2, spec) == (1500, 125)
    assert contestants.cap_and_period(1000.0, spec) == (12, 1)  # never fewer than eval_points expected


def test_same_config_is_torchvision_architecture_and_solver_at_the_recipe_size():
    recipe = load_config(find_config("photos_cpu"), ["data.root=somewhere"])
    same = load_config(find_config(contestants.TV_SAME), contestants.same_overrides(recipe, num_train=160))
    m = same.model
    assert (m.backbone.depth, m.backbone.norm, m.backbone.weights) == (18, "bn", None)
    assert (m.fpn.channels, m.fpn.min_level, m.fpn.max_level, m.fpn.p6_from) == (256, 3, 7, "p5")
    assert (m.head.num_convs, m.head.norm) == (4, "none")
    assert (same.loss.box_loss, same.loss.normalizer) == ("l1", "image")
    assert m.input.min_size == recipe.model.input.min_size
    assert m.input.max_size == recipe.model.input.max_size
    assert same.solver.batch_size == recipe.solver.batch_size == 8
    # the references: lr 0.01 at 16 images -> 0.005 at 8; warm-up len(loader) - 1 = 160 / 8 - 1
    assert (same.solver.lr, same.solver.warmup_iters, same.solver.warmup_factor) == (0.005, 19, 0.001)
    assert same.solver.schedule == "cosine" and same.data.root == "somewhere"
    assert same.train.amp == recipe.train.amp
    assert same.data.augment == type(same.data.augment)()  # flip only, as torchvision's references
    # the photos' class count replaces the COCO 80 of torchvision's config when the race knows it
    assert not any(o.startswith("model.num_classes=") for o in contestants.same_overrides(recipe, 160))
    with_classes = contestants.same_overrides(recipe, 160, num_classes=3)
    assert load_config(find_config(contestants.TV_SAME), with_classes).model.num_classes == 3


def test_tiny_race_end_to_end(tmp_path):
    root = make_voc(tmp_path / "voc")
    out = tmp_path / "race"
    tiny = ["solver.batch_size=2", "model.input.min_size=[64]", "model.input.max_size=64",
            "solver.warmup_iters=1", "data.num_workers=0", "eval.batch_size=2", "train.amp=off"]
    cmd = [sys.executable, "-m", "benchmarks.race", "--root", str(root), "--budget-min", "0.05",
           "--calib-iters", "3", "--eval-points", "2", "--out", str(out), "--set", *tiny]
    subprocess.run(cmd, check=True, cwd=ROOT)
    table = (out / "race.md").read_text()
    for name in contestants.CONTESTANTS:
        assert f"| {name} |" in table
        curve = json.loads((out / f"{name}.json").read_text())
        # 3 s of training: evaluations every calibrated half of the expected run, and at the end.
        # The cap is twice the expected iterations (a run faster than its calibration goes on to
        # it), so at most 2 x 2 periodic evaluations and the end's, in increasing order
        assert curve["iters"][-1] == curve["max_iter"] >= 1 and curve["seconds"][-1] > 0
        assert 1 <= len(curve["ap"]) <= 2 * 2 + 1 and all(0 <= ap <= 100 for ap in curve["ap"])
        assert curve["iters"] == sorted(set(curve["iters"]))
    assert (out / "race.png").stat().st_size > 0
