"""What the user sees and what is left on disk when training goes wrong: non-finite losses,
Ctrl-C / SIGTERM, kill -9 (between and during checkpoint writes), unwritable or full disks, and
--resume of a run that is already complete."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from retina.cli import main
from retina.config import config_to_dict
from retina.data import generate_shapes
from retina.engine.checkpoint import load_checkpoint
from retina.engine.preflight import PreflightError, worker_error_line
from retina.engine.train import Trainer, TrainingError
from tinyrun import TINY_DATA, tiny_config, with_changes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, **TINY_DATA)
    return root


def short_config(root, max_iter=8, **train):
    return tiny_config(root, solver={"max_iter": max_iter, "warmup_iters": 2},
                       train={"checkpoint_period": 2, "log_period": 1, "eval_at_end": False, **train})


def nan_at(trainer: Trainer, calls: set[int]) -> None:
    """Make the model's loss terms NaN on the given (1-based) calls."""
    model = trainer.model
    compute_loss, count = model.compute_loss, [0]

    def patched(*args, **kwargs):
        count[0] += 1
        out = compute_loss(*args, **kwargs)
        if count[0] in calls:
            out = {k: v * float("nan") if k.startswith("loss_") else v for k, v in out.items()}
        return out

    model.compute_loss = patched


# ----------------------------------------------------------------------------- numbers
def test_nonfinite_loss_stops_with_one_line_and_keeps_last_checkpoint(shapes_root, tmp_path):
    trainer = Trainer(short_config(shapes_root), tmp_path / "run", device="cpu", quiet=True)
    nan_at(trainer, {5})
    with pytest.raises(TrainingError) as e:
        trainer.train()
    message = str(e.value)
    assert "\n" not in message
    assert "iteration 5" in message and "loss_cls=nan" in message and "model_0000004.pth" in message
    ckpt = load_checkpoint(tmp_path / "run" / "model_0000004.pth")  # intact, finite
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "model_final.pth").exists()


