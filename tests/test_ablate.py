"""The ablation studio: grid expansion and run names, skip/resume of a sweep, tables from fake
finished runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from retina.studies import ablate
from retina.studies.ablate import expand_grid, grids_from_config, plan_sweep, run_name, run_sweep
from retina.studies.report import build_report, collect_runs
from retina.studies.runs import group_seeds, tied
from retina.config import ConfigError, load_config

SHAPES = str(Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml")


# ------------------------------------------------------------------------------- grid, names
def test_expand_grid_multiplies_first_slowest():
    assert expand_grid(["loss.gamma=0,0.5,1"]) == [["loss.gamma=0"], ["loss.gamma=0.5"], ["loss.gamma=1"]]
    assert expand_grid(["loss.gamma=0,2", "loss.alpha=0.25,null"]) == [
        ["loss.gamma=0", "loss.alpha=0.25"], ["loss.gamma=0", "loss.alpha=null"],
        ["loss.gamma=2", "loss.alpha=0.25"], ["loss.gamma=2", "loss.alpha=null"]]
    assert expand_grid([]) == [[]]  # no grid: one run with the config as it is
    # true and 1 are different YAML values (a bool and an int), not a repeat
    assert expand_grid(["a.b=1,true"]) == [["a.b=1"], ["a.b=true"]]


def test_expand_grid_list_values_and_quotes():
    # Commas inside brackets or quotes do not split: two runs, the first multi-scale.
    combos = expand_grid(["model.input.min_size=[96,128],[128]"])
    assert combos == [["model.input.min_size=[96,128]"], ["model.input.min_size=[128]"]]
    assert [load_config(None, c).model.input.min_size for c in combos] == [(96, 128), (128,)]
    assert expand_grid(["data.root='a,b',c"]) == [["data.root='a,b'"], ["data.root=c"]]


@pytest.mark.parametrize("bad, match", [
    ("loss.gamma", "expected key=v1,v2"), ("loss.gamma=", "expected key=v1,v2"),
    ("loss.gamma=0,,1", "empty value"), ("loss.gamma=[0", "not valid YAML"),
    ("loss.gamma=0,0.0", "value 0.0 is 0 again"), ("model.input.min_size=[96],[ 96 ]", r"is \[96\] again")])
def test_expand_grid_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        expand_grid([bad])
    with pytest.raises(ConfigError, match="given twice"):
        expand_grid(["loss.gamma=0", "loss.gamma=1"])


def test_run_name():
    assert run_name(["loss.gamma=0.5", "loss.alpha=0.25"]) == "gamma=0.5,alpha=0.25"
    assert run_name(["loss.alpha=null"]) == "alpha=null"
    assert run_name(["model.input.min_size=[96,128]"]) == "min_size=96-128"
    # gamma is ambiguous between the two keys: each gets its shortest unique suffix
    assert run_name(["loss.gamma=1", "loss.focal_star.gamma=2"]) == "loss.gamma=1,focal_star.gamma=2"
    assert run_name(["data.root=/tmp/a b"]) == "root=_tmp_ab"
    assert run_name([]) == "default"


def test_ablate_section_is_read_by_ablate_and_ignored_by_training(tmp_path):
    (tmp_path / "base.yaml").write_text("loss: {gamma: 1.5}\n")
    preset = tmp_path / "preset.yaml"
    preset.write_text("base: base.yaml\nsolver: {max_iter: 7}\nablate:\n  grids:\n"
                      "    - {loss.gamma: [0, 2], loss.alpha: [0.25, null]}\n"
                      "    - {loss.type: [ohem], loss.gamma: [0], model.input.min_size: [[96]]}\n")
    cfg = load_config(preset)  # the ablate section is no config key
    assert cfg.solver.max_iter == 7 and cfg.loss.gamma == 1.5
    assert grids_from_config(preset) == [["loss.gamma=0,2", "loss.alpha=0.25,null"],
                                         ["loss.type=ohem", "loss.gamma=0", "model.input.min_size=[96]"]]
    runs = plan_sweep(preset, [], [], tmp_path / "out")  # 2 x 2 + 1 runs
    assert [r.name for r in runs] == ["gamma=0,alpha=0.25", "gamma=0,alpha=null", "gamma=2,alpha=0.25",
                                      "gamma=2,alpha=null", "type=ohem,gamma=0,min_size=96"]
    assert [r.name for r in plan_sweep(preset, ["loss.gamma=5"], [], tmp_path)] == ["gamma=5"]  # --grid wins
    with pytest.raises(ConfigError, match="^--grid loss.gama=0: unknown key 'loss.gama'"):  # before any training
        plan_sweep(preset, ["loss.gama=0,1"], [], tmp_path / "out")
    # a bad value of the config's own grids is named there, not as a --set item
    preset.write_text("base: base.yaml\nablate:\n  grids:\n    - {solver.lr: [0.01, -1]}\n")
    with pytest.raises(ConfigError) as e:
        plan_sweep(preset, [], [], tmp_path / "out")
    assert str(e.value) == f"{preset}: ablate.grids: solver.lr=-1: solver.lr=-1.0 must be > 0"
    with pytest.raises(ConfigError, match=r"^--set solver.max_iter=0: "):  # a --set item stays one
        plan_sweep(preset, [], ["solver.max_iter=0"], tmp_path / "out")


# ------------------------------------------------------------------------------ skip / resume
def test_sweep_skips_finished_and_resumes_interrupted(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    (out / "gamma=0").mkdir(parents=True)
    (out / "gamma=0" / "metrics.json").write_text(json.dumps({"AP": 30.0}))  # finished
    (out / "gamma=1").mkdir()
    (out / "gamma=1" / "model_0000002.pth").write_bytes(b"")  # interrupted after a checkpoint
    calls = []

    def fake_train(run, config_path, sets, device, resume):
        calls.append((run.name, resume, run.overrides, tuple(sets)))
        (run.run_dir / "metrics.json").write_text(json.dumps({"AP": 40.0 + len(calls)}))
        return None

    monkeypatch.setattr(ablate, "_train_in_process", fake_train)
    results = run_sweep(SHAPES, ["loss.gamma=0,1,2"], ["solver.max_iter=3"], out)
    assert calls == [("gamma=1", True, ("loss.gamma=1",), ("solver.max_iter=3",)),
                     ("gamma=2", False, ("loss.gamma=2",), ("solver.max_iter=3",))]
    assert [(r["name"], r["status"]) for r in results] == [
        ("gamma=0", "skipped"), ("gamma=1", "done"), ("gamma=2", "done")]
    record = json.loads((out / "gamma=2" / "ablate_run.json").read_text())
    assert record["overrides"] == ["loss.gamma=2"] and record["status"] == "done" and record["wall_s"] >= 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    assert lines[0] == "[1/3] gamma=0: finished before, skipped"
    assert lines[1].startswith("[2/3] gamma=1: AP 41.0 in 0:00 (sweep ETA")
    assert lines[2].startswith("[3/3] gamma=2: AP 42.0")
    # Everything finished now: a second call trains nothing.
    calls.clear()
    assert [r["status"] for r in run_sweep(SHAPES, ["loss.gamma=0,1,2"], [], out)] == ["skipped"] * 3
    assert calls == []


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def fake_train(run, config_path, sets, device, resume):
        if run.name == "gamma=0":
            return "non-finite loss or gradient at iteration 3"
        (run.run_dir / "metrics.json").write_text(json.dumps({"AP": 12.5}))
        return None

    monkeypatch.setattr(ablate, "_train_in_process", fake_train)
    results = run_sweep(SHAPES, ["loss.gamma=0,2"], [], tmp_path)
    assert [r["status"] for r in results] == ["failed", "done"]
    _, rows = collect_runs(tmp_path)
    assert [(r.name, r.status, r.error, r.ap) for r in rows] == [
        ("gamma=0", "failed", "non-finite loss or gradient at iteration 3", None),
        ("gamma=2", "done", None, 12.5)]


def test_parallel_sweep_starts_train_subprocesses(tmp_path, monkeypatch):
    """--jobs 2: `python -m retina train` children with the threads divided; a failing child's
    last log line becomes the run's error."""
    started = []

    class FakeProc:
        def __init__(self, cmd, stdout, stderr, env):
            out = Path(cmd[cmd.index("--out") + 1])
            started.append((cmd[1:], env["OMP_NUM_THREADS"]))
            self.returncode = 0 if "loss.gamma=2" in cmd else 2
            if self.returncode == 0:
                (out / "metrics.json").write_text(json.dumps({"AP": 50.0}))
            else:
                stdout.write("retina: error: boom\n")

        def poll(self):
            return self.returncode

        def wait(self):
            return self.returncode

    monkeypatch.setattr(ablate.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(ablate.os, "cpu_count", lambda: 4)
    (tmp_path / "gamma=0").mkdir()
    (tmp_path / "gamma=0" / "model_0000002.pth").write_bytes(b"")
    results = run_sweep(SHAPES, ["loss.gamma=0,2"], ["solver.max_iter=3"], tmp_path, jobs=2, device="cpu")
    threads = "2"  # 4 cores / 2 jobs
    assert started == [
        (["-m", "retina", "train", "--config", SHAPES, "--out", str(tmp_path / "gamma=0"), "--device", "cpu",
          "--resume", "--set", "solver.max_iter=3", "loss.gamma=0"], threads),
        (["-m", "retina", "train", "--config", SHAPES, "--out", str(tmp_path / "gamma=2"), "--device", "cpu",
          "--set", "solver.max_iter=3", "loss.gamma=2"], threads)]
    assert [(r["status"], r["error"]) for r in results] == [("failed", "retina: error: boom"), ("done", None)]


def test_one_tiny_real_sweep_run(tiny_shapes_overrides, tmp_path):
    """A real Trainer through run_sweep: 3 iterations of OHEM on the tiny set, then skipped."""
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {backbone: {depth: 18}, fpn: {channels: 16, max_level: 5}, "
                      "anchors: {sizes: [8, 16, 32]}, head: {num_convs: 1, norm: gn}, "
                      "input: {min_size: [64], max_size: 64, size_divisibility: 32}}\n"
                      "data: {num_workers: 0}\nsolver: {batch_size: 4, max_iter: 3, warmup_iters: 1}\n"
                      "loss: {gamma: 0}\n"  # what OHEM's CE reads (FL's 2.0 would be dropped for it)
                      "train: {log_period: 1, tb_images: 0}\neval: {batch_size: 8}\n")
    out, grid = tmp_path / "out", ["loss.type=ohem"]
    results = run_sweep(config, grid, tiny_shapes_overrides, out, device="cpu")
    run_dir = out / "type=ohem"
    assert results[0]["status"] == "done" and (run_dir / "metrics.json").is_file()
    keys, rows = collect_runs(out)
    assert rows[0].values["loss.type"] == "ohem" and math.isfinite(rows[0].loss_cls)
    assert run_sweep(config, grid, tiny_shapes_overrides, out, device="cpu")[0]["status"] == "skipped"


# ---------------------------------------------------------------------------------- the report
def _fake_run(out: Path, overrides: list[str], ap: tuple, losses=(0.5, 0.2), wall=75.0):
    """A finished run as a sweep leaves it, without config.yaml (values: overrides, else defaults)."""
    d = out / run_name(overrides)
    d.mkdir(parents=True)
    (d / "ablate_run.json").write_text(json.dumps({"overrides": overrides, "wall_s": wall, "status": "done"}))
    metrics = dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ap), per_class={})
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "metrics.jsonl").write_text(
        json.dumps({"iter": 50, "loss_cls": 9.0, "loss_box": 9.0}) + "\n"
        + json.dumps({"iter": 100, "loss_cls": losses[0], "loss_box": losses[1]}) + "\n"
        + json.dumps({"iter": 100, "AP": ap[0]}) + "\n")  # an eval record: no loss in it


