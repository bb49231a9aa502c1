"""End to end: a tiny RetinaNet trains on a tiny shapes set, its loss falls and its AP beats an
untrained model's; checkpoints resume exactly; a run directory is never overwritten; the class
count comes from the data (or a checkpoint's class names); the first steps print progress."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import signal
from types import SimpleNamespace

import pytest
import torch
import yaml

from retina.cli import main
from retina.config import ConfigError, config_to_dict
from retina.data import build_dataset, generate_shapes
from retina.engine.budget import TimeBudget
from retina.engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from retina.engine.evaluate import evaluate
from retina.engine import train as train_module
from retina.engine.train import Interrupted, Trainer, TrainingError
from retina.model import build_model
from tinyrun import TINY_DATA, tiny_config, with_changes

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ")  # 2025-01-31 14:05:09


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, **TINY_DATA)
    return root


def test_tiny_training_learns(shapes_root, tmp_path, capsys):
    cfg = tiny_config(shapes_root, solver={"max_iter": 400}, train={"keep_checkpoints": 2})
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    assert trainer.cfg.model.num_classes == 3  # taken from the dataset
    # Untrained, every score is near the prior pi = 0.01 < the 0.05 threshold: no detections, AP 0.
    before = evaluate(trainer.model, build_dataset(trainer.cfg, "val"), 16, "cpu", progress=False,
                      num_workers=0)
    metrics = trainer.train()
    assert before["AP50"] == pytest.approx(0.0, abs=1.0)
    # 400 steps (50 epochs of 64 images). Measured AP50 on the 16 val images, one thread: 25.9,
    # 25.5, 20.6 for train.seed 0, 1, 2 (at 250 steps it was 10.8 to 24.5: too noisy for a bar).
    # The bar of 15 leaves room for run-to-run noise (thread count changes float sums) while a
    # model that learned nothing (no score above 0.05, AP50 0) cannot pass it.
    assert metrics["AP50"] > 15.0, metrics
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 40 and losses[-1] < 0.3 * losses[0], losses  # measured: 1.62 -> 0.05
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["AP50"] == pytest.approx(metrics["AP50"])
    # Only the newest periodic checkpoints are kept, plus the final weights.
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pth")) == [
        "model_0000200.pth", "model_0000300.pth", "model_final.pth"]
    model, loaded_cfg, class_names, cat_ids = load_model(tmp_path / "run", "cpu")
    assert class_names == ["square", "circle", "triangle"] and cat_ids == [1, 2, 3]
    assert loaded_cfg == trainer.cfg

    # `retina eval` of the saved weights reproduces the training's final evaluation, with either
    # COCO backend.
    for backend in ("pycocotools", "faster_coco_eval"):
        out = tmp_path / f"eval_{backend}"
        assert main(["eval", "--weights", str(tmp_path / "run"), "--device", "cpu", "--out", str(out),
                     "--set", f"eval.backend={backend}", "data.num_workers=0"]) == 0
        evaluated = json.loads((out / "metrics.json").read_text())
        assert evaluated["AP50"] == pytest.approx(metrics["AP50"], abs=1e-6), backend

    # `retina analyze loss-cdf` (Figure 4) of the trained model. A model that learned ranks its
    # negatives: the hardest ones carry a share of the negatives' loss that grows with gamma, since
    # (1 - p_t)^gamma shrinks easy negatives' losses (p ~ 0.01 and below) far more than hard ones'.
    cdf = tmp_path / "cdf"
    assert main(["analyze", "loss-cdf", "--weights", str(tmp_path / "run"), "--gammas", "0,1,2",
                 "--out", str(cdf), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    shares = [float(line.split(" carry ")[1].split("%")[0]) for line in printed.splitlines()
              if "hardest 1% of negatives" in line]
    assert len(shares) == 3 and shares[0] < shares[1] < shares[2], printed
    assert shares[2] > 50.0, printed  # measured: 20.0 / 70.2 / 93.4 %
    with open(cdf / "loss_cdf.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["gamma"] for r in rows[::1001]] == ["0", "1", "2"] and len(rows) == 3 * 1001
    for g in range(3):  # each curve rises from (0, 0) to (1, 1)
        curve = rows[1001 * g: 1001 * (g + 1)]
        for key in ("cdf_pos", "cdf_neg"):
            values = [float(r[key]) for r in curve]
            assert values[0] == 0.0 and values[-1] == pytest.approx(1.0)
            assert all(a <= b + 1e-12 for a, b in zip(values, values[1:])), (g, key)
    assert (cdf / "loss_cdf.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_is_exact(shapes_root, tmp_path):
    """6 steps straight == 4 steps, checkpoint, a new process state, 2 more steps."""
    cfg = tiny_config(shapes_root, solver={"max_iter": 6, "warmup_iters": 2},
                      train={"checkpoint_period": 4, "log_period": 1, "eval_at_end": False})
    Trainer(cfg, tmp_path / "straight", device="cpu", quiet=True).train()

    first = Trainer(cfg, tmp_path / "resumed", device="cpu", quiet=True)
    step = first._step

    def step_then_stop(*args):  # a SIGTERM during the 4th step: checkpoint after it, then stop
        out = step(*args)
        if first.iteration == 3:
            first.stop_signal = signal.SIGTERM
        return out

    first._step = step_then_stop
    with pytest.raises(Interrupted, match="stopped at iteration 4"):
        first.train()
    assert not (tmp_path / "resumed" / "model_final.pth").exists()
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG
    Trainer(cfg, tmp_path / "resumed", device="cpu", resume=True, quiet=True).train()

    a = load_checkpoint(tmp_path / "straight" / "model_final.pth")
    b = load_checkpoint(tmp_path / "resumed" / "model_final.pth")
    assert a["iteration"] == b["iteration"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


def test_ram_cache_trains_the_same_weights(shapes_root, tmp_path, capsys):
    """data.cache=ram changes where the pixels come from, not which: the same 4 steps give the
    same weights, also through a forked DataLoader worker that reads the parent's cache."""
    cfg = tiny_config(shapes_root, solver={"max_iter": 4, "warmup_iters": 2},
                      train={"checkpoint_period": 4, "log_period": 1, "eval_at_end": False})
    Trainer(cfg, tmp_path / "files", device="cpu", quiet=True).train()
    cached = with_changes(cfg, data={"cache": "ram", "num_workers": 1})
    Trainer(cached, tmp_path / "cached", device="cpu").train()
    assert f"train set: {TINY_DATA['num_train']} images cached in RAM" in capsys.readouterr().out
    a = load_checkpoint(tmp_path / "files" / "model_final.pth")["model"]
    b = load_checkpoint(tmp_path / "cached" / "model_final.pth")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_without_config_uses_the_runs_own(shapes_root, tmp_path, monkeypatch, capsys):
    # "continue with: retina train --resume --out RUN" is what a stopped run prints; without
    # --config it took the default shapes.yaml, whose model did not fit the checkpoint
    cfg = tiny_config(shapes_root, solver={"max_iter": 2, "warmup_iters": 0},
                      train={"checkpoint_period": 100, "eval_at_end": False})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # were the default taken, its data would land here, not in the repo
    assert main(["train", "--config", str(config), "--out", str(run), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--device", "cpu", "--set", "solver.max_iter=4"]) == 0
    out = capsys.readouterr().out
    assert load_checkpoint(run / "model_final.pth")["iteration"] == 4
    assert ("resuming with 1 setting(s) changed from the checkpoint's config: "
            "solver.max_iter: 2 -> 4") in out
    assert not (tmp_path / "data").exists()


def test_refuses_to_overwrite_a_run(shapes_root, tmp_path):
    cfg = tiny_config(shapes_root, solver={"max_iter": 2, "warmup_iters": 0},
                      train={"eval_at_end": False})
    Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).train()
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)


