"""Training telemetry: a line per log period on stdout (a tqdm bar instead on a terminal),
TensorBoard scalars and ``metrics.jsonl`` in the run directory. Only the main process logs.
``LoggingHandler`` routes ``logging`` records (the data pipeline's warnings) into the same log.

Every printed line starts with the local time (``2025-01-31 14:05:09 iter 20/250 ...``,
``retina.log.timestamp``); every ``metrics.jsonl`` row has ``iter`` and ``time`` (unix seconds,
float). The files are opened on the first record, so a run that records nothing (a finished run
resumed) touches none of them. ``log(..., record=False)`` prints a progress line without a row
(the first iterations' progress, before the first log period ends)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from retina.log import stamped


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def early_progress(iteration: int, start: int, log_period: int) -> bool:
    """Whether ``iteration`` prints a progress line (``log(..., record=False)``) although no log
    period ends there: the 1st, 2nd, 4th, 8th ... iteration of this process (which started at
    ``start``) until its first log period ends. A slow machine then shows its pace and ETA after
    a step or two, not after ``log_period`` steps (minutes of silence)."""
    done = iteration - start
    return done > 0 and done & (done - 1) == 0 and iteration < (start // log_period + 1) * log_period


class TrainLogger:
    def __init__(self, run_dir: Path, start_iter: int, max_iter: int, enabled: bool = True,
                 echo: bool = True) -> None:
        """``enabled``: write anything at all (the main process); ``echo``: also print;
        ``max_iter``: where the run ends, until ``set_horizon`` moves it."""
        self.enabled, self.echo = enabled, echo
        self.max_iter = max_iter
        self.run_dir, self.start_iter = run_dir, start_iter
        self.last_iter, self.last_time = start_iter, time.perf_counter()
        self.bar: Optional[tqdm] = None
        self.writer = None
        self.jsonl = None

    def _open(self) -> None:
        """Open TensorBoard, metrics.jsonl and the progress bar at the first record."""
        if self.writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow to import

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if self.echo and sys.stderr.isatty():
            self.bar = tqdm(total=self.max_iter, initial=self.start_iter, desc="train", dynamic_ncols=True)

    def set_horizon(self, max_iter: int) -> None:
        """Where the run ends now (a time budget moves it: ``retina.engine.budget``)."""
        self.max_iter = max_iter

    def _record(self, iteration: int, scalars: dict[str, float]) -> None:
        """One metrics.jsonl row: ``iter``, ``time`` (unix seconds), then the scalars."""
        self.jsonl.write(json.dumps({"iter": iteration, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()

    def log(self, iteration: int, scalars: dict[str, float], record: bool = True) -> None:
        """Print and record scalars after ``iteration`` iterations (1-based count of finished
        steps). ``record=False``: print only; the pace and the next record still count from the
        last record."""
        if not self.enabled:
            return
        self._open()
        now = time.perf_counter()
        sec_per_iter = (now - self.last_time) / max(iteration - self.last_iter, 1)
        scalars = dict(scalars, sec_per_iter=sec_per_iter)
        if record:
            self.last_iter, self.last_time = iteration, now
            for k, v in scalars.items():
                self.writer.add_scalar(k if "/" in k else f"train/{k}", v, iteration)
            self._record(iteration, scalars)
        eta = format_seconds(sec_per_iter * (self.max_iter - iteration))
        short = {k: v for k, v in scalars.items() if not k.startswith("time/") and k != "sec_per_iter"}
        text = " ".join(f"{k} {v:.4g}" for k, v in short.items())
        if self.bar is not None:
            self.bar.total = self.max_iter  # a time budget moves the end (retina.engine.budget)
            self.bar.update(iteration - self.bar.n)
            self.bar.set_postfix_str(f"{text} eta {eta}", refresh=True)
        elif self.echo:
            self._print(stamped(f"iter {iteration}/{self.max_iter} {text} {sec_per_iter:.3f} s/it eta {eta}"))

    def write(self, line: str) -> None:
        """Print ``line`` (above the progress bar, if any), each of its lines after a timestamp."""
        if not (self.enabled and self.echo):
            return
        line = stamped(line)
        if self.bar is not None:
            self.bar.write(line)
        else:
            self._print(line)

    def _print(self, line: str) -> None:
        """Print, or stop printing when stdout's reader has gone (``retina train | head``): the
        run goes on, its log is in metrics.jsonl and TensorBoard."""
        try:
            print(line, flush=True)
        except BrokenPipeError:
            self.echo = False
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit's flush must not fail

    def add_scalars(self, iteration: int, scalars: dict[str, float]) -> None:
        if self.enabled:
            self._open()
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, iteration)
            self._record(iteration, scalars)

    def add_image(self, tag: str, image, iteration: int) -> None:
        """A uint8 (3, H, W) image in TensorBoard."""
        if self.enabled:
            self._open()
            self.writer.add_image(tag, image, iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


@dataclass
class LogWindow:
    """The steps since the last log record: loss terms summed as tensors (no host sync), their
    count, and the seconds spent waiting for data and in the step."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    data_time: float = 0.0
    step_time: float = 0.0

    def add(self, losses: dict[str, torch.Tensor], data_time: float, step_time: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.count += 1
        self.data_time, self.step_time = self.data_time + data_time, self.step_time + step_time


class LoggingHandler(logging.Handler):
    """Routes ``logging`` records (the data pipeline's) into the run's log."""

    def __init__(self, logger: TrainLogger) -> None:
        super().__init__(logging.WARNING)
        self.train_logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        self.train_logger.write(self.format(record))
