"""``retina ablate``: train every combination of a grid of config overrides, then tabulate.

A grid is ``key=v1,v2,...``: the values are split on commas outside brackets, braces and quotes,
and each is a YAML value read as ``--set`` reads it (YAML 1.2: ``null``, ``0.25``, ``ohem``,
``[96]``). So a list-valued key takes bracketed values: ``model.input.min_size=[96],[128]`` is
two runs, ``model.input.min_size=[96,128],[128]`` is two runs as well (the first multi-scale).
Several grids multiply, the first varying slowest. A config may also hold the grid, in an
``ablate:`` section that training ignores (``retina/config/loader.py`` drops it)::

    ablate:
      grids:   # each entry one product of keys; the sweep is their union, in this order
        - {loss.gamma: [0, 1, 2], loss.alpha: [0.25, 0.75]}
        - {loss.type: [ohem], loss.gamma: [0], loss.alpha: [null]}
      seeds: 3  # optional: every combination with train.seed = 0, 1, 2

``--grid`` on the command line replaces the file's grids, ``--seeds N`` (or a ``--grid`` over
``train.seed``) its seeds. With seeds, every combination runs N times with the override
``train.seed=S`` (S = 0..N-1) added last, named
``...,seed=S``; seed 0 of every combination runs first, then seed 1, ..., so a sweep stopped
halfway has every setting at seed 0. Each combination trains in ``OUT/<name>/`` (name: ``gamma=0.5,alpha=0.25``, from the grid's keys and values), with
its resolved ``config.yaml``, ``metrics.jsonl``, ``metrics.json`` and ``ablate_run.json`` (the
overrides, wall time and status). Re-running skips runs that have ``metrics.json`` and resumes
those that have a checkpoint; a run that failed (e.g. diverged) is tried again; so a long sweep
can be run in parts (stop it, start it again), one sweep at a time per folder (a second
``retina ablate`` on it is refused while one runs: ``retina.io.lock_dir``). The tables and the plot come from
``retina/studies/report.py`` (mean +- std over seeds) and are rebuilt from the run directories alone.
Parsing the grids and naming the runs is ``grid.py``'s; this module plans and runs the sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from retina.config import ConfigError, load_config
from retina.io import lock_dir, write_json
from retina.studies.grid import check_seeds, expand_grid, grids_from_config, run_name, seeds_from_config
from retina.studies.report import build_report
from retina.studies.runs import SEED_KEY

# expand_grid, grids_from_config and run_name (grid.py) are part of this module's interface too.
__all__ = ["expand_grid", "grids_from_config", "run_name", "plan_sweep", "run_sweep", "build_report", "ablate_cli"]

RUN_FILE = "ablate_run.json"  # per run: overrides, wall time, status


# ------------------------------------------------------------------------------------ sweeps
@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: tuple[str, ...]  # the grid's, after the sweep's --set overrides
    run_dir: Path


def plan_sweep(config_path: str | Path, grids: Sequence[str], sets: Sequence[str],
               out_dir: str | Path, seeds: Optional[int] = None) -> list[SweepRun]:
    """The runs of a sweep, each config checked now so a typo stops it before any training.

    ``grids`` empty: the config's ``ablate: grids:`` (several products, concatenated). ``seeds``
    None: the config's ``ablate: seeds:``, else none (no seed override, names without seed);
    N: every combination with ``train.seed=S`` for S = 0..N-1, seed-major (see the docstring).
    """
    products = [list(grids)] if grids else grids_from_config(config_path)
    combos = [c for product in (products or [[]]) for c in expand_grid(product)]
    sweeps_seed = any(o.partition("=")[0].strip() == SEED_KEY for c in combos for o in c)
    if seeds is None:
        # A --grid that sweeps the seed is more specific than the file's seeds: it replaces them.
        seeds = None if grids and sweeps_seed else seeds_from_config(config_path)
    else:
        check_seeds(seeds, "--seeds")
    if seeds is not None:
        if sweeps_seed:
            raise ConfigError(f"--seeds: the grid already sweeps {SEED_KEY}; give one or the other")
        combos = [[*c, f"{SEED_KEY}={s}"] for s in range(seeds) for c in combos]
    runs, seen = [], {}
    grid_source = "--grid" if grids else f"{config_path}: ablate.grids:"
    for overrides in combos:
        try:
            cfg = load_config(config_path, [*sets, *overrides])
        except ConfigError as e:  # the loader names a grid value as a --set item: name its source
            if not any(str(e).startswith(f"--set {o}:") for o in overrides):
                raise
            raise ConfigError(f"{grid_source} {str(e)[len('--set '):]}") from None
        if not cfg.train.eval_at_end:
            raise ConfigError(f"{config_path}: ablate needs train.eval_at_end=true (the table "
                              f"reads each run's metrics.json)")
        name = run_name(overrides)
        if name in seen and seen[name] != overrides:
            raise ConfigError(f"--grid: {seen[name]} and {overrides} give the same run name {name!r}")
        if name not in seen:
            seen[name] = overrides
            runs.append(SweepRun(name, tuple(overrides), Path(out_dir) / name))
    return runs


def _read_run_file(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_run_file(run: SweepRun, sets: Sequence[str], wall_s: float, status: str,
                    error: Optional[str] = None) -> None:
    previous = _read_run_file(run.run_dir).get("wall_s", 0.0)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    record = {"name": run.name, "overrides": list(run.overrides), "sets": list(sets),
              "wall_s": round(previous + wall_s, 1), "status": status, "error": error}
    write_json(run.run_dir / RUN_FILE, record, indent=1)


def _is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file()


def _has_checkpoint(run_dir: Path) -> bool:
    from retina.engine.checkpoint import last_checkpoint

    return run_dir.is_dir() and last_checkpoint(run_dir) is not None


class _Progress:
    """One line per finished run: ``[k/n] name: AP 41.2 in 1:52 (sweep ETA 7:30)``."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.start, self.trained = time.perf_counter(), 0

    def line(self, name: str, status: str, trained: bool) -> None:
        from retina.engine.logger import format_seconds

        self.done += 1
        self.trained += trained
        left = self.total - self.done
        eta = ""
        if left and self.trained:  # with --jobs J, runs finish J times as often: no / J here
            per_run = (time.perf_counter() - self.start) / self.trained
            eta = f" (sweep ETA {format_seconds(round(per_run * left))})"
        print(f"[{self.done}/{self.total}] {name}: {status}{eta}", flush=True)