def test_skip_nonfinite_skips_and_logs(shapes_root, tmp_path):
    cfg = short_config(shapes_root, skip_nonfinite=2)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    nan_at(trainer, {3, 6})
    trainer.train()
    ckpt = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert ckpt["iteration"] == 8 and ckpt["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------- directories
def test_unwritable_run_dir_is_reported_before_training(shapes_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PreflightError, match="cannot write to run directory"):
        Trainer(short_config(shapes_root), blocker / "run", device="cpu", quiet=True)


def test_full_disk_is_reported_before_training(shapes_root, tmp_path, monkeypatch):
    import retina.engine.preflight as preflight

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(PreflightError) as e:
        Trainer(short_config(shapes_root), tmp_path / "run", device="cpu", quiet=True)
    assert "MiB free" in str(e.value) and "\n" not in str(e.value)
    assert list((tmp_path / "run").glob("*.pth")) == []


def test_worker_error_line_recovers_the_message():
    class BadImageError(RuntimeError):
        pass

    wrapped = RuntimeError("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback"
                           " (most recent call last):\n  File x\nretina.data.coco.BadImageError: "
                           "cannot read data/x.png (image id 7)")
    assert worker_error_line(wrapped) == "cannot read data/x.png (image id 7)"
    assert worker_error_line(BadImageError("cannot read a.png")) == "cannot read a.png"
    assert worker_error_line(ValueError("other")) is None


# --------------------------------------------------------------------------- processes
def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def train_process(config: Path, out: Path, *extra: str, prelude: str = "",
                  new_session: bool = False) -> subprocess.Popen:
    """``retina train`` in a real subprocess; ``prelude`` runs first (fault injection);
    ``new_session``: in a process group of its own (``os.killpg`` signals it and its workers)."""
    code = textwrap.dedent(prelude) + textwrap.dedent(f"""
        import sys
        from retina.cli import main
        sys.exit(main(["train", "--config", {str(config)!r}, "--out", {str(out)!r}, "--device", "cpu",
                       *{list(extra)!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def final_weights(run: Path) -> dict:
    return load_checkpoint(run / "model_final.pth")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def straight_run(shapes_root, tmp_path_factory):
    """The reference: 30 iterations without interruption, in a subprocess like the others."""
    tmp = tmp_path_factory.mktemp("straight")
    config = write_config(short_config(shapes_root, max_iter=30), tmp / "config.yaml")
    proc = train_process(config, tmp / "run")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return config, final_weights(tmp / "run")


def test_kill_9_between_writes_then_resume_is_exact(straight_run, tmp_path):
    config, reference = straight_run
    run = tmp_path / "run"
    proc = train_process(config, run)
    wait_for(lambda: (run / "model_0000010.pth").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model_final.pth").exists()
    resumed = train_process(config, run, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_weights(final_weights(run), reference)


def test_kill_9_during_a_checkpoint_write_then_resume_is_exact(straight_run, tmp_path):
    config, reference = straight_run
    run = tmp_path / "run"
    # The 3rd checkpoint write stalls after writing its bytes and before the rename: killed there.
    stall = """
        import time, torch
        import retina.engine.checkpoint as checkpoint
        _save, _calls = torch.save, [0]
        def slow_save(obj, f):
            _save(obj, f)
            _calls[0] += 1
            if _calls[0] == 3:
                time.sleep(600)
        checkpoint.torch.save = slow_save
    """
    proc = train_process(config, run, prelude=stall)
    wait_for(lambda: (run / "model_0000004.pth").exists() and list(run.glob(".model_0000006.pth.*.tmp")),
             proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model_0000006.pth").exists()  # never renamed: no truncated checkpoint
    resumed = train_process(config, run, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_weights(final_weights(run), reference)


# Every photographic augmentation and large-scale jitter, and an EMA of the weights: all their
# draws come from the seeded sample stream and the EMA is checkpointed, so resume stays exact.
AUGMENT = {"photometric_prob": 0.5, "zoom_out_prob": 0.5, "zoom_out_max": 2.0, "crop_prob": 0.5,
           "scale_jitter": [0.5, 1.5]}
EMA = {"enabled": True, "decay": 0.9, "warmup": 4.0}


def test_kill_9_then_resume_is_exact_with_augmentation_and_ema(shapes_root, tmp_path):
    cfg = with_changes(short_config(shapes_root, max_iter=12, ema=EMA), data={"augment": AUGMENT},
                       solver={"batch_size": 4})  # fmt: skip
    config = write_config(cfg, tmp_path / "augmented.yaml")
    straight = train_process(config, tmp_path / "straight")
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    reference = load_checkpoint(tmp_path / "straight" / "model_final.pth")

    run = tmp_path / "run"
    proc = train_process(config, run)
    wait_for(lambda: (run / "model_0000006.pth").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model_final.pth").exists()
    resumed = train_process(config, run, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    final = load_checkpoint(run / "model_final.pth")
    assert_same_weights(final["model"], reference["model"])
    assert_same_weights(final["model_ema"], reference["model_ema"])
    assert final["ema_updates"] == reference["ema_updates"] == 12


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_exits_cleanly(straight_run, tmp_path, signum, status):
    config, reference = straight_run
    run = tmp_path / "run"
    proc = train_process(config, run)
    wait_for(lambda: (run / "model_0000004.pth").exists(), proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("retina: stopped at iteration") and "--resume" in last
    resumed = train_process(config, run, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_weights(final_weights(run), reference)


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc/*/stat: pid (comm) state ppid ...)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_workers_leave_signals_to_the_trainer(shapes_root, tmp_path, signum, status):
    """Ctrl-C in a terminal, ``pkill -f``, SLURM and ``timeout`` signal the DataLoader workers
    too. A worker killed by the signal made the DataLoader raise ``DataLoader worker ... is
    killed by signal`` inside the step, before the trainer could save. Now the workers ignore
    the signal and keep serving; the trainer's own signal stops the run with a checkpoint."""
    cfg = with_changes(short_config(shapes_root, max_iter=400), data={"num_workers": 2})
    config = write_config(cfg, tmp_path / "workers.yaml")
    run = tmp_path / "run"
    proc = train_process(config, run, new_session=True)
    wait_for(lambda: (run / "model_0000004.pth").exists(), proc)
    workers = children(proc.pid)
    assert len(workers) >= 2, workers  # the two DataLoader workers (and maybe a pin thread's)
    for pid in workers:
        os.kill(pid, signum)
    time.sleep(2.0)
    assert proc.poll() is None, proc.communicate()[1][-500:]  # still training
    os.killpg(proc.pid, signum)  # the whole group, as a terminal's Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("retina: stopped at iteration") and "--resume" in last
    stopped = int(last.split("stopped at iteration ")[1].split(";")[0])
    assert (run / f"model_{stopped:07d}.pth").is_file()


def test_bad_image_in_a_worker_exits_after_its_error(tmp_path):
    """With DataLoader workers (which ignore SIGTERM, above) the bad-image error was printed and
    the process then waited for its workers forever: multiprocessing's exit-time terminate()
    cannot stop them. The loop now shuts its workers down on the way out."""
    root = generate_shapes(tmp_path / "shapes", **TINY_DATA)
    first = json.loads((root / "annotations" / "instances_train.json").read_text())["images"][0]
    (root / "train" / first["file_name"]).write_bytes(b"not a png any more")
    cfg = with_changes(short_config(root, max_iter=8, checkpoint_period=100), data={"num_workers": 1})
    proc = train_process(write_config(cfg, tmp_path / "bad.yaml"), tmp_path / "run")
    try:
        _, err = proc.communicate(timeout=120)  # 8 tiny steps: seconds, unless it hangs
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("retina train did not exit after the bad-image error")
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("retina: error: bad image ") and "checkpoint " in last


def test_log_lines_into_a_closed_pipe_do_not_stop_the_run(tmp_path):
    """``retina train | head``: once head exits, printing raised BrokenPipeError inside the
    training loop. The logger stops echoing; the run goes on."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from retina.engine.logger import TrainLogger
        log = TrainLogger(Path({str(tmp_path / 'run')!r}), 0, 2000)
        for i in range(2000):
            log.write(f"line {{i}}")
            log.log(i + 1, {{"loss": 1.0}})
        Path({str(tmp_path / 'done')!r}).write_text("done")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().decode().endswith(" line 0\n")
    proc.stdout.close()  # the reader goes away, as head does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-800:]
    assert (tmp_path / "done").read_text() == "done" and err == b""
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2000


def test_resume_skips_an_unreadable_newest_checkpoint(shapes_root, tmp_path, capsys):
    cfg = short_config(shapes_root, max_iter=4)
    Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).train()
    final = tmp_path / "run" / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])  # a disk fault truncated it
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", resume=True, quiet=True)
    # periodic checkpoints are written before max_iter only: the one before the final is at 2
    assert trainer.checkpoint_path.name == "model_0000002.pth" and trainer.iteration == 2
    assert "skipping unreadable checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------- finished run
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ")  # 2025-01-31 14:05:09


def files(run: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*")
            if p.is_file()}


def test_resume_of_a_finished_run_leaves_it_as_it_is(shapes_root, tmp_path, capsys):
    config = write_config(short_config(shapes_root, max_iter=2, eval_at_end=True), tmp_path / "c.yaml")
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--out", str(run), "--device", "cpu"]
    assert main(argv) == 0
    log = capsys.readouterr().out.splitlines()
    assert len(log) > 5 and all(TIMESTAMP.match(line) for line in log), log  # every line stamped
    before = files(run)
    metrics = json.loads((run / "metrics.json").read_text())
    # What training writes loads with weights_only=True alone: tensors and plain values.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(run / "model_final.pth") == []

    assert main(argv + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "run already complete" in out and f"metrics: {run / 'metrics.json'}" in out
    assert "training 0 iterations" not in out and "evaluation at iteration" not in out
    assert files(run) == before  # no new weights, metrics row, evaluation, config or tb file

    # A final evaluation that never finished (killed during it) is the one thing still done.
    (run / "metrics.json").unlink()
    assert main(argv + ["--resume"]) == 0
    assert "final evaluation is missing" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert files(run)["model_final.pth"] == before["model_final.pth"]
