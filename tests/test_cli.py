"""The command line: every user error is one line on stderr with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retina.cli import build_parser, main, share_cores
from retina.config import find_config


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("retina: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_default_config_is_bundled():
    assert find_config("shapes.yaml").name == "shapes.yaml"
    assert find_config("shapes").is_file()


@pytest.mark.parametrize("override, fragments", [
    ("loss.gama=1", ["loss.gama", "did you mean 'gamma'"]),
    ("loss.gamma=abc", ["loss.gamma", "float"]),
    ("loss.type=hinge", ["loss.type", "'focal'"]),
    ("loss.gamma=-1", ["loss.gamma", ">= 0"]),
    ("solver", ["expected key=value"]),
])
def test_train_config_errors(capsys, tmp_path, override, fragments):
    code, err = run_cli(capsys, "train", "--set", override, "--out", str(tmp_path / "run"))
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert not (tmp_path / "run").exists()  # nothing written for a refused config


def test_bad_value_names_the_set_item(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--set", "solver.lr=-1", "--out", str(tmp_path / "run"))
    assert code == 2
    assert err == "retina: error: --set solver.lr=-1: solver.lr=-1.0 must be > 0\n"


def test_setting_that_does_not_apply_is_refused(capsys, tmp_path):
    # gamma written beside the choice that does not read it
    code, err = run_cli(capsys, "train", "--set", "loss.type=ce", "loss.gamma=2", "--out", str(tmp_path / "run"))
    assert code == 2
    assert_one_line_error(err, "--set loss.gamma=2: loss.gamma=2.0 does not apply to loss.type=ce",
                          "set loss.gamma=0 or use loss.type=focal")
    assert not (tmp_path / "run").exists()


def test_setting_the_override_stops_reading_is_dropped_with_one_notice(capsys, tmp_path):
    # shapes.yaml's data.shapes.image_size=128 is not read on COCO json: one notice, then the
    # run goes on, here as far as the missing folder
    code, err = run_cli(capsys, "train", "--set", "data.dataset=coco", f"data.root={tmp_path / 'none'}",
                        "--out", str(tmp_path / "run"))
    assert code == 2
    notice, error = err.strip().splitlines()
    assert notice == "retina: data.shapes.* not read with data.dataset=coco: ignored"
    assert error.startswith(f"retina: error: data.root={tmp_path / 'none'} not found")


@pytest.mark.parametrize("command", [["train"], ["eval", "-w", "RUN"], ["predict", "-w", "RUN", "-i", "x.jpg"],
                                     ["ablate"], ["analyze", "model"], ["export", "-w", "RUN"],
                                     ["data", "show"], ["convert", "torchvision", "--in", "a", "-o", "b"]])
def test_repeated_set_flags_add_up(command):
    # argparse's plain nargs="+" keeps only the last --set: a=1 would be dropped without a word
    args = build_parser().parse_args([*command, "--set", "a=1", "b=2", "-s", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]
    assert build_parser().parse_args(command).set == []  # the default list is not shared


def test_repeated_set_flags_reach_the_config(capsys, tmp_path):
    # gamma 1 reaches the check only if the first --set survives (alone, the last would train:
    # shapes.yaml's gamma 2.0 is dropped for CE)
    code, err = run_cli(capsys, "train", "--set", "loss.gamma=1", "--set", "loss.type=ce",
                        "--out", str(tmp_path / "run"))
    assert code == 2
    assert_one_line_error(err, "--set loss.type=ce: loss.gamma=1.0 does not apply to loss.type=ce")


def test_usage_error_is_one_line(capsys):
    code, err = run_cli(capsys, "data", "check")
    assert code == 2
    assert_one_line_error(err, "retina data check needs --ann")


def test_internal_error_is_not_a_user_error(capsys, monkeypatch):
    """A ValueError from a bug keeps its traceback (exit 1 from the interpreter), not exit 2."""
    import retina.cli

    def broken(args):
        raise ValueError("an internal contract was broken")

    monkeypatch.setitem(retina.cli.COMMANDS, "train", broken)
    with pytest.raises(ValueError, match="internal contract"):
        main(["train"])
    assert capsys.readouterr().err == ""  # nothing printed as if the user had erred


@pytest.mark.parametrize("argv", [["analyze", "loss-cdf", "--num-images", "0"],
                                  ["export", "--weights", "w.pth", "--num-images", "-3"]])
def test_image_counts_must_be_positive(capsys, argv):
    # `analyze loss-cdf --num-images 0` analysed no image, exit 0, over an earlier result
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "argument --num-images: expected at least 1, got" in capsys.readouterr().err


def test_ctrl_c_outside_training_is_one_line(capsys, monkeypatch):
    """Ctrl-C while torch loads or during eval/predict: 'retina: interrupted', exit 130 (128 +
    SIGINT, as a shell reports it), not a KeyboardInterrupt traceback; RETINA_DEBUG keeps it."""
    import retina.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(retina.cli.COMMANDS, "eval", interrupted)
    assert main(["eval", "--weights", "w.pth"]) == 130
    assert capsys.readouterr().err == "retina: interrupted\n"
    monkeypatch.setenv("RETINA_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        main(["eval", "--weights", "w.pth"])


def test_user_facing_errors_share_one_base():
    from retina.config import ConfigError
    from retina.data import BadImageError, TooManyBadImages
    from retina.engine.checkpoint import CheckpointError
    from retina.engine.evaluate import EvalBackendError
    from retina.engine.preflight import PreflightError
    from retina.engine.train import TrainingError
    from retina.errors import InputError, MissingFileError, RetinaError, UsageError
    from retina.model.backbone import WeightsError

    for cls in (ConfigError, BadImageError, TooManyBadImages, CheckpointError, EvalBackendError,
                PreflightError, TrainingError, WeightsError, InputError, MissingFileError, UsageError):
        assert issubclass(cls, RetinaError), cls
    # the builtin bases stay, for callers that catch those
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(InputError, ValueError)


def test_missing_config_file(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert_one_line_error(err, "nope.yaml", "not found")


def test_yaml_syntax_error_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver:\n  lr: 0.1\n  steps: [1, 2\n")
    code, err = run_cli(capsys, "train", "--config", str(bad))
    assert code == 2
    assert_one_line_error(err, "bad.yaml", "line")


def test_missing_coco_dataset_names_path(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--config", "retinanet_r50_fpn_1x_coco",
                        "--set", f"data.root={tmp_path}/coco", "model.backbone.weights=null",
                        "--out", str(tmp_path / "run"))
    assert code == 2
    assert_one_line_error(err, str(tmp_path / "coco"))


def test_missing_photo_folder_is_named_as_data_root(capsys, tmp_path, monkeypatch):
    # format auto on a folder that is not there: the COCO default names were reported missing
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "train", "--config", "photos_cpu", "--set", "data.root=photos",
                        "--out", str(tmp_path / "run"))
    assert code == 2
    assert_one_line_error(err, f"data.root=photos not found (a relative root is read from the current "
                               f"directory, {tmp_path})")
    assert not (tmp_path / "run").exists()


def test_eval_missing_checkpoint(capsys, tmp_path):
    code, err = run_cli(capsys, "eval", "--weights", str(tmp_path / "model_final.pth"))
    assert code == 2
    assert_one_line_error(err, "model_final.pth", "not found")


def test_missing_eval_backend_fails_before_training(capsys, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed: import fails
    code, err = run_cli(capsys, "train", "--set", "eval.backend=faster_coco_eval", f"data.root={tmp_path}/shapes",
                        "--out", str(tmp_path / "run"))
    assert code == 2
    assert_one_line_error(err, "eval.backend=faster_coco_eval", "pip install faster-coco-eval")
    assert not (tmp_path / "run").exists() and not (tmp_path / "shapes").exists()  # nothing done


def test_eval_corrupt_checkpoint(capsys, tmp_path):
    path = tmp_path / "model_final.pth"
    path.write_bytes(b"not a checkpoint")
    code, err = run_cli(capsys, "eval", "--weights", str(path))
    assert code == 2
    assert_one_line_error(err, "model_final.pth")


def test_convert_missing_input(capsys, tmp_path):
    code, err = run_cli(capsys, "convert", "torchvision", "--in", str(tmp_path / "tv.pth"),
                        "--out", str(tmp_path / "out.pth"))
    assert code == 2
    assert_one_line_error(err, "tv.pth", "not found")
    assert not (tmp_path / "out.pth").exists()


def test_data_check_cli(capsys, tiny_coco):
    ann, images = tiny_coco
    # the hand-made set has degenerate boxes and an empty image: warnings only -> exit 0
    code = main(["data", "check", "--ann", str(ann), "--images", str(images)])
    out = capsys.readouterr().out
    assert code == 0 and "warnings" in out


# ------------------------------------------------------------------------- answers without torch
NO_TORCH_SCRIPT = """
import json, sys
from retina.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as e:  # --help and argument errors: argparse exits
        codes.append(e.code)
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