def test_report_from_fake_finished_runs(tmp_path):
    out = tmp_path / "sweep"
    _fake_run(out, ["loss.gamma=0", "loss.alpha=0.25"], (28.0, 50.0, 27.0, 10.0, 30.0, 40.0))
    _fake_run(out, ["loss.gamma=0", "loss.alpha=0.75"], (31.0, 51.0, 30.0, 11.0, 31.0, 41.0))
    _fake_run(out, ["loss.gamma=2", "loss.alpha=0.25"], (34.0, 52.0, 36.0, 12.0, 33.0, 45.0),
              losses=(0.125, 0.0625), wall=125.0)
    _fake_run(out, ["loss.gamma=2", "loss.alpha=0.75"], (33.0, 53.0, 35.0, 12.0, 33.0, 44.0))
    _fake_run(out, ["loss.type=ohem"], (30.5, 49.0, 31.0, 9.0, 30.0, 40.0))
    paths = build_report(out)

    with open(paths["table.csv"]) as f:
        rows = list(csv.DictReader(f))
    # Sorted by the swept values (gamma, alpha, type); ohem keeps the default gamma 2, alpha 0.25.
    assert [r["run"] for r in rows] == ["gamma=0,alpha=0.25", "gamma=0,alpha=0.75", "gamma=2,alpha=0.25",
                                        "type=ohem", "gamma=2,alpha=0.75"]
    assert list(rows[0])[:5] == ["run", "status", "loss.gamma", "loss.alpha", "loss.type"]
    r = rows[2]
    assert (r["loss.gamma"], r["loss.alpha"], r["loss.type"]) == ("2", "0.25", "focal")
    assert (r["AP"], r["AP75"]) == ("34.000", "36.000")
    assert (r["loss_cls"], r["loss_box"], r["wall_s"]) == ("0.125", "0.0625", "125.0")  # the last loss record

    md = paths["table.md"].read_text()
    assert ("| gamma=2,alpha=0.25 | 2 | 0.25 | focal | 34.0 | 52.0 | 36.0 | 12.0 | 33.0 | 45.0 "
            "| 0.1250 | 0.0625 | 2:05 |") in md
    assert "| type=ohem | - | 0.25 | ohem | 30.5 |" in md  # OHEM's CE does not read loss.gamma
    # gamma x alpha grid of AP (ohem is not in it) and, per gamma, the best alpha (Table 1a/1b)
    assert "| gamma \\ alpha | 0.25 | 0.75 |\n| --- | ---: | ---: |\n| 0 | 28.0 | 31.0 |\n| 2 | 34.0 | 33.0 |" in md
    assert "| 0 | 0.75 | 31.0 | 51.0 | 30.0 |\n| 2 | 0.25 | 34.0 | 52.0 | 36.0 |" in md
    # best of each family, ordered by AP: FL 34.0 > CE 31.0 > OHEM 30.5
    assert ("| FL (gamma > 0) | gamma=2,alpha=0.25 | 34.0 | 52.0 | 36.0 |\n"
            "| alpha-balanced CE (gamma 0) | gamma=0,alpha=0.75 | 31.0 | 51.0 | 30.0 |\n"
            "| OHEM | type=ohem | 30.5 | 49.0 | 31.0 |") in md
    assert paths["ablation.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_marks_unfinished_runs_and_needs_runs(tmp_path):
    _fake_run(tmp_path, ["loss.gamma=1"], (20.0, 40.0, 18.0, 5.0, 20.0, 30.0))
    (tmp_path / "gamma=3").mkdir()
    running = {"overrides": ["loss.gamma=3"], "status": "running"}
    (tmp_path / "gamma=3" / "ablate_run.json").write_text(json.dumps(running))
    md = build_report(tmp_path)["table.md"].read_text()
    assert "| gamma=3 | running | 3 |  |  |  |  |  |  |  |  |  |" in md
    with pytest.raises(FileNotFoundError, match="no run directories"):
        build_report(tmp_path / "gamma=3")


def test_ablate_cli_user_errors_are_one_line(tmp_path, capsys):
    # each of these was a traceback (exit 1): the grid reader parsed the file on its own, and the
    # report raised plain FileNotFoundErrors
    from retina.cli import main

    broken = tmp_path / "broken.yaml"
    broken.write_text("base: shapes\nablate:\n  grids:\n    - {loss.gamma: [0, 1]\n")
    cases = [(["--config", str(broken)], f"{broken}: line 5 YAML syntax error: expected ',' or '}}', but got '<stream end>'"),
             (["--config", str(tmp_path / "none.yaml")], f"{tmp_path / 'none.yaml'}: config file not found"),
             (["--report", str(tmp_path / "none")], f"{tmp_path / 'none'}: no such sweep directory"),
             (["--report", str(tmp_path)], f"{tmp_path}: no run directories (with ablate_run.json or config.yaml)")]
    for args, message in cases:
        assert main(["ablate", *args, "--out", str(tmp_path / "sweep")]) == 2, args
        assert capsys.readouterr().err == f"retina: error: {message}\n"


# ------------------------------------------------------------------------------------ seeds
def test_seeds_add_a_seed_override_seed_major(tmp_path):
    runs = plan_sweep(SHAPES, ["loss.gamma=0,2"], [], tmp_path, seeds=2)
    # seed 0 of every combination first: a sweep stopped halfway has each setting once
    assert [r.name for r in runs] == ["gamma=0,seed=0", "gamma=2,seed=0", "gamma=0,seed=1", "gamma=2,seed=1"]
    assert runs[2].overrides == ("loss.gamma=0", "train.seed=1")
    assert [r.name for r in plan_sweep(SHAPES, ["loss.gamma=0"], [], tmp_path)] == ["gamma=0"]  # no seeds
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"base: {SHAPES}\nablate:\n  seeds: 3\n  grids:\n    - {{loss.alpha: [0.25]}}\n")
    assert [r.name for r in plan_sweep(preset, [], [], tmp_path)] == [f"alpha=0.25,seed={s}" for s in range(3)]
    assert len(plan_sweep(preset, [], [], tmp_path, seeds=1)) == 1  # --seeds wins over the file
    # a --grid that sweeps the seed replaces the file's seeds: one run, named like the file's
    assert [r.name for r in plan_sweep(preset, ["loss.alpha=0.25", "train.seed=1"], [], tmp_path)] == [
        "alpha=0.25,seed=1"]
    with pytest.raises(ConfigError, match="--seeds=0: the number of seeds must be an integer >= 1"):
        plan_sweep(SHAPES, [], [], tmp_path, seeds=0)
    with pytest.raises(ConfigError, match="already sweeps train.seed"):
        plan_sweep(SHAPES, ["train.seed=0,1"], [], tmp_path, seeds=2)
    preset.write_text(f"base: {SHAPES}\nablate: {{seed: 3}}\n")
    with pytest.raises(ConfigError, match="unknown key 'ablate.seed'; expected ablate.grids or ablate.seeds"):
        plan_sweep(preset, [], [], tmp_path)