def test_periodic_evaluation_keeps_best_and_logs(shapes_root, tmp_path):
    cfg = tiny_config(shapes_root, solver={"max_iter": 4, "warmup_iters": 0},
                      train={"eval_period": 2, "log_period": 2, "eval_at_end": False, "tb_images": 2})
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val/AP50" in r]
    assert [r["iter"] for r in evals] == [2]  # at 2; the end (4) is not a periodic evaluation
    train_rows = [r for r in records if "loss" in r]
    for key in ("loss_cls", "loss_box", "grad_norm", "lr", "num_pos_per_image", "images_per_sec",
                "time/data_per_iter", "time/step_per_iter"):
        assert key in train_rows[-1], key
    best = load_checkpoint(tmp_path / "run" / "model_best.pth")
    assert best["iteration"] == 2 and best["best_ap"] == pytest.approx(evals[0]["val/AP"], abs=1e-9)
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_time_budget_ends_the_schedule_on_time(shapes_root, tmp_path, monkeypatch):
    """``solver.max_minutes`` on a fake clock that advances 1 s per reading: the loop reads it before
    the batch, after it and after the step, so every iteration costs 2 s. Budget 41 s, settle 10:
    iterations 1-10 (20 s) are not timed and the end stays at the cap (10000); after 11 (22 s,
    pace 2 s) it is 11 + int(19 / 2) = 20, and after 20 (40 s) 20 + int(1 / 2) = 20: the run stops
    there, its cosine at 0. Resuming the finished run trains nothing."""
    readings = itertools.count()
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: float(next(readings))))
    cfg = tiny_config(shapes_root, solver={"max_iter": 10000, "warmup_iters": 2, "max_minutes": 41 / 60},
                      train={"checkpoint_period": 10000, "log_period": 1, "eval_at_end": False})
    Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).train()
    final = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert final["iteration"] == 20
    assert final["time_budget"] == {"spent": 40.0, "pace": 2.0}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = [r["lr"] / cfg.solver.lr for r in rows]
    # the scheduler steps inside the step, before that iteration's estimate: row 11 still reads the
    # cap, row 12 on the end at 20
    assert lr[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 10000)))
    assert lr[14] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 20)))
    assert lr[19] == pytest.approx(0.0, abs=1e-12)
    again = Trainer(cfg, tmp_path / "run", device="cpu", resume=True, quiet=True)
    assert again.max_iter == 20  # the checkpoint's pace: less than one step left
    again.train()
    assert load_checkpoint(tmp_path / "run" / "model_final.pth")["iteration"] == 20


