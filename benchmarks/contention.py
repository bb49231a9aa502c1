"""How a training step slows down when other CPU-bound processes share the cores, for each way
of setting the torch threads; and ``retina ablate --jobs 2`` against ``--jobs 1`` in total wall time.

    python -m benchmarks.contention                      # the table in docs/speed.md
    python -m benchmarks.contention --variants default passive --loads 0 1 --steps 20

The measured process is ``retina train`` on the default config (``configs/shapes.yaml``, its
images cut to ``--images``), logging every step; its step times are the differences of the
``time`` column of ``metrics.jsonl`` after ``--warmup`` steps. Beside it run 0, 1 or 2 *loads*,
started first and killed after:

- ``train``: the same ``retina train`` into its own folder, with the same variant's environment
  (a second run in another terminal: both are retina, so both take the setting);
- ``busy``: a one-thread Python loop (``while True: pass``), a CPU-bound program that is not retina.

The variants (each one an environment of the measured process and of its ``train`` loads):

- ``default``: what torch chooses (one thread per core) with GNU OpenMP's default wait: spin
  about 300,000 times at a barrier, then sleep;
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads sleep at a barrier instead of spinning;
- ``spin10k``: ``GOMP_SPINCOUNT=10000``: a spin 30 times shorter than the default's, then sleep;
- ``spin1k``: ``GOMP_SPINCOUNT=1000``, what GNU OpenMP spins when it has more threads than CPUs;
- ``one``: ``OMP_NUM_THREADS=1``, whatever the loads;
- ``affinity``: ``OMP_NUM_THREADS`` = the CPUs this process may run on (``os.sched_getaffinity``),
  with the default wait;
- ``free``: ``OMP_NUM_THREADS`` = the cores the loads leave free, at least 1 (known to the
  benchmark; a program would have to guess it), with the default wait;
- ``retina``: no variable set: what the ``retina`` command chooses by itself
  (``retina.cli.share_cores``: ``GOMP_SPINCOUNT=1000``).

With ``--repeats R`` every variant is measured once a round, R rounds, and the table pools
each one's steps. Then the same 4 short runs through ``retina ablate --jobs 1`` and ``--jobs 2``, alone: total wall
time. Run it on a quiet machine: any other work on the cores is one more load in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from retina.io import read_jsonl

CLI = [sys.executable, "-m", "retina"]
BUSY = [sys.executable, "-c", "while True: pass"]
# every variable that picks torch's CPU threads or OpenMP's waiting: cleared, then set per variant
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count`` where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# GNU OpenMP's own wait (spin GOMP_SPINCOUNT=300000 times when OMP_WAIT_POLICY is unset, then
# sleep), written out so that it holds whatever the retina command would choose by itself
OPENMP_DEFAULT = {"GOMP_SPINCOUNT": "300000"}

VARIANTS: dict[str, Callable[[int], dict[str, str]]] = {
    # name -> the variables it sets, given the number of loads beside the measured process
    "default": lambda loads: dict(OPENMP_DEFAULT),
    "passive": lambda loads: {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin10k": lambda loads: {"GOMP_SPINCOUNT": "10000"},
    "spin1k": lambda loads: {"GOMP_SPINCOUNT": "1000"},
    "one": lambda loads: {**OPENMP_DEFAULT, "OMP_NUM_THREADS": "1"},
    "affinity": lambda loads: {**OPENMP_DEFAULT, "OMP_NUM_THREADS": str(cpus())},
    "free": lambda loads: {**OPENMP_DEFAULT, "OMP_NUM_THREADS": str(max(1, cpus() - loads))},
    "retina": lambda loads: {},
}


def variant_env(variant: str, loads: int, base: Optional[dict] = None) -> dict[str, str]:
    """The environment of a process of ``variant`` beside ``loads`` others: ``base`` (default:
    this process's environment) without the thread variables, plus the variant's own."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in THREAD_VARS}
    env.update(VARIANTS[variant](loads))
    return env


def step_times(rows: Sequence[dict], warmup: int) -> list[float]:
    """Seconds per step between consecutive logged rows after iteration ``warmup``: the time
    difference over the iteration difference (a row every step gives each step's time)."""
    timed = sorted((r["iter"], r["time"]) for r in rows if "iter" in r and "time" in r)
    return [(t1 - t0) / (i1 - i0) for (i0, t0), (i1, t1) in zip(timed, timed[1:])
            if i0 >= warmup and i1 > i0]


def train_sets(data_root: Path, images: int, max_iter: int) -> list[str]:
    """The default config's overrides: its data cut to ``images``, a row every step, no
    evaluation and no checkpoint before the end."""
    return [f"solver.max_iter={max_iter}", f"solver.warmup_iters={min(100, max_iter)}",
            "train.log_period=1", "train.eval_at_end=false", f"train.checkpoint_period={max_iter}",
            f"data.root={data_root}", f"data.shapes.num_train={images}", "data.shapes.num_val=8"]


def train_cmd(out: Path, data_root: Path, images: int, max_iter: int) -> list[str]:
    return [*CLI, "train", "--out", str(out), "--set", *train_sets(data_root, images, max_iter)]


def start_loads(kind: str, n: int, env: dict, work: Path, data_root: Path, images: int,
                ready_s: float = 300.0) -> list[subprocess.Popen]:
    """Start ``n`` loads of ``kind`` and return once each is working (a ``train`` load has logged
    its second step)."""
    procs = []
    for i in range(n):
        if kind == "busy":
            procs.append(subprocess.Popen(BUSY, env=env, start_new_session=True))
            continue
        out = work / f"load{i}"
        shutil.rmtree(out, ignore_errors=True)
        procs.append(subprocess.Popen(train_cmd(out, data_root, images, 10**7), env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
    deadline = time.monotonic() + ready_s
    for i, proc in enumerate(procs):
        while kind == "train" and len(read_jsonl(work / f"load{i}" / "metrics.jsonl")) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(procs)
                raise RuntimeError(f"load {i} ({kind}) did not start training (exit {proc.poll()})")
            time.sleep(0.2)
    return procs


def stop(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def measure(variant: str, kind: str, loads: int, work: Path, data_root: Path, images: int,
            warmup: int, steps: int) -> list[float]:
    """Step times of one measured training of ``variant`` beside ``loads`` loads of ``kind``."""
    env = variant_env(variant, loads)
    procs = start_loads(kind, loads, env, work, data_root, images) if loads else []
    out = work / "measured"
    shutil.rmtree(out, ignore_errors=True)
    try:
        proc = subprocess.run(train_cmd(out, data_root, images, warmup + steps), env=env,
                              capture_output=True, text=True)
    finally:
        stop(procs)
    if proc.returncode != 0:
        raise RuntimeError(f"the measured training failed: {proc.stderr.strip().splitlines()[-1:]}")
    return step_times(read_jsonl(out / "metrics.jsonl"), warmup)


def ablate_wall(jobs: int, work: Path, data_root: Path, images: int, runs: int, iters: int) -> float:
    """Wall seconds of ``retina ablate --jobs J`` over ``runs`` trainings of ``iters`` steps."""
    out = work / f"ablate_j{jobs}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*CLI, "ablate", "--config", "shapes", "--out", str(out), "--jobs", str(jobs),
           "--grid", "train.seed=" + ",".join(str(s) for s in range(runs)),
           "--set", *train_sets(data_root, images, iters), "train.eval_at_end=true"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=variant_env("retina", 0), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"retina ablate --jobs {jobs} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return wall


def summary(times: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(times), min(times), max(times)


def format_table(results: dict[tuple[str, str, int], list[float]]) -> str:
    """Markdown: one row per (variant, load kind, loads) with the median step, its range, and
    its ratio to the same variant alone and to the default alone."""
    alone = {v: statistics.median(t) for (v, _, n), t in results.items() if n == 0}
    ref = alone.get("default")
    lines = ["| variant | beside | median s/step | min-max | x alone | x default alone |",
             "|---|---|---:|---:|---:|---:|"]
    for (variant, kind, n), times in results.items():
        med, lo, hi = summary(times)
        beside = "nothing" if n == 0 else f"{n} {kind}"
        own = f"{med / alone[variant]:.2f}" if variant in alone else "-"
        dflt = f"{med / ref:.2f}" if ref else "-"
        lines.append(f"| {variant} | {beside} | {med:.3f} | {lo:.3f}-{hi:.3f} | {own} | {dflt} |")
    return "\n".join(lines)


def platform_facts() -> str:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "?"
    import torch  # only for its version and its default thread count

    return (f"{model}; {os.cpu_count()} CPUs, {cpus()} in this process's affinity; {isa}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads by default here")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   default=list(VARIANTS))
    p.add_argument("--loads", nargs="+", type=int, default=[0, 1, 2], help="loads beside the measured run")
    p.add_argument("--kinds", nargs="+", choices=["train", "busy"], default=["train", "busy"])
    p.add_argument("--steps", type=int, default=20, help="timed steps of each measured run")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over every variant; the table pools each one's steps over the rounds")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing starts")
    p.add_argument("--images", type=int, default=200, help="training images (the shapes set, cut)")
    p.add_argument("--ablate-runs", type=int, default=4, help="runs of the ablate comparison (0: skip it)")
    p.add_argument("--ablate-iters", type=int, default=150, help="steps of each ablate run")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--json", help="also write every step time here")
    a = p.parse_args(argv)
    if a.steps < 2 or a.warmup < 1 or a.repeats < 1 or any(n < 0 for n in a.loads):
        p.error("--steps must be >= 2, --warmup >= 1, --repeats >= 1 and --loads >= 0")
    work = Path(a.work or tempfile.mkdtemp(prefix="retina-contention-"))
    data_root = work / f"data{a.images}"  # a set of another size is never reused
    print(platform_facts(), flush=True)
    try:
        # generate the images once, so that no measured run or load spends its time on it
        shutil.rmtree(work / "prime", ignore_errors=True)
        prime = subprocess.run(train_cmd(work / "prime", data_root, a.images, 1),
                               capture_output=True, text=True, env=variant_env("retina", 0))
        if prime.returncode != 0:
            raise RuntimeError(f"the first training failed: {prime.stderr.strip().splitlines()[-1:]}")
        results: dict[tuple[str, str, int], list[float]] = {}
        for round in range(a.repeats):  # every variant once a round: drift of the machine is shared
            done = set()
            for variant in a.variants:
                for kind in a.kinds:
                    for n in a.loads:
                        key = (variant, "-" if n == 0 else kind, n)
                        if key in done:  # alone: one measurement whatever the load kinds
                            continue
                        done.add(key)
                        times = measure(variant, kind, n, work, data_root, a.images, a.warmup, a.steps)
                        results.setdefault(key, []).extend(times)
                        med, lo, hi = summary(times)
                        print(f"round {round + 1}: {variant:9s} beside {n} {kind:5s}: {med:.3f} s/step "
                              f"({lo:.3f}-{hi:.3f})", flush=True)
        print("\n" + format_table(results))
        walls = {}
        if a.ablate_runs:
            for jobs in (1, 2):
                walls[jobs] = ablate_wall(jobs, work, data_root, a.images, a.ablate_runs, a.ablate_iters)
            print(f"\nretina ablate, {a.ablate_runs} runs of {a.ablate_iters} steps: --jobs 1 "
                  f"{walls[1]:.1f} s, --jobs 2 {walls[2]:.1f} s ({walls[2] / walls[1]:.2f}x)")
        if a.json:
            Path(a.json).write_text(json.dumps({
                "platform": platform_facts(), "ablate_wall_s": walls,
                "steps": [{"variant": v, "kind": k, "loads": n, "times_s": t}
                          for (v, k, n), t in results.items()]}, indent=1))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