def test_help_argument_and_config_errors_do_not_import_torch(tmp_path):
    # importing torch takes seconds; none of these needs it
    argvs = [["--help"], ["train", "--help"], ["data", "check", "--help"], ["analyze", "errors", "--help"],
             ["train", "--bogus"], ["data", "check", "--num", "3"], ["train", "--set", "loss.gama=1"],
             ["data", "shapes", "--size", "0"], ["eval", "-w", "RUN", "--config", "shapes", "--set", "loss.gama=1"]]
    result = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, json.dumps(argvs)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 0, 0, 0, 2, 2, 2, 2, 2], "torch": False}, result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written by any of them


def test_openmp_threads_spin_briefly_at_a_barrier_unless_the_user_chose_how_they_wait():
    env = {"PATH": "/bin"}
    share_cores(env)
    assert env == {"PATH": "/bin", "GOMP_SPINCOUNT": "1000"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(chosen)
        share_cores(env)
        assert env == chosen


WAIT_SCRIPT = """
import os, sys
from retina.cli import main
try:
    main(["train", "--help"])
except SystemExit:
    pass
print(os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules)
"""


def test_the_command_sets_the_spin_count_before_torch_loads(tmp_path):
    # OpenMP reads GOMP_SPINCOUNT once, when torch loads: it must be in place before any import
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", WAIT_SCRIPT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["1000", "False"]


# ------------------------------------------------------------------------ data and analyze jobs
def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_each_data_and_analyze_job_lists_only_its_own_options(capsys):
    check = help_text(capsys, "data", "check")
    assert "--ann" in check and "--root" in check and "--keep-difficult" in check
    assert "--num" not in check and "--size" not in check and "--split " not in check
    shapes = help_text(capsys, "data", "shapes")
    assert "--size" in shapes and "--seed" in shapes and "--ann" not in shapes
    model = help_text(capsys, "analyze", "model")
    assert "--json" in model and "--gammas" not in model and "--detections" not in model
    loss_cdf = help_text(capsys, "analyze", "loss-cdf")
    assert "--gammas" in loss_cdf and "--set" not in loss_cdf and "--json" not in loss_cdf


@pytest.mark.parametrize("argv, flag", [(["data", "check", "--root", "r", "--num", "3"], "--num"),
                                        (["data", "show", "--ann", "a.json"], "--ann"),
                                        (["analyze", "model", "--config", "shapes", "--gammas", "1"], "--gammas"),
                                        (["analyze", "errors", "--coco"], "--coco")])
def test_an_option_of_another_job_is_refused(capsys, argv, flag):
    # an option that the job would not read is an error, not silently ignored
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_command_lines_of_the_flat_verbs_still_parse():
    parse = build_parser().parse_args
    a = parse(["data", "shapes", "--out", "d", "--train", "500", "--val", "50", "--size", "96", "--seed", "3"])
    assert (a.what, a.out, a.num_train, a.num_val, a.image_size, a.seed) == ("shapes", "d", 500, 50, 96, 3)
    a = parse(["data", "convert", "--from", "voc", "--to", "coco", "--root", "r", "--out", "o"])
    assert (a.what, a.format, a.to, a.root, a.out, a.splits) == ("convert", "voc", "coco", "r", "o", "train,val")
    a = parse(["data", "check", "--root", "r", "--format", "yolo", "--splits", "train", "--classes", "a,b",
               "--keep-difficult"])
    assert (a.format, a.splits, a.classes, a.keep_difficult) == ("yolo", "train", "a,b", True)
    a = parse(["data", "show", "-c", "photos_cpu", "-n", "4", "--split", "val", "-o", "o", "-s", "k=v"])
    assert (a.config, a.num, a.split, a.out, a.set) == ("photos_cpu", 4, "val", "o", ["k=v"])
    a = parse(["analyze", "loss-cdf", "-w", "run", "--gammas", "0,1", "--num-images", "5", "-o", "o"])
    assert (a.kind, a.weights, a.gammas, a.num_images, a.out, a.device) == ("loss-cdf", "run", "0,1", 5, "o", "auto")
    a = parse(["analyze", "imbalance", "--config", "dense", "--num-images", "200", "--coco",
               "--coco-positives", "50"])
    assert (a.config, a.num_images, a.coco, a.coco_positives, a.weights) == ("dense", 200, True, 50.0, None)
    a = parse(["analyze", "errors", "--detections", "d.json", "--ann", "a.json", "--score-thresh", "0.4"])
    assert (a.detections, a.ann, a.score_thresh, a.out) == ("d.json", "a.json", 0.4, None)
    assert parse(["export", "-w", "run", "--format", "torchscript"]).format == "torchscript"  # deprecated name


def test_data_shapes_takes_its_settings_from_the_config(monkeypatch, tmp_path, capsys):
    import retina.data

    made = []
    monkeypatch.setattr(retina.data, "ensure_shapes", lambda *a: made.append(a) or Path(a[0]))
    monkeypatch.chdir(tmp_path)
    # configs/shapes.yaml: data.root data/shapes, data.shapes {num_train 2000, num_val 200,
    # image_size 128, seed 0}: the set written is the one `retina train` on that config reads
    assert main(["data", "shapes"]) == 0
    # the flags override the config's keys one by one
    assert main(["data", "shapes", "--size", "96", "--train", "10", "--out", "elsewhere"]) == 0
    # a config that sets no data.shapes: the schema's defaults (2000, 200, 160, 0)
    (tmp_path / "bare.yaml").write_text("data: {dataset: shapes, root: data/bare}\n")
    assert main(["data", "shapes", "--config", str(tmp_path / "bare.yaml")]) == 0
    assert made == [("data/shapes", 2000, 200, 128, 0), ("elsewhere", 10, 200, 96, 0),
                    ("data/bare", 2000, 200, 160, 0)]
    assert capsys.readouterr().out.splitlines() == ["shapes dataset ready in data/shapes",
                                                    "shapes dataset ready in elsewhere",
                                                    "shapes dataset ready in data/bare"]


# ------------------------------------------------------------------------------------ eval
def test_scored_weights_name_the_checkpoint_and_its_iteration(tmp_path):
    import torch

    from retina.commands import scored_weights

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "iteration": 500}, run / "model_0000500.pth")
    assert scored_weights(str(run)) == {"path": str(run / "model_0000500.pth"), "iteration": 500}  # the newest
    torch.save({"model": {}, "iteration": 1500}, run / "model_final.pth")
    assert scored_weights(str(run)) == {"path": str(run / "model_final.pth"), "iteration": 1500}
    torch.save({"model": {}}, tmp_path / "converted.pth")  # e.g. retina convert: no iteration
    assert scored_weights(str(tmp_path / "converted.pth")) == {"path": str(tmp_path / "converted.pth"),
                                                               "iteration": None}
    assert scored_weights("model.onnx") == {"path": "model.onnx", "iteration": None}  # not opened


def test_interrupted_training_exits_128_plus_the_signal(capsys, monkeypatch):
    import retina.cli
    from retina.engine.train import Interrupted

    def interrupted(args):
        raise Interrupted("stopped by SIGTERM; checkpoint saved: runs/x/model_0000010.pth", 15)

    monkeypatch.setitem(retina.cli.COMMANDS, "train", interrupted)
    assert main(["train"]) == 128 + 15
    assert capsys.readouterr().err == "retina: stopped by SIGTERM; checkpoint saved: runs/x/model_0000010.pth\n"