def _status_text(run_dir: Path, wall_s: float) -> str:
    from retina.engine.logger import format_seconds

    metrics = json.loads((run_dir / "metrics.json").read_text())
    ap = metrics.get("AP")
    return f"AP {ap:.1f} in {format_seconds(round(wall_s))}" if isinstance(ap, (int, float)) else "done"


class _Ledger:
    """What the sweep records of each run: its status and error (returned by ``run_sweep``), its
    ``ablate_run.json`` and its progress line."""

    def __init__(self, runs: Sequence[SweepRun], sets: Sequence[str]) -> None:
        self.sets = sets
        self.results: dict[str, dict] = {}
        self.progress = _Progress(len(runs))

    def skip(self, run: SweepRun) -> None:
        self.results[run.name] = {"status": "skipped", "error": None}
        self.progress.line(run.name, "finished before, skipped", trained=False)

    def start(self, run: SweepRun, where: str = "") -> bool:
        """Mark ``run`` running and say so; whether it resumes from a checkpoint."""
        resume = _has_checkpoint(run.run_dir)
        _write_run_file(run, self.sets, 0.0, "running")
        print(f"training {run.name}{' (resuming)' if resume else ''} -> {run.run_dir}{where}", flush=True)
        return resume

    def finish(self, run: SweepRun, wall: float, error: Optional[str]) -> None:
        status = "failed" if error else "done"
        _write_run_file(run, self.sets, wall, status, error)
        self.results[run.name] = {"status": status, "error": error}
        total_wall = _read_run_file(run.run_dir).get("wall_s", wall)
        text = f"failed: {error}" if error else _status_text(run.run_dir, total_wall)
        self.progress.line(run.name, text, trained=True)

    def stopped(self, run: SweepRun, wall: float, status: str, error: Optional[str] = None) -> None:
        """``run`` ended by an exception that stops the sweep: its time is kept."""
        _write_run_file(run, self.sets, wall, status, error)


def _train_in_process(run: SweepRun, config_path: Path, sets: Sequence[str], device: str,
                      resume: bool) -> Optional[str]:
    """Train one run here; the error line when it fails (e.g. the loss diverged), so the sweep
    goes on as it does when a subprocess fails. Ctrl-C / SIGTERM (``Interrupted``) stops it."""
    from retina.engine.train import Interrupted, Trainer, TrainingError

    cfg = load_config(config_path, [*sets, *run.overrides])
    try:
        Trainer(cfg, run.run_dir, device, resume=resume, quiet=True).train()
    except Interrupted:
        raise
    except TrainingError as e:
        return " ".join(str(e).split())
    except Exception as e:  # a crash of one run (e.g. a killed DataLoader worker): on to the next
        traceback.print_exc()
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    return None


def _train_here(todo: deque[SweepRun], config_path: Path, ledger: _Ledger, device: str) -> None:
    """Train the runs one after the other in this process."""
    from retina.engine.train import Interrupted

    while todo:
        run = todo.popleft()
        resume = ledger.start(run)
        t0 = time.perf_counter()
        try:
            error = _train_in_process(run, config_path, ledger.sets, device, resume)
        except BaseException as e:  # keep the time spent; on Ctrl-C the trainer saved a checkpoint
            stopped = isinstance(e, (KeyboardInterrupt, Interrupted))
            ledger.stopped(run, time.perf_counter() - t0, "interrupted" if stopped else "failed",
                           None if stopped else f"{type(e).__name__}: {' '.join(str(e).split())}")
            raise
        ledger.finish(run, time.perf_counter() - t0, error)


