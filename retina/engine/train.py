"""The training loop: data stream -> model -> loss -> optimizer, with checkpoints that hold every
state (model, optimizer, schedule, grad scaler, iteration, RNG, config, classes), so a run resumed
from any checkpoint continues the same stream of batches (``sampler.py``).

Slots for scale-out are built in: ``cfg.train.amp`` picks the autocast dtype (fp16 adds a
GradScaler), and under ``torchrun`` the model is wrapped in DDP with one process per device.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from retina.config import Config, config_to_dict, dump_config, replace
from retina.data import build_dataset, collate
from retina.engine import dist
from retina.engine.checkpoint import (atomic_save, last_checkpoint, load_checkpoint,
                                      prune_checkpoints, rng_state, set_rng_state)
from retina.engine.logger import TrainLogger, format_seconds
from retina.engine.optim import build_optimizer, build_scheduler
from retina.engine.sampler import SeededDataset, TrainSampler
from retina.model import build_model

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """Training cannot go on; the message is one line and names what to do."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``signum`` gives the exit status."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, device: str = "auto", resume: bool = False,
                 quiet: bool = False) -> None:
        self.run_dir = Path(run_dir)
        device_ = resolve_device(device)
        if dist.init_distributed(device_.type) and device_.type == "cuda":
            device_ = torch.device("cuda", torch.cuda.current_device())
        self.device = device_
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        if cfg.solver.batch_size % self.world_size:
            raise TrainingError(f"solver.batch_size={cfg.solver.batch_size} is not divisible by the "
                                f"{self.world_size} processes")
        self.checkpoint_path = self._checkpoint_to_resume(resume)
        if self.checkpoint_path is not None:  # the run's own config wins over the file's
            ckpt = load_checkpoint(self.checkpoint_path)
        seed_everything(cfg.train.seed + self.rank)

        if self.main:  # rank 0 generates the bundled dataset while the others wait
            self.train_set = build_dataset(cfg, "train")
        dist.barrier()
        if not self.main:
            self.train_set = build_dataset(cfg, "train")
        if cfg.model.num_classes != self.train_set.num_classes:
            cfg = replace(cfg, model=dataclasses.replace(cfg.model, num_classes=self.train_set.num_classes))
        self.cfg = cfg
        self.amp_dtype = AMP_DTYPES[cfg.train.amp]

        self.model = build_model(cfg).to(self.device)
        self.optimizer = build_optimizer(cfg.solver, self.model)
        self.scheduler = build_scheduler(cfg.solver, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.iteration = 0
        if self.checkpoint_path is not None:
            self._restore(ckpt)
        self.logger = TrainLogger(self.run_dir, self.iteration, cfg.solver.max_iter,
                                  enabled=self.main, echo=not quiet)
        self.stop_signal: Optional[int] = None

    # ------------------------------------------------------------------------- checkpoints
    def _checkpoint_to_resume(self, resume: bool) -> Optional[Path]:
        found = last_checkpoint(self.run_dir)
        if found is not None and not resume:
            raise TrainingError(f"{self.run_dir} already holds checkpoints ({found.name}); pass "
                                f"--resume to continue that run or --out to start a new one")
        return found

    def _restore(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"{self.checkpoint_path} does not fit this config: {first}") from None
        self.iteration = int(ckpt["iteration"])
        set_rng_state(ckpt["rng"])

    def save(self, name: Optional[str] = None) -> Path:
        path = self.run_dir / (name or f"model_{self.iteration:07d}.pth")
        if self.main:
            atomic_save({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "iteration": self.iteration, "rng": rng_state(), "config": config_to_dict(self.cfg),
                "class_names": list(self.train_set.class_names), "cat_ids": list(self.train_set.cat_ids),
            }, path)
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        dist.barrier()
        return path

    # -------------------------------------------------------------------------------- loop
    def _loader(self) -> DataLoader:
        cfg = self.cfg
        per_rank = cfg.solver.batch_size // self.world_size
        sampler = TrainSampler(len(self.train_set), cfg.train.seed, self.iteration * cfg.solver.batch_size,
                               self.rank, self.world_size)
        workers = cfg.data.num_workers
        return DataLoader(SeededDataset(self.train_set), batch_size=per_rank, sampler=sampler,
                          num_workers=workers, collate_fn=collate, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_signal = signum
        self.logger.write(f"{signal.Signals(signum).name} received: saving a checkpoint after this step")

    def _step(self, model: torch.nn.Module, images: list, targets: list) -> dict[str, torch.Tensor]:
        images = [img.to(self.device, non_blocking=True).float().div_(255) for img in images]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = model(images, targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.solver.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.solver.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return dict(losses, loss=loss)

    def train(self) -> dict:
        """Run to ``solver.max_iter``; save ``model_final.pth``; evaluate; return the metrics."""
        cfg = self.cfg
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        model = self.model
        if self.world_size > 1:
            model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        model.train()
        ds = self.train_set
        self.logger.write(f"train set: {len(ds)} images, {ds.num_classes} classes, "
                          f"{ds.num_degenerate} degenerate boxes dropped (under 1 px or not finite)")
        self.logger.write(f"training {cfg.solver.max_iter - self.iteration} iterations from "
                          f"{self.iteration} on {self.device} x{self.world_size}; run dir {self.run_dir}")
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        start = time.perf_counter()
        try:
            self._loop(model)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        train_seconds = time.perf_counter() - start
        self.save("model_final.pth")
        self.logger.write(f"training done in {format_seconds(train_seconds)}; "
                          f"weights: {self.run_dir / 'model_final.pth'}")
        metrics = self.evaluate() if cfg.train.eval_at_end else {}
        self.logger.close()
        return metrics

    def _loop(self, model: torch.nn.Module) -> None:
        cfg = self.cfg
        data = iter(self._loader())
        sums: dict[str, torch.Tensor] = {}
        count = 0
        while self.iteration < cfg.solver.max_iter:
            try:
                images, targets = next(data)
            except RuntimeError:
                if self.stop_signal is None:
                    raise
            if self.stop_signal is None:
                losses = self._step(model, images, targets)
                self.iteration += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                sums["num_pos"] = sums.get("num_pos", 0) + self.model.loss.last_num_pos.float()
                count += 1
            if self.stop_signal is not None:
                path = self.save()
                raise Interrupted(f"stopped at iteration {self.iteration}; checkpoint {path}; "
                                  f"continue with: retina train --resume --out {self.run_dir}",
                                  self.stop_signal)
            if self.iteration % cfg.train.log_period == 0 or self.iteration == cfg.solver.max_iter:
                self._log(sums, count)
                sums, count = {}, 0
            if self.iteration % cfg.train.checkpoint_period == 0 and self.iteration < cfg.solver.max_iter:
                self.save()

    def _log(self, sums: dict[str, torch.Tensor], count: int) -> None:
        means = {k: float(v) / max(count, 1) for k, v in sums.items()}  # the only sync: once per period
        if not all(math.isfinite(v) for v in means.values()):
            last = last_checkpoint(self.run_dir)
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise TrainingError(f"non-finite loss by iteration {self.iteration} "
                                f"({', '.join(f'{k}={v:.4g}' for k, v in means.items())}); {where}; "
                                f"lower solver.lr or set solver.clip_grad_norm")
        means["lr"] = self.optimizer.param_groups[0]["lr"]
        self.logger.log(self.iteration, means)

    # ------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        """COCO evaluation of the current weights on the val split (main process only)."""
        from retina.engine.evaluate import evaluate, format_metrics_table

        metrics: dict = {}
        if self.main:
            val_set = build_dataset(self.cfg, "val")
            metrics = evaluate(self.model, val_set, self.cfg.eval.batch_size, self.device,
                               out_dir=self.run_dir, amp_dtype=self.amp_dtype,
                               progress=sys.stderr.isatty(), num_workers=self.cfg.data.num_workers)
            self.logger.add_scalars(self.iteration, {f"val/{k}": v for k, v in metrics.items()
                                                     if isinstance(v, float) and math.isfinite(v)})
            self.logger.write(format_metrics_table(metrics))
            self.logger.write(f"metrics: {self.run_dir / 'metrics.json'}")
        dist.barrier()
        return metrics