def test_time_budget_is_estimated_every_few_steps_and_at_log_lines(shapes_root, tmp_path, monkeypatch):
    """The clock of the test above (2 s per iteration, budget 41 s, settle 10), logging only at
    the end (log_period 1000): the horizon is estimated at construction (iteration 0), at the
    early progress lines (1, 2, 4, 8, 16), every 10 steps (10, 20) and nowhere else. At 10 no
    step is timed yet (the cap); at 16 the pace is 2 s (11..16) with 41 - 32 = 9 s left: 16 + 4 =
    20; at 20, 1 s is left: 20 + 0. The run ends at 20 as when every step re-estimated."""
    readings = itertools.count()
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: float(next(readings))))
    cfg = tiny_config(shapes_root, solver={"max_iter": 10000, "warmup_iters": 2, "max_minutes": 41 / 60},
                      train={"checkpoint_period": 10000, "log_period": 1000, "eval_at_end": False})
    asked: list[int] = []
    horizon = TimeBudget.horizon

    def counted(budget, iteration):
        asked.append(iteration)
        return horizon(budget, iteration)

    monkeypatch.setattr(TimeBudget, "horizon", counted)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    trainer.train()
    assert asked == [0, 1, 2, 4, 8, 10, 16, 20]
    assert load_checkpoint(tmp_path / "run" / "model_final.pth")["iteration"] == 20
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [20]  # progress lines print, they record no row


def test_first_steps_print_progress_and_generation_is_stamped(tmp_path, capsys):
    """The default log_period (50) on a 3-step run: progress lines with an ETA after steps 1 and
    2, then the final line; the line that generates the data on first use has the same
    timestamp."""
    data = {"num_train": 8, "num_val": 4, "image_size": 64, "seed": 0}
    cfg = tiny_config(tmp_path / "shapes", data={"shapes": data}, solver={"max_iter": 3, "warmup_iters": 0},
                      train={"log_period": 50, "eval_at_end": False})
    Trainer(cfg, tmp_path / "run", device="cpu").train()
    captured = capsys.readouterr()
    generating = [line for line in captured.err.splitlines() if "generating shapes dataset" in line]
    assert len(generating) == 1 and TIMESTAMP.match(generating[0]), captured.err
    progress = [line for line in captured.out.splitlines() if " iter " in line]
    assert [line.split(" iter ")[1].split()[0] for line in progress] == ["1/3", "2/3", "3/3"], progress
    assert all(TIMESTAMP.match(line) and re.search(r" s/it eta \d+:\d\d$", line) for line in progress)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [3]


# ------------------------------------------------------------------------------ class count
def test_null_class_count_resolves_from_the_data_and_is_recorded(shapes_root, tmp_path):
    cfg = tiny_config(shapes_root, solver={"max_iter": 1, "warmup_iters": 0}, train={"eval_at_end": False})
    assert cfg.model.num_classes is None  # the schema default: the train set's count
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    assert trainer.cfg.model.num_classes == 3 and trainer.model.num_classes == 3  # square, circle, triangle
    trainer.train()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["num_classes"] == 3
    assert load_checkpoint(tmp_path / "run" / "model_final.pth")["config"]["model"]["num_classes"] == 3


def test_a_set_class_count_that_disagrees_with_the_data_is_refused(shapes_root, tmp_path):
    cfg = tiny_config(shapes_root, model={"num_classes": 80})
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    message = str(e.value)
    assert "\n" not in message and "model.num_classes=80" in message and "has 3 classes" in message
    assert "instances_train.json" in message  # names the train set
    assert not (tmp_path / "run").exists()  # refused before anything was built or written
    # a set count that agrees trains as null does
    assert Trainer(with_changes(cfg, model={"num_classes": 3}), tmp_path / "run", device="cpu",
                   quiet=True).cfg.model.num_classes == 3


def test_a_checkpoints_class_names_decide_at_load(shapes_root, tmp_path):
    """Two class names in the checkpoint (its config says 2): a config with a null count gets 2;
    one that sets another count is refused naming both."""
    two = tiny_config(shapes_root, model={"num_classes": 2})
    path = save_checkpoint({"model": build_model(two, pretrained=False).state_dict(),
                            "config": config_to_dict(two), "class_names": ["cat", "dog"],
                            "cat_ids": [3, 7]}, tmp_path / "model_final.pth")
    model, cfg, names, cat_ids = load_model(path, cfg=tiny_config(shapes_root))  # null count
    assert cfg.model.num_classes == 2 and model.num_classes == 2 and names == ["cat", "dog"]
    with pytest.raises(ConfigError, match=r"model.num_classes=3 but the checkpoint .*model_final.pth has 2 classes"):
        load_model(path, cfg=tiny_config(shapes_root, model={"num_classes": 3}))
    with pytest.raises(ConfigError, match=r"model.num_classes=5 but the checkpoint"):
        load_model(path, overrides=("model.num_classes=5",))
