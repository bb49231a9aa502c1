"""The benchmark harnesses run end to end at tiny sizes (benchmarks are not tests: no timing is
checked, only that the scripts work and write what they promise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PART_KEYS = {"shape", "ours_s", "theirs_s", "ratio", "ours_cpu_s", "theirs_cpu_s", "cpu_ratio",
             "ours_times_s", "theirs_times_s", "ours_cpu_times_s", "theirs_cpu_times_s",
             "ours_peak_mib", "theirs_peak_mib"}


def test_model_benchmark_tiny_run_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.detector", "--depth", "18", "--image-size", "64x64",
           "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--part-batch-size", "1",
           "--part-image-size", "64x96", "--num-gt", "3", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["parts"]) == {"train", "infer", "loss", "post"}
    for part in result["parts"].values():
        assert set(part) == PART_KEYS
        assert len(part["ours_times_s"]) == 1 and len(part["theirs_times_s"]) == 1
        assert part["ours_s"] > 0 and part["theirs_s"] > 0
        assert part["ratio"] == pytest.approx(part["ours_s"] / part["theirs_s"])
    assert result["spec"]["image_size"] == [64, 64] and result["spec"]["depth"] == 18
    assert "retina.deploy.convert" in result["weights"]  # both models hold torchvision's random init
    assert {"device", "torch", "torchvision", "config", "memory_measure"} <= set(result)
    for part in ("train", "infer", "loss", "post"):  # one table row per part
        assert any(line.startswith(part) for line in proc.stdout.splitlines()), proc.stdout


def test_only_selects_parts():
    from benchmarks.detector import BenchSpec, run

    spec = BenchSpec(depth=18, parts=("post",), repeats=1, warmup=0, part_batch_size=1,
                     part_image_size=(64, 64))
    result = run(spec, log=lambda s: None)
    assert list(result["parts"]) == ["post"]
    assert result["parts"]["post"]["shape"] == "N=1 R=774 K=80"  # 9 x (8^2 + 4^2 + 2^2 + 1 + 1)


def test_eval_benchmark_tiny_run(tmp_path):
    pytest.importorskip("faster_coco_eval")
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "benchmarks.eval_backends", "--images", "20", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["num_images"] == 20 and result["num_detections"] == 20 * 100
    # the same metrics up to floating-point summation order (percent units)
    assert result["max_metric_diff"] < 1e-9 and result["max_per_class_diff"] < 1e-9
    assert "speedup" in proc.stdout


def test_benchmarked_model_keeps_the_requested_size_whatever_the_config_tests_at():
    # photos_cpu evaluates at 320 (test_min_size): the benchmark's 200 x 300 must stay 200 x 300
    import torch

    from benchmarks.inference import InferenceSpec, _models

    model, _, _ = _models(InferenceSpec(model="config", config="photos_cpu", image_size=(200, 300)))
    assert model.eval_size == (200, 300)
    assert model.preprocess([torch.rand(3, 200, 300)])[1] == [(200, 300)]