def test_cli_seeds_reach_the_sweep_and_the_report(tmp_path, monkeypatch, capsys):
    from retina.cli import main

    def fake_train(run, config_path, sets, device, resume):  # AP 40 + seed
        seed = int(dict(o.split("=") for o in run.overrides)["train.seed"])
        (run.run_dir / "metrics.json").write_text(json.dumps({"AP": 40.0 + seed}))
        return None

    monkeypatch.setattr(ablate, "_train_in_process", fake_train)
    out = tmp_path / "sweep"
    assert main(["ablate", "--config", SHAPES, "--grid", "loss.gamma=2", "--seeds", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["gamma=2,seed=0", "gamma=2,seed=1"]
    # mean (40 + 41) / 2 = 40.5; std sqrt((0.25 + 0.25) / 1) = 0.707
    assert "| gamma=2 | 2 | 40.5 ± 0.7 |" in (out / "table.md").read_text()
    assert "sweep of 2 runs done" in capsys.readouterr().out


def _seed_runs(out: Path, overrides: list[str], aps: list[float]) -> None:
    """One fake finished run per seed; AP50 = AP + 20 and AP75 = AP + 2 (so their stats follow)."""
    for seed, ap in enumerate(aps):
        _fake_run(out, [*overrides, f"train.seed={seed}"], (ap, ap + 20, ap + 2, 10.0, 20.0, 30.0))


def test_report_with_seeds_mean_std_ties_and_the_paper(tmp_path):
    out = tmp_path / "sweep"
    # CE alpha .75: 30, 31, 32 -> mean 31, std sqrt((1 + 0 + 1) / 2) = 1.0
    _seed_runs(out, ["loss.gamma=0", "loss.alpha=0.75"], [30.0, 31.0, 32.0])
    # FL gamma 2 alpha .25: 34, 36, 35 -> mean 35, std 1.0 (the best)
    _seed_runs(out, ["loss.gamma=2", "loss.alpha=0.25"], [34.0, 36.0, 35.0])
    # FL gamma 2 alpha .75: 33, 35, 34 -> mean 34, std 1.0; -1.0 from the best, under 2 x 1.0: a tie
    _seed_runs(out, ["loss.gamma=2", "loss.alpha=0.75"], [33.0, 35.0, 34.0])
    # OHEM: 28, 29, 33 -> mean 30, std sqrt((4 + 1 + 9) / 2) = sqrt(7) = 2.646; -5.0 from the best,
    # under 2 x max(2.646, 1.0) = 5.29: a tie too, though 4 AP further than the CE below
    _seed_runs(out, ["loss.type=ohem", "loss.gamma=0", "loss.alpha=null"], [28.0, 29.0, 33.0])
    md = build_report(out)["table.md"].read_text()

    assert "| type=ohem,gamma=0,alpha=null,seed=2 | - | none | 2 | ohem | 33.0 |" in md  # OHEM reads no gamma
    assert ("| setting | seeds | AP | AP50 | AP75 | paper AP | vs best |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            "| gamma=2,alpha=0.25 | 3 | 35.0 ± 1.0 | 55.0 ± 1.0 | 37.0 ± 1.0 | 34.0 (1b) | best |\n"
            "| gamma=2,alpha=0.75 | 3 | 34.0 ± 1.0 | 54.0 ± 1.0 | 36.0 ± 1.0 |  | -1.0 AP (tie) |\n"
            "| gamma=0,alpha=0.75 | 3 | 31.0 ± 1.0 | 51.0 ± 1.0 | 33.0 ± 1.0 | 31.1 (1a) | -4.0 AP (beyond 2 std) |\n"
            "| type=ohem,gamma=0,alpha=null | 3 | 30.0 ± 2.6 | 50.0 ± 2.6 | 32.0 ± 2.6 |  | -5.0 AP (tie) |") in md
    assert ("| gamma \\ alpha | 0.25 | 0.75 |\n| --- | ---: | ---: |\n| 0 |  | 31.0 ± 1.0 |\n"
            "| 2 | 35.0 ± 1.0 | 34.0 ± 1.0 |") in md
    assert ("| gamma | alpha | AP | AP50 | AP75 | tied alphas |\n| --- | --- | ---: | ---: | ---: | ---: |\n"
            "| 0 | 0.75 | 31.0 ± 1.0 | 51.0 ± 1.0 | 33.0 ± 1.0 | none |\n"
            "| 2 | 0.25 | 35.0 ± 1.0 | 55.0 ± 1.0 | 37.0 ± 1.0 | 0.75 |") in md
    assert ("- FL (gamma 2, alpha .25) against the best alpha-balanced CE (gamma=0,alpha=0.75): +4.0 AP "
            "(beyond 2 std). Paper (Table 1a/1b): 34.0 against 31.1, +2.9 AP.") in md
    assert ("- The best OHEM (type=ohem,gamma=0,alpha=null) against FL (gamma 2, alpha .25): -5.0 AP (tie). "
            "Paper (Table 1d, R-101): 32.8 against 36.0, -3.2 AP.") in md


def test_seed_groups_by_hand_and_a_single_seed_has_no_verdict(tmp_path):
    _seed_runs(tmp_path, ["loss.gamma=2"], [34.0, 35.0])  # mean 34.5, std sqrt(0.125 + 0.125) = 0.7071
    _seed_runs(tmp_path, ["loss.gamma=1"], [20.0])  # one seed: no std
    (tmp_path / "gamma=1,seed=1").mkdir()  # its second seed still running
    (tmp_path / "gamma=1,seed=1" / "ablate_run.json").write_text(
        json.dumps({"overrides": ["loss.gamma=1", "train.seed=1"], "status": "running"}))
    keys, settings = group_seeds(*collect_runs(tmp_path))
    assert keys == ["loss.gamma"]
    one, two = settings  # sorted by gamma
    assert (one.name, len(one.runs), one.n, one.mean(), one.std()) == ("gamma=1", 2, 1, 20.0, None)
    assert (two.name, two.n, two.mean()) == ("gamma=2", 2, 34.5)
    assert two.std() == pytest.approx(math.sqrt(((34 - 34.5) ** 2 + (35 - 34.5) ** 2) / (2 - 1)))
    assert tied(one, two) is None
    md = build_report(tmp_path)["table.md"].read_text()
    assert "| gamma=1 | 1 | 20.0 (n=1) |" in md and "-14.5 AP (no std: fewer than 2 seeds) |" in md


def test_equal_means_without_spread_are_a_tie_and_a_zero_spread_difference_is_not(tmp_path):
    # two settings at 0 AP on every seed (std 0) tie; 0.5 AP on every seed against them does not
    _seed_runs(tmp_path, ["loss.gamma=0", "loss.alpha=0.25"], [0.0, 0.0])
    _seed_runs(tmp_path, ["loss.gamma=0", "loss.alpha=0.75"], [0.0, 0.0])
    _seed_runs(tmp_path, ["loss.gamma=2", "loss.alpha=0.25"], [0.5, 0.5])
    _, (ce25, ce75, fl) = group_seeds(*collect_runs(tmp_path))
    assert (ce25.std(), ce75.std(), fl.std()) == (0.0, 0.0, 0.0)
    assert tied(ce25, ce75) is True
    assert tied(ce25, fl) is False


def test_report_from_a_re_evaluation_of_every_run(tmp_path):
    # training's metrics.json says CE 0 and FL 1 AP; eval_thr0/metrics.json (a re-evaluation) says
    # 0.3 and 1.5; one FL seed has no re-evaluation yet: its row stays done, with no AP
    _seed_runs(tmp_path, ["loss.gamma=0", "loss.alpha=0.75"], [0.0, 0.0])
    _seed_runs(tmp_path, ["loss.gamma=2", "loss.alpha=0.25"], [1.0, 1.0])
    for name, ap in [("gamma=0,alpha=0.75,seed=0", 0.2), ("gamma=0,alpha=0.75,seed=1", 0.4),
                     ("gamma=2,alpha=0.25,seed=0", 1.5)]:
        (tmp_path / name / "eval_thr0").mkdir()
        (tmp_path / name / "eval_thr0" / "metrics.json").write_text(json.dumps({"AP": ap, "AP50": 2 * ap}))
    paths = build_report(tmp_path, "eval_thr0/metrics.json")
    assert [p.name for p in paths.values()] == ["table.eval_thr0.md", "table.eval_thr0.csv",
                                                "ablation.eval_thr0.png"]
    assert not (tmp_path / "table.md").exists()  # the training's report is left alone
    md = paths["table.md"].read_text()
    assert md.startswith("# Ablation: " + tmp_path.name + ", metrics from each run's eval_thr0/metrics.json")
    # CE: 0.2, 0.4 -> mean 0.3, std sqrt(0.01 + 0.01) = 0.1414; FL: one seed re-evaluated
    assert "| gamma=0,alpha=0.75 | 2 | 0.3 ± 0.1 |" in md
    assert "| gamma=2,alpha=0.25 | 1 | 1.5 (n=1) |" in md
    assert "| gamma=2,alpha=0.25,seed=1 | 2 | 0.25 | 1 |  |" in md


def _val_rows(run: Path, aps: dict[int, float], cut_after: int | None = None) -> None:
    """Append the val/AP rows that a training's evaluations write to its metrics.jsonl."""
    with open(run / "metrics.jsonl", "a") as f:
        for i, ap in aps.items():
            f.write(json.dumps({"iter": i, "time": 0.0, "val/AP": ap, "val/AP50": ap + 20}) + "\n")
            if i == cut_after:
                f.write('{"iter": 999, "val/A')  # a row cut by a kill, then the run resumed
                f.write("\n")


def test_learning_curves_mean_over_seeds_and_the_last_quarter(tmp_path):
    _seed_runs(tmp_path, ["loss.gamma=2"], [31.0, 35.0])
    # seed 0: 10, 20, 30, 31; seed 1: 14, 22, 34, 35 -> means 12, 21, 32, 33; 3/4 of 600 is 450:
    # the change is 33 - 32 = +1.0; the std at 600 is |31 - 35| / sqrt(2) = 2.828
    _val_rows(tmp_path / "gamma=2,seed=0", {150: 10.0, 300: 20.0, 450: 30.0, 600: 31.0})
    _val_rows(tmp_path / "gamma=2,seed=1", {150: 14.0, 300: 22.0, 450: 34.0, 600: 35.0})
    _seed_runs(tmp_path, ["loss.gamma=0"], [25.0])
    # iteration 300 evaluated twice (a resume): the later 9 counts; 3/4 of 600: 450 -> 25 - 15 = +10
    _val_rows(tmp_path / "gamma=0,seed=0", {150: 5.0, 300: 8.0}, cut_after=300)
    _val_rows(tmp_path / "gamma=0,seed=0", {300: 9.0, 450: 15.0, 600: 25.0})
    # one evaluated only at the end: no earlier point, no change
    _seed_runs(tmp_path, ["loss.gamma=1"], [20.0])
    _val_rows(tmp_path / "gamma=1,seed=0", {600: 20.0})

    paths = build_report(tmp_path)
    md = paths["table.md"].read_text()
    assert "| gamma=2 | 4 | 32.0 (iter 450) | 33.0 (iter 600) | +1.0 |" in md
    assert "| gamma=0 | 4 | 15.0 (iter 450) | 25.0 (iter 600) | +10.0 |" in md
    assert "| gamma=1 | 1 | - | 20.0 (iter 600) | - |" in md
    with open(paths["curves.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {k: rows[3][k] for k in ("setting", "iter", "AP", "AP_std", "seeds")} == {
        "setting": "gamma=0", "iter": "600", "AP": "25.000", "AP_std": "", "seeds": "1"}
    g2 = [r for r in rows if r["setting"] == "gamma=2"]
    assert [(r["iter"], r["AP"]) for r in g2] == [("150", "12.000"), ("300", "21.000"), ("450", "32.000"),
                                                   ("600", "33.000")]
    assert g2[-1]["AP_std"] == f"{math.sqrt(8):.3f}" and g2[-1]["seeds"] == "2"
    assert [r["AP"] for r in rows if r["setting"] == "gamma=0"] == ["5.000", "9.000", "15.000", "25.000"]
    assert paths["curves.png"].stat().st_size > 0


def test_a_sweep_without_evaluations_during_training_has_no_curves(tmp_path):
    _seed_runs(tmp_path, ["loss.gamma=2"], [31.0])
    paths = build_report(tmp_path)
    assert "curves.png" not in paths and not (tmp_path / "curves.csv").exists()
    assert "Learning curves" not in paths["table.md"].read_text()


def test_a_run_config_read_back_equals_the_loaded_one(tmp_path):
    # A resolved config.yaml writes tuples as YAML lists (solver.steps, the anchor sizes); read back
    # they are tuples again, so the report's config equals load_config's and re-validates: with a
    # list, solver.steps [60000, 80000] differs from its default and is refused under cosine.
    from retina.config import dump_config, find_config, replace

    cfg = load_config(find_config("ablations/imbalance_core"))
    assert cfg.solver.schedule == "cosine" and cfg.solver.steps == (60000, 80000)
    run = tmp_path / "sweep" / "gamma=2"
    run.mkdir(parents=True)
    dump_config(cfg, run / "config.yaml")
    assert "- 60000" in (run / "config.yaml").read_text()  # a YAML list on disk
    (run / "ablate_run.json").write_text(json.dumps({"overrides": ["loss.gamma=2"], "status": "done"}))
    _, rows = collect_runs(tmp_path / "sweep")
    assert rows[0].cfg == cfg
    assert rows[0].cfg.solver.steps == (60000, 80000)
    assert replace(rows[0].cfg, model=rows[0].cfg.model) == cfg
