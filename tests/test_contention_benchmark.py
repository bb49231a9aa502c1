"""The contention benchmark's parts (step times from log rows, each variant's environment, the
table's ratios) on hand-made values, and the harness end to end at a tiny size (benchmarks are
not tests: no timing is checked, only that the script runs and reports what it promises)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import contention as ct

ROOT = Path(__file__).resolve().parents[1]


def test_step_times_are_time_differences_over_iteration_differences_after_warmup():
    rows = [{"iter": 1, "time": 100.0}, {"iter": 2, "time": 100.5}, {"iter": 3, "time": 101.5},
            {"iter": 5, "time": 102.5}, {"iter": 4, "time": 102.0}, {"lr": 0.1}]
    # sorted by iteration: 1@100, 2@100.5, 3@101.5, 4@102, 5@102.5; warmup 2 keeps steps 2->3 ...
    assert ct.step_times(rows, warmup=2) == [1.0, 0.5, 0.5]
    rows = [{"iter": 10, "time": 0.0}, {"iter": 20, "time": 3.0}, {"iter": 30, "time": 4.0}]
    assert ct.step_times(rows, warmup=1) == pytest.approx([0.3, 0.1])  # a row every 10 steps


def test_each_variant_replaces_every_thread_variable(monkeypatch):
    monkeypatch.setattr(ct, "cpus", lambda: 4)
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE",
            "GOMP_SPINCOUNT": "1", "MKL_NUM_THREADS": "7"}
    assert ct.variant_env("retina", 2, base) == {"PATH": "/bin"}
    assert ct.variant_env("passive", 2, base) == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert ct.variant_env("default", 2, base) == {"PATH": "/bin", "GOMP_SPINCOUNT": "300000"}
    assert ct.variant_env("spin10k", 2, base) == {"PATH": "/bin", "GOMP_SPINCOUNT": "10000"}
    assert ct.variant_env("affinity", 2, base) == {"PATH": "/bin", "OMP_NUM_THREADS": "4",
                                                   "GOMP_SPINCOUNT": "300000"}
    assert ct.variant_env("free", 1, base)["OMP_NUM_THREADS"] == "3"  # 4 CPUs, 1 load
    assert ct.variant_env("free", 9, base)["OMP_NUM_THREADS"] == "1"  # never 0


def test_table_gives_ratios_to_the_variant_alone_and_to_the_default_alone():
    results = {("default", "-", 0): [0.2, 0.1, 0.3],  # median 0.2
               ("default", "busy", 1): [1.0, 1.2, 0.8],  # median 1.0: 5x
               ("passive", "-", 0): [0.25],
               ("passive", "train", 1): [0.5]}
    rows = ct.format_table(results).splitlines()[2:]
    assert rows[0] == "| default | nothing | 0.200 | 0.100-0.300 | 1.00 | 1.00 |"
    assert rows[1] == "| default | 1 busy | 1.000 | 0.800-1.200 | 5.00 | 5.00 |"
    assert rows[2] == "| passive | nothing | 0.250 | 0.250-0.250 | 1.00 | 1.25 |"
    assert rows[3] == "| passive | 1 train | 0.500 | 0.500-0.500 | 2.00 | 2.50 |"


def test_busy_loads_run_until_stopped(tmp_path):
    procs = ct.start_loads("busy", 2, ct.variant_env("retina", 0), tmp_path, tmp_path, 8)
    try:
        time.sleep(0.3)
        assert [p.poll() for p in procs] == [None, None]
    finally:
        ct.stop(procs)
    assert all(p.returncode is not None for p in procs)


def test_benchmark_runs_end_to_end_and_writes_every_step(tmp_path):
    out = tmp_path / "contention.json"
    cmd = [sys.executable, "-m", "benchmarks.contention", "--variants", "retina", "--loads", "0",
           "1", "--kinds", "busy", "--steps", "2", "--warmup", "1", "--images", "8", "--repeats", "2",
           "--ablate-runs", "2", "--ablate-iters", "2", "--work", str(tmp_path / "work"),
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [(r["variant"], r["kind"], r["loads"]) for r in result["steps"]] == [
        ("retina", "-", 0), ("retina", "busy", 1)]
    # 2 rounds of 2 timed steps each, pooled
    assert all(len(r["times_s"]) == 4 and min(r["times_s"]) > 0 for r in result["steps"])
    assert proc.stdout.count("round 2: retina") == 2
    assert set(result["ablate_wall_s"]) == {"1", "2"}
    assert "| retina | 1 busy |" in proc.stdout and "--jobs 2" in proc.stdout
    # every ablate run trained and was scored
    for jobs in (1, 2):
        assert len(list((tmp_path / "work" / f"ablate_j{jobs}").glob("*/metrics.json"))) == 2
