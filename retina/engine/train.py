"""The training loop: data stream -> model -> loss -> optimizer, with checkpoints that hold every
state (model, its EMA, optimizer, schedule, grad scaler, iteration, RNG, config, classes, best AP),
so a run resumed from any checkpoint continues the same stream of batches (``sampler.py``).

A new run starts from ``model.init`` when given (``init.py``: every tensor of that checkpoint that
fits); with ``train.ema`` an average of the weights (``ema.py``) is updated after every step and
is what periodic and final evaluations score and ``model_final.pth`` deploys (``model_ema``).

``cfg.train.amp`` picks the autocast dtype (``precision.py``; fp16 adds a GradScaler); under
``torchrun`` the model is wrapped in DDP, one process per device, and every decision to stop is
reduced over ranks so all stop together. One host sync per step checks that the loss and
gradient norm are finite.
"""

from __future__ import annotations

import dataclasses
import logging
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

from retina.config import Config, config_changes, config_to_dict, dump_config, replace
from retina.data import build_dataset, collate
from retina.data.sampler import train_stream
from retina.engine import dist
from retina.engine.budget import TimeBudget
from retina.engine.checkpoint import (CheckpointError, UnsafeCheckpointError, last_checkpoint,
                                      list_checkpoints, load_checkpoint, prune_checkpoints, rng_state,
                                      save_checkpoint, set_rng_state)
from retina.engine.ema import build_ema, ema_state, load_ema_state
from retina.engine.evaluate import check_backend, check_same_classes
from retina.engine.init import load_init
from retina.engine.logger import LoggingHandler, TrainLogger, format_seconds
from retina.engine.optim import build_optimizer, build_scheduler
from retina.engine.precision import autocast_dtype
from retina.engine.preflight import check_run_dir, worker_error_line
from retina.engine.validation import Validator
from retina.errors import RetinaError
from retina.io import lock_dir, read_json
from retina.model import build_model


