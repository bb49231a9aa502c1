"""One process per folder: ``retina.io.lock_dir`` and the commands that take it (``retina train``
on its run directory, ``retina ablate`` on its sweep folder). The holders are real processes: a
child that takes the library lock and says so on stdout, or two ``retina train`` started at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from retina.cli import main
from retina.config import config_to_dict
from retina.data import generate_shapes
from retina.io import LOCK_NAME, DirInUseError, DirLock, lock_dir
from tinyrun import TINY_DATA, tiny_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no flock: folders are not locked")

# Takes the lock on argv[1]; with argv[2] == "fork", forks a child that outlives it (as a
# DataLoader worker outlives a trainer killed with -9). Prints "locked <pid of the forked child>"
# once it holds the lock, and the child prints "forked" once it runs (after the fork handlers),
# then both wait for their stdin to close: no sleep, no polling.
HOLDER = """
import os, sys
from retina.io import lock_dir
lock = lock_dir(sys.argv[1])
worker = os.fork() if sys.argv[2:] == ["fork"] else -1
if worker == 0:
    print("forked", flush=True)
    sys.stdin.read()
    os._exit(0)
print("locked", worker, flush=True)
sys.stdin.read()
lock.release()
"""


def hold(directory: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """A child process holding ``directory``'s lock (stdin.close() lets go); (process, forked pid)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), *extra], env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline().split() for _ in range(2 if extra == ("fork",) else 1)]
    locked = [line for line in lines if line[0] == "locked"]
    assert len(locked) == 1 and len(lines) - 1 == sum(line == ["forked"] for line in lines), lines
    return proc, int(locked[0][1])


def refusal(directory: Path, pid: int) -> str:
    return (f"{directory} is in use: process {pid} holds its lock ({directory / LOCK_NAME}); "
            f"wait for it to end, or choose another --out folder")


def can_lock_elsewhere(directory: Path) -> bool:
    """Whether another process can take ``directory``'s lock now (and let go at once)."""
    code = "import sys; from retina.io import lock_dir; lock_dir(sys.argv[1]).release()"
    return subprocess.run([sys.executable, "-c", code, str(directory)], env=ENV,
                          capture_output=True).returncode == 0


# ------------------------------------------------------------------------------- the library
def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    folder = tmp_path / "run"
    proc, _ = hold(folder)
    assert (folder / LOCK_NAME).read_text() == f"{proc.pid}\n"
    with pytest.raises(DirInUseError) as e:
        lock_dir(folder)
    assert str(e.value) == refusal(folder, proc.pid)
    proc.stdin.close()  # the holder lets go and ends
    assert proc.wait(timeout=30) == 0
    assert not folder.exists()  # the lock file is removed on release, and the folder it made
    with lock_dir(folder):
        assert (folder / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_lock_left_by_kill_9_never_blocks(tmp_path):
    folder = tmp_path / "run"
    proc, _ = hold(folder)
    proc.kill()
    proc.wait()
    assert (folder / LOCK_NAME).read_text() == f"{proc.pid}\n"  # stale: the file stays, the flock went
    with lock_dir(folder):
        assert (folder / LOCK_NAME).read_text() == f"{os.getpid()}\n"  # taken over


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_holder(tmp_path):
    # Without closing the inherited descriptor in forked children, the flock would stay until
    # the last worker ended.
    folder = tmp_path / "run"
    proc, worker = hold(folder, "fork")
    proc.kill()
    proc.wait()
    try:
        os.kill(worker, 0)  # the forked child is still alive (its stdin is the same open pipe)
        with lock_dir(folder):
            pass
    finally:
        os.kill(worker, signal.SIGKILL)


def test_one_process_takes_its_folder_again(tmp_path):
    folder = tmp_path / "run"
    first, second = lock_dir(folder), lock_dir(folder)  # e.g. a Trainer built twice on one folder
    first.release()
    assert not can_lock_elsewhere(folder)  # one hold is left
    second.release()
    second.release()  # a second release of one object does nothing
    assert can_lock_elsewhere(folder)


def test_a_folder_the_lock_made_is_removed_if_nothing_was_written(tmp_path):
    with DirLock(tmp_path / "new"):
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()
    with DirLock(tmp_path / "kept"):
        (tmp_path / "kept" / "a.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["a.txt"]
    (tmp_path / "there").mkdir()
    with DirLock(tmp_path / "there"):
        pass
    assert (tmp_path / "there").is_dir()  # not made by the lock: left as it was


# ---------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, **TINY_DATA)
    return root


def write_config(tmp_path: Path, shapes_root: Path, **train) -> Path:
    cfg = tiny_config(shapes_root, solver={"max_iter": 400, "warmup_iters": 2},
                      train={"checkpoint_period": 2, "log_period": 1, "keep_checkpoints": 1000,
                             "eval_at_end": False, **train})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def train_process(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "retina", "train", "--config", str(config), "--out", str(out),
           "--device", "cpu", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, procs: list[subprocess.Popen], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, [p.poll() for p in procs]
        time.sleep(0.05)


def test_train_into_a_held_run_directory_is_refused(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path, shapes_root)
    proc, _ = hold(run)
    try:
        code = main(["train", "--config", str(config), "--out", str(run), "--device", "cpu"])
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written: no config, no log
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert code == 2
    assert capsys.readouterr().err == f"retina: error: {refusal(run, proc.pid)}\n"


def test_two_trainings_started_together_one_trains_then_kill_9_and_resume(shapes_root, tmp_path, capsys):
    # Both with --resume, as "continue that run" typed twice: whichever sees a checkpoint or
    # not, the one without the lock is refused at its preflight. No checkpoint is pruned
    # (keep_checkpoints), so the refused one never fails for a checkpoint gone under it.
    run = tmp_path / "run"
    config = write_config(tmp_path, shapes_root)
    procs = [train_process(config, run, "--resume") for _ in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), procs)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        _, err = loser.communicate(timeout=30)
        assert loser.returncode == 2, err
        assert err.splitlines()[-1] == f"retina: error: {refusal(run, winner.pid)}"
        assert winner.poll() is None  # still training: exactly one does
        wait_for(lambda: (run / "model_0000002.pth").is_file(), [winner])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # kill -9 of the holder, mid-run
            p.communicate(timeout=30)
    assert winner.returncode == -signal.SIGKILL
    assert (run / LOCK_NAME).read_text() == f"{winner.pid}\n"  # left behind, no longer locked
    # the last line may be cut short by the kill: only whole lines are read
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n")[:-1]]
    iters = [r["iter"] for r in rows if "loss" in r]
    assert iters == list(range(1, len(iters) + 1)) and len(iters) >= 2  # one writer: each iteration once

    last = max(int(p.stem.split("_")[1]) for p in run.glob("model_[0-9]*.pth"))
    code = main(["train", "--resume", "--config", str(config), "--out", str(run), "--device", "cpu",
                 "--set", f"solver.max_iter={last + 1}"])
    assert code == 0, capsys.readouterr().err
    assert (run / "model_final.pth").is_file() and not (run / LOCK_NAME).exists()


def test_a_second_ablate_on_a_held_sweep_folder_is_refused(shapes_root, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    config = write_config(tmp_path, shapes_root, eval_at_end=True)
    proc, _ = hold(sweep)  # as a first `retina ablate` holds it
    try:
        code = main(["ablate", "--config", str(config), "--grid", "loss.gamma=0,1", "--out", str(sweep)])
        assert sorted(p.name for p in sweep.iterdir()) == [LOCK_NAME]  # no run started, no report
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert code == 2
    assert capsys.readouterr().err == f"retina: error: {refusal(sweep, proc.pid)}\n"