def _child_env(slot: int, jobs: int, device: str) -> tuple[dict, str]:
    """Environment and --device of the subprocess in ``slot``: CPU threads divided by ``jobs``;
    with GPUs, one per slot (round robin)."""
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = str(slot % torch.cuda.device_count())
            device = "cuda"
    return env, device


def _start_child(run: SweepRun, config_path: Path, sets: Sequence[str], device: str,
                 slot: int, jobs: int, resume: bool) -> subprocess.Popen:
    env, device = _child_env(slot, jobs, device)
    cmd = [sys.executable, "-m", "retina", "train", "--config", str(config_path),
           "--out", str(run.run_dir), "--device", device]
    if resume:
        cmd.append("--resume")
    if sets or run.overrides:
        cmd += ["--set", *sets, *run.overrides]
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run.run_dir / "train.log", "a")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()  # the child holds its own descriptor


def _child_error(run_dir: Path, returncode: int) -> str:
    lines = [ln for ln in (run_dir / "train.log").read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {returncode}"


def _train_in_children(todo: deque[SweepRun], config_path: Path, ledger: _Ledger, device: str,
                       jobs: int) -> None:
    """Train the runs in ``python -m retina train`` subprocesses, ``jobs`` at once."""
    running: dict[int, tuple[subprocess.Popen, SweepRun, float]] = {}
    try:
        while todo or running:
            for slot in range(jobs):
                if slot not in running and todo:
                    run = todo.popleft()
                    resume = ledger.start(run, " (log: train.log)")
                    proc = _start_child(run, config_path, ledger.sets, device, slot, jobs, resume)
                    running[slot] = (proc, run, time.perf_counter())
            time.sleep(0.5)
            for slot, (proc, run, t0) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    error = None if proc.returncode == 0 else _child_error(run.run_dir, proc.returncode)
                    ledger.finish(run, time.perf_counter() - t0, error)
    except BaseException:  # Ctrl-C reached the children too: let them save, keep the times
        for proc, run, t0 in running.values():
            proc.wait()
            ledger.stopped(run, time.perf_counter() - t0, "interrupted")
        raise


def run_sweep(config_path: str | Path, grids: Sequence[str], sets: Sequence[str],
              out_dir: str | Path, jobs: int = 1, device: str = "auto",
              seeds: Optional[int] = None) -> list[dict]:
    """Train every combination not finished yet into ``out_dir/<name>/``.

    ``jobs`` 1 trains in this process; more start ``python -m retina train`` subprocesses, that
    many at once (logs in ``<run>/train.log``), each with ``cpu_count // jobs`` torch threads or,
    with CUDA, its own GPU. Returns one dict per run: ``name``, ``run_dir``, ``overrides``,
    ``status`` (skipped | done | failed) and ``error``.
    """
    config_path, out_dir = Path(config_path), Path(out_dir)
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be >= 1")
    runs = plan_sweep(config_path, grids, sets, out_dir, seeds)
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = _Ledger(runs, sets)
    todo: deque[SweepRun] = deque()
    for run in runs:
        if _is_finished(run.run_dir):
            ledger.skip(run)
        else:
            todo.append(run)
    if jobs == 1:
        _train_here(todo, config_path, ledger, device)
    else:
        _train_in_children(todo, config_path, ledger, device, jobs)
    return [{"name": r.name, "run_dir": str(r.run_dir), "overrides": list(r.overrides), **ledger.results[r.name]}
            for r in runs]


# --------------------------------------------------------------------------------------- CLI
def ablate_cli(config: Optional[str], grids: Sequence[str] = (), sets: Sequence[str] = (),
               out: Optional[str] = None, jobs: int = 1, device: str = "auto",
               report_only: Optional[str] = None, seeds: Optional[int] = None,
               metrics_file: str = "metrics.json") -> int:
    """``retina ablate --config C --grid k=v1,v2 [--grid ...] [--set k=v ...] [--out DIR]
    [--jobs J] [--seeds N]`` (default out: runs/ablate/<config name>), or ``retina ablate
    --report DIR [--metrics FILE]``.
    Errors are ConfigError / TrainingError for the CLI to print; returns the exit status."""
    if report_only is not None:
        paths = build_report(report_only, metrics_file)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    if config is None:
        raise ConfigError("retina ablate needs --config (or --report DIR)")
    from retina.config import find_config

    config_path = find_config(config)
    out_dir = Path(out) if out else Path("runs") / "ablate" / config_path.stem
    t0 = time.perf_counter()
    with lock_dir(out_dir):  # one sweep per folder: a second one is refused while this one runs
        results = run_sweep(config_path, grids, sets, out_dir, jobs, device, seeds)
        paths = build_report(out_dir)
    from retina.engine.logger import format_seconds

    failed = [r["name"] for r in results if r["status"] == "failed"]
    print(f"sweep of {len(results)} runs done in {format_seconds(round(time.perf_counter() - t0))}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0
