"""Optimizer groups, the lr schedule and the resumable sample stream, with hand values; the
training log's timestamps and its early progress lines."""

from __future__ import annotations

import itertools
import json
import math
import re
import time

import pytest
import torch
from torch import nn

from retina.config import SolverConfig
from retina.engine.budget import TimeBudget
from retina.engine.logger import TrainLogger, early_progress
from retina.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from retina.data.sampler import SeededDataset, TrainSampler


def test_lr_factor_warmup_then_steps():
    cfg = SolverConfig(lr=0.01, max_iter=100, steps=(60, 80), gamma=0.1, warmup_iters=10,
                       warmup_factor=0.001)
    assert lr_factor(cfg, 0) == pytest.approx(0.001)
    # halfway through warmup: 0.001 * (1 - 0.5) + 0.5 = 0.5005
    assert lr_factor(cfg, 5) == pytest.approx(0.5005)
    assert lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 59) == pytest.approx(1.0)
    assert lr_factor(cfg, 60) == pytest.approx(0.1)
    assert lr_factor(cfg, 80) == pytest.approx(0.01)


def test_lr_factor_cosine():
    cfg = SolverConfig(max_iter=100, schedule="cosine", warmup_iters=0)
    assert lr_factor(cfg, 0) == pytest.approx(1.0)
    assert lr_factor(cfg, 50) == pytest.approx(0.5)  # 0.5 * (1 + cos(pi / 2))
    assert lr_factor(cfg, 25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cfg, 100) == pytest.approx(0.0)


def test_cosine_ends_where_it_is_told():
    """A time budget moves the schedule's end: the cosine reads ``max_iter`` when it is given."""
    cfg = SolverConfig(max_iter=100, schedule="cosine", warmup_iters=0)
    assert lr_factor(cfg, 5, max_iter=10) == pytest.approx(0.5)  # halfway to 10, not to 100
    assert lr_factor(cfg, 10, max_iter=10) == pytest.approx(0.0)
    opt = build_optimizer(cfg, nn.Linear(2, 2))
    sched = build_scheduler(cfg, opt)
    sched.set_horizon(10)  # read at the next step
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr)
    opt.step()
    sched.step()  # iteration 1 of 10: 0.5 (1 + cos(pi / 10))
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.5 * (1 + math.cos(math.pi / 10)))
    sched.set_horizon(4)
    opt.step()
    sched.step()  # iteration 2, the end moved to 4: 0.5 (1 + cos(pi / 2)) = 0.5
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.5)
    # the horizon is not state: a resumed schedule continues from the iteration alone
    state = sched.state_dict()
    assert state["last_epoch"] == 2 and "max_iter" not in state and "cfg" not in state
    again = build_scheduler(cfg, build_optimizer(cfg, nn.Linear(2, 2)))
    again.load_state_dict(state)
    assert again.last_epoch == 2 and again.max_iter == 100


def test_schedule_reads_a_lambda_lr_state():
    """Checkpoints written with a LambdaLR schedule resume into LrSchedule at the same lrs."""
    cfg = SolverConfig(lr=0.013, max_iter=100, schedule="cosine", warmup_iters=10)
    lambda_opt = build_optimizer(cfg, nn.Linear(2, 2))
    lambda_sched = torch.optim.lr_scheduler.LambdaLR(lambda_opt, lambda it: lr_factor(cfg, it))
    for _ in range(30):
        lambda_opt.step()
        lambda_sched.step()
    opt = build_optimizer(cfg, nn.Linear(2, 2))
    opt.load_state_dict(lambda_opt.state_dict())
    sched = build_scheduler(cfg, opt)
    sched.load_state_dict(lambda_sched.state_dict())
    for _ in range(5):  # iterations 31..35, past the warmup: cosine of it / 100
        lambda_opt.step()
        lambda_sched.step()
        opt.step()
        sched.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in lambda_opt.param_groups]
    assert sched.last_epoch == 35
    assert opt.param_groups[0]["lr"] == pytest.approx(0.013 * 0.5 * (1 + math.cos(math.pi * 35 / 100)))


def test_time_budget_horizon_by_hand():
    budget = TimeBudget(seconds=100.0, max_iter=1000, settle=2)
    assert budget.limited and math.isnan(budget.pace)
    assert budget.horizon(0) == 1000  # nothing measured: the cap
    budget.add(5.0)
    budget.add(5.0)  # settling: counted as spent, not in the pace
    assert budget.spent == 10.0 and budget.horizon(2) == 1000
    budget.add(2.0)
    budget.add(4.0)  # pace (2 + 4) / 2 = 3 s; 84 s left: 28 more iterations
    assert budget.pace == pytest.approx(3.0) and budget.horizon(4) == 4 + 28
    assert TimeBudget(100.0, 20, settle=0, spent=16.0, _timed_iters=2, _timed_seconds=6.0).horizon(4) == 20
    budget.add(83.0)  # 99 s spent, pace 89 / 3: less than one iteration left, the run ends here
    assert budget.horizon(5) == 5
    # A resumed run: the checkpoint's pace until this process has settled.
    resumed = TimeBudget(seconds=100.0, max_iter=1000, settle=2)
    resumed.load_state_dict({"spent": 50.0, "pace": 2.5})
    assert resumed.horizon(10) == 10 + 20
    resumed.load_state_dict(budget.state_dict())
    assert resumed.spent == 99.0 and resumed.horizon(5) == 5
    unlimited = TimeBudget(seconds=math.inf, max_iter=7)
    unlimited.add(1e6)
    assert not unlimited.limited and unlimited.horizon(3) == 7


