"""DDP on the CPU with gloo, launched by torchrun exactly as users launch it: replicas stay
identical, the result matches one process with the same global batch, and the sharded evaluation
gives the metrics of a single-process evaluation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from retina.config import config_to_dict
from retina.data import build_dataset, generate_shapes
from retina.engine.checkpoint import load_checkpoint, load_model
from retina.engine.evaluate import evaluate
from retina.engine.train import Trainer
from tinyrun import TINY_DATA, tiny_config

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    root = tmp / "shapes"
    generate_shapes(root, **TINY_DATA)
    # SGD and FrozenBatchNorm: BatchNorm statistics would differ by construction between one
    # process with 8 images and 2 with 4 each; GroupNorm heads are per image.
    cfg = tiny_config(root, model={"backbone": {"norm": "frozen_bn"}},
                      solver={"optimizer": "sgd", "lr": 0.01, "max_iter": 6, "warmup_iters": 0},
                      train={"checkpoint_period": 3, "log_period": 2})
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
         "127.0.0.1", "--master-port", str(free_port()), "-m", "retina", "train", "--config",
         str(config), "--out", str(tmp / "ddp"), "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    Trainer(cfg, tmp / "single", device="cpu", quiet=True).train()
    return tmp


def test_replicas_identical(runs):
    ckpt = load_checkpoint(runs / "ddp" / "model_final.pth")
    assert ckpt["world_size"] == 2
    fingerprints = ckpt["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]


def test_matches_single_process_with_same_global_batch(runs):
    ddp = load_checkpoint(runs / "ddp" / "model_final.pth")["model"]
    single = load_checkpoint(runs / "single" / "model_final.pth")["model"]
    # Same images, same augmentation, same normaliser (positives averaged over ranks) and
    # gradients averaged by DDP: only the order of float32 sums differs. Measured after 6 SGD
    # steps: max abs difference 1.9e-8; atol 1e-5 leaves a 500x margin and still catches a
    # wrong normaliser (a 2x error in the gradient moves weights by ~lr * grad >> 1e-5).
    for k in single:
        if single[k].is_floating_point():
            torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)


def test_sharded_evaluation_equals_single_process(runs):
    ddp_metrics = json.loads((runs / "ddp" / "metrics.json").read_text())
    model, cfg, _, _ = load_model(runs / "ddp" / "model_final.pth", "cpu")
    single = evaluate(model, build_dataset(cfg, "val"), cfg.eval.batch_size, "cpu", progress=False,
                      num_workers=0)
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert ddp_metrics[name] == pytest.approx(single[name], abs=0.01), name


def _empty_rank_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from retina.model import build_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    cfg = tiny_config(Path(out_dir), model={"num_classes": 3})
    model = DistributedDataParallel(build_model(cfg).train())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    if rank == 0:
        targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([2])}] * 2
    else:  # this rank's batch holds only empty images
        targets = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}] * 2
    for _ in range(2):
        losses = model(images, targets)
        opt.zero_grad()
        sum(v for k, v in losses.items() if k.startswith("loss_")).backward()  # num_pos is logged, not a loss
        opt.step()
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    torch.save(sums, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_rank_with_only_empty_images_does_not_hang(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_empty_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):  # False while a process is still running
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP step with an all-empty rank did not finish in 240 s")
    # Every parameter took part on both ranks (else DDP would have hung or raised), and the
    # replicas stayed identical.
    torch.testing.assert_close(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"),
                               rtol=0, atol=0)
