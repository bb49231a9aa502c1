"""Training telemetry: a line per log period on stdout (a tqdm bar instead on a terminal),
TensorBoard scalars and ``metrics.jsonl`` in the run directory. Only the main process logs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class TrainLogger:
    def __init__(self, run_dir: Path, start_iter: int, max_iter: int, enabled: bool = True,
                 echo: bool = True) -> None:
        """``enabled``: write anything at all (the main process); ``echo``: also print."""
        self.enabled, self.echo = enabled, echo
        self.max_iter = max_iter
        self.last_iter, self.last_time = start_iter, time.perf_counter()
        self.bar: Optional[tqdm] = None
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow to import

        run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(run_dir / "tb"))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if echo and sys.stderr.isatty():
            self.bar = tqdm(total=max_iter, initial=start_iter, desc="train", dynamic_ncols=True)

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        """Record scalars after ``iteration`` iterations (1-based count of finished steps)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        sec_per_iter = (now - self.last_time) / max(iteration - self.last_iter, 1)
        self.last_iter, self.last_time = iteration, now
        scalars = dict(scalars, sec_per_iter=sec_per_iter)
        for k, v in scalars.items():
            self.writer.add_scalar(k if "/" in k else f"train/{k}", v, iteration)
        self.jsonl.write(json.dumps({"iter": iteration, **scalars}) + "\n")
        self.jsonl.flush()
        eta = format_seconds(sec_per_iter * (self.max_iter - iteration))
        short = {k: v for k, v in scalars.items() if not k.startswith("time/") and k != "sec_per_iter"}
        text = " ".join(f"{k} {v:.4g}" for k, v in short.items())
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)
            self.bar.set_postfix_str(f"{text} eta {eta}", refresh=True)
        elif self.echo:
            print(f"iter {iteration}/{self.max_iter} {text} {sec_per_iter:.3f} s/it eta {eta}", flush=True)

    def write(self, line: str) -> None:
        if not (self.enabled and self.echo):
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def add_scalars(self, iteration: int, scalars: dict[str, float]) -> None:
        if self.enabled:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, iteration)
            self.jsonl.write(json.dumps({"iter": iteration, **scalars}) + "\n")
            self.jsonl.flush()

    def add_image(self, tag: str, image, iteration: int) -> None:
        """A uint8 (3, H, W) image in TensorBoard."""
        if self.enabled:
            self.writer.add_image(tag, image, iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