def test_scheduler_steps_per_iteration():
    model = nn.Linear(2, 2)
    cfg = SolverConfig(lr=0.1, max_iter=10, steps=(3,), warmup_iters=0)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor([0.1, 0.1, 0.1, 0.01, 0.01]))


def test_no_weight_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.BatchNorm2d(4))
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3])]  # conv weight only
    assert len(no_decay["params"]) == 5  # conv bias, GN weight+bias, BN weight+bias


def test_sampler_epochs_are_permutations():
    stream = list(itertools.islice(iter(TrainSampler(5, seed=3)), 15))
    for epoch in range(3):
        assert sorted(i for i, _ in stream[5 * epoch: 5 * epoch + 5]) == [0, 1, 2, 3, 4]
    assert len({s for _, s in stream}) == 15  # one augmentation seed per position


def test_sampler_resume_continues_the_stream():
    full = list(itertools.islice(iter(TrainSampler(7, seed=1)), 20))
    resumed = list(itertools.islice(iter(TrainSampler(7, seed=1, start=12)), 8))
    assert resumed == full[12:]


def test_sampler_ranks_split_each_global_batch():
    # Global batch of 4 at iteration 2 is positions 8..11; rank r takes positions 8 + r, 10 + r.
    full = list(itertools.islice(iter(TrainSampler(6, seed=0)), 12))
    ranks = [list(itertools.islice(iter(TrainSampler(6, seed=0, start=8, rank=r, world_size=2)), 2))
             for r in range(2)]
    assert ranks[0] == [full[8], full[10]]
    assert ranks[1] == [full[9], full[11]]


def test_seeded_dataset_is_reproducible_and_leaves_global_rng():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.rand(3)

    ds = SeededDataset(Noise())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b, c = ds[(0, 42)], ds[(0, 42)], ds[(0, 43)]
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)


def test_sampler_aspect_groups_make_single_orientation_batches():
    # 7 landscape (group 1) and 5 portrait (group 0) images, global batch 2: each epoch holds
    # 3 landscape + 2 portrait batches = 10 samples; one image of each group waits.
    groups = [1] * 7 + [0] * 5
    sampler = TrainSampler(12, seed=0, groups=groups, batch_size=2)
    assert sampler.epoch_length == 3 * 2 + 2 * 2
    stream = [i for i, _ in itertools.islice(iter(sampler), 40)]
    for b in range(0, 40, 2):
        assert groups[stream[b]] == groups[stream[b + 1]]
    epoch0 = stream[:10]
    assert len(set(epoch0)) == 10  # no image twice within an epoch
    resumed = [i for i, _ in itertools.islice(iter(TrainSampler(12, 0, start=14, groups=groups,
                                                                batch_size=2)), 6)]
    assert resumed == stream[14:20]


def test_sampler_groups_smaller_than_a_batch_fall_back_to_no_grouping():
    sampler = TrainSampler(3, seed=0, groups=[0, 1, 0], batch_size=4)
    assert sampler.epoch_length == 3 and sampler.groups is None


# ----------------------------------------------------------------------------------- logger
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ")  # 2025-01-31 14:05:09


def test_log_lines_start_with_a_timestamp_and_rows_carry_time(tmp_path, capsys):
    start = time.time()
    logger = TrainLogger(tmp_path / "run", start_iter=0, max_iter=20)
    logger.write("training 20 iterations")
    logger.log(10, {"loss": 1.5, "lr": 0.01})
    logger.add_scalars(10, {"val/AP": 12.5})
    logger.write("evaluation at iteration 10:\n AP | AP50\n12.5 | 30.0")  # a table: every line stamped
    logger.close()
    end = time.time()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(TIMESTAMP.match(line) for line in lines), lines
    assert lines[0].endswith(" training 20 iterations") and " iter 10/20 loss 1.5 lr 0.01 " in lines[1]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], "loss" in r, "val/AP" in r) for r in rows] == [(10, True, False), (10, False, True)]
    assert all(isinstance(r["time"], float) and start <= r["time"] <= end for r in rows)
    assert rows[0]["time"] <= rows[1]["time"]


def test_logger_that_records_nothing_writes_no_files(tmp_path, capsys):
    logger = TrainLogger(tmp_path / "run", start_iter=20, max_iter=20)
    logger.write("run already complete")
    logger.close()
    assert not (tmp_path / "run").exists()
    assert TIMESTAMP.match(capsys.readouterr().out)


def test_early_progress_lines_before_the_first_log_period():
    # log_period 50 from iteration 0: steps 1, 2, 4, 8, 16, 32 (powers of two below 50)
    assert [i for i in range(1, 120) if early_progress(i, 0, 50)] == [1, 2, 4, 8, 16, 32]
    # resumed at 37: its 1st, 2nd, 4th, 8th steps (38, 39, 41, 45) until 50
    assert [i for i in range(38, 120) if early_progress(i, 37, 50)] == [38, 39, 41, 45]
    assert not any(early_progress(i, 0, 1) for i in range(1, 10))  # every step is logged anyway


def test_progress_line_prints_without_a_row(tmp_path, capsys):
    logger = TrainLogger(tmp_path / "run", start_iter=0, max_iter=50)
    logger.log(1, {"loss": 2.0}, record=False)
    logger.set_horizon(40)  # a time budget moved the end
    logger.log(2, {"loss": 1.5}, record=False)
    logger.log(10, {"loss": 1.0})
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(TIMESTAMP.match(line) for line in lines), lines
    assert " iter 1/50 loss 2 " in lines[0] and " iter 2/40 loss 1.5 " in lines[1]
    assert all(re.search(r" \d+\.\d{3} s/it eta \d+:\d\d$", line) for line in lines), lines
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["loss"]) for r in rows] == [(10, 1.0)]