class TrainingError(RetinaError, RuntimeError):
    """Training cannot go on; the message is one line and names what to do."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``signum`` gives the exit status."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def leave_signals_to_trainer(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: Ctrl-C in a terminal, ``pkill -f``, SLURM or
    ``timeout`` signal the whole process group, and a worker killed first made the DataLoader
    raise inside the training step, before the trainer could save. The trainer alone stops
    (checkpoint, then exit); its workers then shut down with the DataLoader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, device: str = "auto", resume: bool = False,
                 quiet: bool = False) -> None:
        self.run_dir = Path(run_dir)
        check_backend(cfg.eval.backend)  # an evaluator that is not installed fails now, not after training
        device_ = dist.resolve_device(device)
        if dist.init_distributed(device_.type) and device_.type == "cuda":
            device_ = torch.device("cuda", torch.cuda.current_device())
        self.device = device_
        if device_.type == "cuda":  # input sizes repeat (fixed sizes or a few aspect groups)
            torch.backends.cudnn.benchmark = True
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        if cfg.solver.batch_size % self.world_size:
            raise TrainingError(f"solver.batch_size={cfg.solver.batch_size} is not divisible by the "
                                f"{self.world_size} processes")
        self.checkpoint_path, ckpt = self._checkpoint_to_resume(resume)
        seed_everything(cfg.train.seed + self.rank)

        if self.main:  # rank 0 generates the bundled dataset while the others wait
            self.train_set = build_dataset(cfg, "train")
        dist.barrier()
        if not self.main:
            self.train_set = build_dataset(cfg, "train")
        # the val set is read now, so that a missing or empty one stops the run before training
        evaluates = cfg.train.eval_at_end or cfg.train.eval_period > 0
        self.val_set = build_dataset(cfg, "val") if evaluates else None
        if self.val_set is not None:  # a COCO val json with other categories would be scored by position
            check_same_classes(self.train_set.class_names, self.val_set, train_set=self.train_set)
        if cfg.model.num_classes != self.train_set.num_classes:
            cfg = replace(cfg, model=dataclasses.replace(cfg.model, num_classes=self.train_set.num_classes))
        self.cfg = cfg
        self.amp_dtype, amp_line = autocast_dtype(cfg.train.amp, self.device)

        # Resuming: every tensor comes from the checkpoint, so pretrained weights are not read;
        # model.init replaces them too (the backbone config still decides FrozenBN, freeze_at).
        starts_from = cfg.model.init if ckpt is None else None  # --resume: the run's own weights
        self.model = build_model(cfg, pretrained=ckpt is None and starts_from is None).to(self.device)
        init_line = None
        if starts_from is not None:
            init_line = load_init(self.model, starts_from, self.train_set.class_names,
                                  cfg.model.head.prior_prob)  # fmt: skip
        ema = cfg.train.ema
        self.model_ema = build_ema(self.model, ema.decay, ema.warmup) if ema.enabled else None
        self.optimizer = build_optimizer(cfg.solver, self.model)
        s = cfg.solver
        self.budget = TimeBudget(s.max_minutes * 60 if s.max_minutes else math.inf, s.max_iter)
        self.max_iter = s.max_iter  # where the run ends: solver.max_iter, or the budget's horizon
        self.scheduler = build_scheduler(cfg.solver, self.optimizer, lambda: self.max_iter)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.iteration, self.best_ap, self.skipped = 0, -1.0, 0
        if ckpt is not None:
            self._restore(ckpt)
        self.max_iter = self._horizon()
        if self.main:
            check_run_dir(self.run_dir, self.model, self.optimizer)
        # one process per run directory (rank 0 speaks for all), until train() returns or it ends
        self.run_lock = lock_dir(self.run_dir) if self.main else None
        self.logger = TrainLogger(self.run_dir, self.iteration, self.max_iter,
                                  enabled=self.main, echo=not quiet)
        for line in (amp_line, init_line, self._resume_line(ckpt)):
            if line is not None:
                self.logger.write(line)
        self.stop_signal: Optional[int] = None
        self._validator: Optional[Validator] = None

    # ------------------------------------------------------------------------- checkpoints
    def _checkpoint_to_resume(self, resume: bool) -> tuple[Optional[Path], Optional[dict]]:
        """The newest checkpoint that loads, newest first; an unreadable one (a disk fault; our own
        writes are atomic) is reported and the one before it is used. An unsafe one (pickled
        objects other than tensors: not written by retina) stops the run."""
        found = last_checkpoint(self.run_dir)
        if found is None:
            return None, None
        if not resume:
            raise TrainingError(f"{self.run_dir} already holds checkpoints ({found.name}); pass "
                                f"--resume to continue that run or --out to start a new one")
        candidates = [found] + [p for _, p in reversed(list_checkpoints(self.run_dir)) if p != found]
        for path in candidates:
            try:
                return path, load_checkpoint(path)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as e:
                if self.main:
                    print(f"warning: skipping unreadable checkpoint: {e}", file=sys.stderr)
        raise TrainingError(f"no readable checkpoint in {self.run_dir}; start a new run with --out")

    def _resume_line(self, ckpt: Optional[dict]) -> Optional[str]:
        """On resume, the settings that differ from the checkpoint's config (a raised
        ``solver.max_iter`` is the common one; anything else changes the run from here on)."""
        if ckpt is None or not isinstance(ckpt.get("config"), dict):
            return None
        changes = config_changes(ckpt["config"], self.cfg)
        if not changes:
            return None
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        return f"resuming with {len(changes)} setting(s) changed from the checkpoint's config: {shown}"

    def _restore(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            if self.model_ema is not None and ckpt.get("model_ema") is not None:
                load_ema_state(self.model_ema, ckpt)  # else: the average starts at this iteration
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"{self.checkpoint_path} does not fit this config: {first} (the run's own "
                                f"config is {self.run_dir / 'config.yaml'}: --resume without --config "
                                f"uses it)") from None
        self.iteration = int(ckpt["iteration"])
        self.best_ap = float(ckpt.get("best_ap", -1.0))
        self.skipped = int(ckpt.get("skipped_steps", 0))
        if "time_budget" in ckpt:
            self.budget.load_state_dict(ckpt["time_budget"])
        set_rng_state(ckpt["rng"])

    def rank_fingerprints(self) -> Optional[list[list[float]]]:
        """Per rank, the float64 sum of each parameter, gathered on rank 0 (``None`` elsewhere):
        DDP keeps replicas identical, and a checkpoint records that they were."""
        sums = [float(p.detach().double().sum()) for p in self.model.parameters()]
        return dist.gather_to_main(sums)

    def save(self, name: Optional[str] = None) -> Path:
        path = self.run_dir / (name or f"model_{self.iteration:07d}.pth")
        fingerprints = self.rank_fingerprints() if self.world_size > 1 else None
        if fingerprints is not None and any(f != fingerprints[0] for f in fingerprints):
            self.logger.write(f"warning: the {self.world_size} replicas' weights differ at iteration "
                              f"{self.iteration}")
        if self.main:
            save_checkpoint({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "iteration": self.iteration, "rng": rng_state(), "config": config_to_dict(self.cfg),
                "class_names": list(self.train_set.class_names), "cat_ids": list(self.train_set.cat_ids),
                "best_ap": self.best_ap, "skipped_steps": self.skipped, "time_budget": self.budget.state_dict(),
                "world_size": self.world_size, "rank_fingerprints": fingerprints,
                **(ema_state(self.model_ema) if self.model_ema is not None else {}),
            }, path)
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        dist.barrier()
        return path

    # -------------------------------------------------------------------------------- loop
    def _loader(self) -> DataLoader:
        cfg = self.cfg
        per_rank = cfg.solver.batch_size // self.world_size
        stream, sampler = train_stream(self.train_set, cfg, self.iteration * cfg.solver.batch_size,
                                       self.rank, self.world_size)
        workers = cfg.data.num_workers
        return DataLoader(stream, batch_size=per_rank, sampler=sampler,
                          num_workers=workers, collate_fn=collate, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                          worker_init_fn=leave_signals_to_trainer)

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_signal = signum
        self.logger.write(f"{signal.Signals(signum).name} received: saving a checkpoint after this step")

    def _step(self, model: torch.nn.Module, images: list, targets: list) -> dict[str, torch.Tensor]:
        """One optimizer step, skipped (all ranks alike) when the loss or gradient is not finite."""
        images = [img.to(self.device, non_blocking=True) for img in images]  # uint8: the model converts
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = model(images, targets)  # loss_* terms and num_pos (a count, not added)
        loss = sum(v for k, v in losses.items() if k.startswith("loss_"))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.solver.clip_grad_norm if self.cfg.solver.clip_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # fp16: an inf gradient is the GradScaler's business (it skips and lowers the scale).
        bad = ~torch.isfinite(loss) if self.scaler.is_enabled() else ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if bool(dist.all_reduce(bad.float(), "max")):  # the one host sync of the step
            self._skip_step(losses)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return dict(losses, loss=loss, grad_norm=grad_norm)

    def _skip_step(self, losses: dict[str, torch.Tensor]) -> None:
        self.skipped += 1
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        if self.skipped > self.cfg.train.skip_nonfinite:
            last = last_checkpoint(self.run_dir)
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise TrainingError(f"non-finite loss or gradient at iteration {self.iteration + 1} ({terms}); "
                                f"{where}; lower solver.lr, set solver.clip_grad_norm, or allow skips "
                                f"with train.skip_nonfinite")
        self.logger.write(f"iteration {self.iteration + 1}: non-finite loss or gradient ({terms}); step "
                          f"skipped ({self.skipped} of {self.cfg.train.skip_nonfinite} allowed)")
        self.optimizer.zero_grad(set_to_none=True)

    def _horizon(self) -> int:
        """The iteration the run ends at: ``solver.max_iter``, or with ``solver.max_minutes`` the
        time budget's estimate, the earliest over ranks (each times its own steps)."""
        if not self.budget.limited:
            return self.cfg.solver.max_iter
        end = torch.tensor(float(self.budget.horizon(self.iteration)), device=self.device)
        return int(dist.all_reduce(end, "min").item())

    def train(self) -> dict:
        """Run to ``solver.max_iter`` (or for ``solver.max_minutes``); save ``model_final.pth``;
        evaluate; return the metrics.
        A resumed run that is already complete is left as it is (see ``_already_complete``).
        The run directory's lock is let go on the way out."""
        try:
            return self._train()
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _train(self) -> dict:
        cfg = self.cfg
        if self.checkpoint_path is not None and self.iteration >= self.max_iter:
            return self._already_complete()
        if self.main:
            dump_config(cfg, self.run_dir / "config.yaml")
        model = self.model
        if self.world_size > 1:
            model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        model.train()
        ds = self.train_set
        self.logger.write(f"train set: {ds.source}")
        self.logger.write(f"train set: {len(ds)} images, {ds.num_classes} classes, "
                          f"{ds.num_degenerate} degenerate boxes dropped (under 1 px or not finite)")
        if cfg.data.cache == "ram":
            self.logger.write(f"train set: {ds.cache_images()}")
        if self.budget.limited:
            self.logger.write(f"training for {cfg.solver.max_minutes:g} min of data + step time "
                              f"({self.budget.spent / 60:.1f} spent), at most {cfg.solver.max_iter} "
                              f"iterations: the schedule's length follows the pace")
        self.logger.write(f"training {self.max_iter - self.iteration} iterations from "
                          f"{self.iteration} on {self.device} x{self.world_size}; run dir {self.run_dir}")
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        data_log = LoggingHandler(self.logger)  # skipped bad images (data.on_bad_image=skip)
        logging.getLogger("retina.data").addHandler(data_log)
        start = time.perf_counter()
        try:
            self._loop(model)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            logging.getLogger("retina.data").removeHandler(data_log)
        self.save("model_final.pth")
        self.logger.write(f"training done in {format_seconds(time.perf_counter() - start)} "
                          f"({self.budget.spent / 60:.1f} min of data + step time, {self.iteration} iterations); "
                          f"weights: {self.run_dir / 'model_final.pth'}")
        metrics = self.evaluate(final=True) if cfg.train.eval_at_end else {}
        self.logger.close()
        return metrics

    def _already_complete(self) -> dict:
        """``--resume`` of a run whose checkpoint is at ``solver.max_iter``: nothing is trained,
        saved or logged again; returns its final metrics. Only a final evaluation that never
        finished (``model_final.pth`` without ``metrics.json``) is run."""
        metrics_path = self.run_dir / "metrics.json"
        if self.cfg.train.eval_at_end and not metrics_path.is_file() \
                and self.checkpoint_path.name == "model_final.pth":
            self.logger.write(f"training is complete ({self.checkpoint_path}, iteration {self.iteration}) "
                              f"but its final evaluation is missing: evaluating")
            metrics = self.evaluate(final=True)
            self.logger.close()
            return metrics
        where = metrics_path if metrics_path.is_file() else self.run_dir / "metrics.jsonl"
        self.logger.write(f"run already complete: {self.checkpoint_path} is at iteration {self.iteration} "
                          f"(solver.max_iter={self.cfg.solver.max_iter}, max_minutes={self.cfg.solver.max_minutes}); "
                          f"metrics: {where}; nothing to do (raise them to train further)")
        self.logger.close()
        return read_json(metrics_path) if metrics_path.is_file() else {}

    def _next_batch(self, data) -> Optional[tuple]:
        """The next batch; ``None`` when a signal interrupted the wait. A bad image stops the run
        after a checkpoint of the work done, with one line naming it."""
        try:
            return next(data)
        except Exception as e:
            if self.stop_signal is not None:
                return None
            line = worker_error_line(e)
            if line is None:
                raise
            path = self.save()
            raise TrainingError(f"{line}; checkpoint {path}; fix or remove the image (see retina data "
                                f"check), or set data.on_bad_image=skip, then --resume") from None

    def _loop(self, model: torch.nn.Module) -> None:
        data = iter(self._loader())
        try:
            self._steps(model, data)
        finally:
            # The workers ignore SIGTERM (leave_signals_to_trainer), so multiprocessing's exit-time
            # terminate() cannot stop them: after an error (a bad image, a broken pipe) the
            # process waited for them forever. DataLoader's own shutdown asks them to stop.
            shutdown = getattr(data, "_shutdown_workers", None)  # absent without workers
            if shutdown is not None:
                shutdown()

    def _steps(self, model: torch.nn.Module, data) -> None:
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        count, data_time, step_time = 0, 0.0, 0.0
        while self.iteration < self.max_iter:
            t0 = time.perf_counter()
            batch = self._next_batch(data) if self.stop_signal is None else None
            t1 = time.perf_counter()
            if batch is not None:
                losses = self._step(model, *batch)
                if self.model_ema is not None:
                    self.model_ema.update_parameters(self.model)
                self.iteration += 1
                losses["num_pos_per_image"] = losses.pop("num_pos") / len(batch[0])
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                count += 1
                t2 = time.perf_counter()
                data_time, step_time = data_time + t1 - t0, step_time + t2 - t1
                self.budget.add(t2 - t0)
                if self.budget.limited:
                    self.max_iter = self.logger.max_iter = self._horizon()
            if self.stop_signal is not None:
                path = self.save()
                raise Interrupted(f"stopped at iteration {self.iteration}; checkpoint {path}; "
                                  f"continue with: retina train --resume --out {self.run_dir}",
                                  self.stop_signal)
            if self.iteration % cfg.train.log_period == 0 or self.iteration == self.max_iter:
                self._log(sums, count, data_time, step_time)
                sums, count, data_time, step_time = {}, 0, 0.0, 0.0
            if self.iteration % cfg.train.checkpoint_period == 0 and self.iteration < self.max_iter:
                self.save()
            if cfg.train.eval_period and self.iteration % cfg.train.eval_period == 0 \
                    and self.iteration < self.max_iter:
                self.evaluate(final=False)
                model.train()

    def _log(self, sums: dict[str, torch.Tensor], count: int, data_time: float, step_time: float) -> None:
        names = sorted(sums)
        stacked = torch.stack([sums[k].to(self.device) for k in names]) / max(count, 1)
        means = dict(zip(names, (dist.all_reduce(stacked) / self.world_size).tolist()))  # over ranks
        means["lr"] = self.optimizer.param_groups[0]["lr"]
        seconds = data_time + step_time
        means["images_per_sec"] = count * self.cfg.solver.batch_size / max(seconds, 1e-9)
        means["time/data_per_iter"] = data_time / max(count, 1)
        means["time/step_per_iter"] = step_time / max(count, 1)
        if self.device.type == "cuda":
            means["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.skipped:
            means["skipped_steps"] = self.skipped
        self.logger.log(self.iteration, means)

    # ------------------------------------------------------------------------------- eval
    def evaluate(self, final: bool = True) -> dict:
        """COCO metrics of the current weights (their EMA with ``train.ema``) on the val split,
        sharded over ranks. Periodic evaluations keep ``model_best.pth``; the final one writes
        metrics.json and detections.json."""
        if self._validator is None:
            cfg = self.cfg
            val_set = self.val_set if self.val_set is not None else build_dataset(cfg, "val")
            self._validator = Validator(val_set, cfg.eval.batch_size, self.device,
                                        self.amp_dtype, cfg.data.num_workers, self.logger,
                                        cfg.train.tb_images, cfg.eval.backend)
        evaluated = self.model_ema.module if self.model_ema is not None else self.model
        metrics = self._validator(evaluated, self.iteration, self.run_dir if final else None,
                                  "EMA weights" if self.model_ema is not None else "")
        ap = metrics.get("AP", float("nan"))
        if not final and math.isfinite(ap) and ap > self.best_ap:
            self.best_ap = ap
            self.save("model_best.pth")
            self.logger.write(f"new best AP {ap:.1f}: {self.run_dir / 'model_best.pth'}")
        if final:
            self.logger.write(f"metrics: {self.run_dir / 'metrics.json'}")
        return metrics
