"""The training loop: data stream -> model -> loss -> optimizer, with checkpoints that hold every
state (``state.py``: model, its EMA, optimizer, schedule, grad scaler, counters, time budget,
RNG) and describe the run (config, classes), so a run resumed from any checkpoint continues the
same stream of batches (``retina.data.sampler``).

A new run starts from ``model.init`` when given (``init.py``: every tensor of that checkpoint that
fits); with ``train.ema`` an average of the weights (``ema.py``) is updated after every step and
is what periodic and final evaluations score and ``model_final.pth`` deploys (``model_ema``).
``model.num_classes`` is resolved against the train set (``retina.data.resolve_num_classes``)
and the run's ``config.yaml`` records the resolved count.

``cfg.train.amp`` picks the autocast dtype (``precision.py``; fp16 adds a GradScaler); under
``torchrun`` the model is wrapped in DDP, one process per device, and every decision to stop is
reduced over ranks so all stop together. One host sync per step checks that the loss and
gradient norm are finite; a time budget's horizon is re-estimated every ``ESTIMATE_PERIOD``
steps and at log lines (``budget.py``). A progress line is printed after the 1st, 2nd, 4th ...
step until the first log period ends (``logger.early_progress``), then every ``log_period``.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from retina.config import Config, config_to_dict, dump_config
from retina.data import build_dataset, collate, resolve_num_classes
from retina.data.sampler import train_stream
from retina.engine import dist
from retina.engine.budget import ESTIMATE_PERIOD
from retina.engine.checkpoint import last_checkpoint, prune_checkpoints, save_checkpoint
from retina.engine.evaluate import check_backend
from retina.engine.logger import LoggingHandler, LogWindow, TrainLogger, early_progress, format_seconds
from retina.engine.precision import autocast_dtype
from retina.engine.preflight import check_run_dir, worker_error_line
from retina.engine.start import (TrainingError, checkpoint_to_resume, join_processes, read_datasets,
                                 resume_line, seed_everything, start_model)
from retina.engine.state import TrainState, build_train_state
from retina.engine.validation import Validator
from retina.io import lock_dir, read_json

__all__ = ["Interrupted", "Trainer", "TrainingError"]


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``signum`` gives the exit status."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


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
        self.device, self.rank, self.world_size = join_processes(device, cfg.solver.batch_size)
        self.main = self.rank == 0
        self.checkpoint_path, ckpt = checkpoint_to_resume(self.run_dir, resume, self.main)
        seed_everything(cfg.train.seed + self.rank)
        self.train_set, self.val_set = read_datasets(cfg, self.main)
        self.cfg = cfg = resolve_num_classes(cfg, self.train_set.num_classes,
                                             f"the train set ({self.train_set.source})")
        self.amp_dtype, amp_line = autocast_dtype(cfg.train.amp, self.device)
        model, init_line = start_model(cfg, ckpt is not None, self.train_set.class_names, self.device)
        self.state: TrainState = build_train_state(cfg, model, self.device.type, self.amp_dtype == torch.float16)
        if ckpt is not None:
            self._restore(ckpt)
        self.max_iter = self._horizon()  # where the run ends: solver.max_iter, or the budget's horizon
        self.state.scheduler.set_horizon(self.max_iter)
        if self.main:
            check_run_dir(self.run_dir, self.model, self.state.optimizer)
        # one process per run directory (rank 0 speaks for all), until train() returns or it ends
        self.run_lock = lock_dir(self.run_dir) if self.main else None
        self.logger = TrainLogger(self.run_dir, self.iteration, self.max_iter,
                                  enabled=self.main, echo=not quiet)
        for line in (amp_line, init_line, resume_line(ckpt, cfg)):
            if line is not None:
                self.logger.write(line)
        self.start_iter = self.iteration  # this process's first iteration (early progress lines)
        self.stop_signal: Optional[int] = None
        self._validator: Optional[Validator] = None

    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def iteration(self) -> int:
        return self.state.iteration

    # ------------------------------------------------------------------------- checkpoints
    def _restore(self, ckpt: dict) -> None:
        try:
            self.state.load_state_dict(ckpt)
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"{self.checkpoint_path} does not fit this config: {first} (the run's own "
                                f"config is {self.run_dir / 'config.yaml'}: --resume without --config "
                                f"uses it)") from None

    def rank_fingerprints(self) -> Optional[list[list[float]]]:
        """Per rank, the float64 sum of each parameter, gathered on rank 0 (``None`` elsewhere):
        DDP keeps replicas identical, and a checkpoint records that they were."""
        sums = [float(p.detach().double().sum()) for p in self.model.parameters()]
        return dist.gather_to_main(sums)

    def save(self, name: Optional[str] = None) -> Path:
        """The state (``TrainState.state_dict``) and what describes the run: its config, class
        names, cat ids, world size and replica fingerprints."""
        path = self.run_dir / (name or f"model_{self.iteration:07d}.pth")
        fingerprints = self.rank_fingerprints() if self.world_size > 1 else None
        if fingerprints is not None and any(f != fingerprints[0] for f in fingerprints):
            self.logger.write(f"warning: the {self.world_size} replicas' weights differ at iteration "
                              f"{self.iteration}")
        if self.main:
            save_checkpoint({**self.state.state_dict(), "config": config_to_dict(self.cfg),
                             "class_names": list(self.train_set.class_names),
                             "cat_ids": list(self.train_set.cat_ids), "world_size": self.world_size,
                             "rank_fingerprints": fingerprints}, path)  # fmt: skip
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
        s = self.state
        images = [img.to(self.device, non_blocking=True) for img in images]  # uint8: the model converts
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = model(images, targets)  # loss_* terms and num_pos (a count, not added)
        loss = sum(v for k, v in losses.items() if k.startswith("loss_"))
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        s.scaler.unscale_(s.optimizer)
        max_norm = self.cfg.solver.clip_grad_norm if self.cfg.solver.clip_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # fp16: an inf gradient is the GradScaler's business (it skips and lowers the scale).
        bad = ~torch.isfinite(loss) if s.scaler.is_enabled() else ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if bool(dist.all_reduce(bad.float(), "max")):  # the one host sync of the step
            self._skip_step(losses)
        else:
            s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        return dict(losses, loss=loss, grad_norm=grad_norm)

    def _skip_step(self, losses: dict[str, torch.Tensor]) -> None:
        self.state.skipped += 1
        skipped, allowed = self.state.skipped, self.cfg.train.skip_nonfinite
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        if skipped > allowed:
            last = last_checkpoint(self.run_dir)
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise TrainingError(f"non-finite loss or gradient at iteration {self.iteration + 1} ({terms}); "
                                f"{where}; lower solver.lr, set solver.clip_grad_norm, or allow skips "
                                f"with train.skip_nonfinite")
        self.logger.write(f"iteration {self.iteration + 1}: non-finite loss or gradient ({terms}); step "
                          f"skipped ({skipped} of {allowed} allowed)")
        self.state.optimizer.zero_grad(set_to_none=True)

    def _horizon(self) -> int:
        """The iteration the run ends at: ``solver.max_iter``, or with ``solver.max_minutes`` the
        time budget's estimate, the earliest over ranks (each times its own steps)."""
        budget = self.state.budget
        if not budget.limited:
            return self.cfg.solver.max_iter
        end = budget.horizon(self.iteration)
        if self.world_size == 1:
            return end
        return int(dist.all_reduce(torch.tensor(float(end), device=self.device), "min").item())

    def _set_horizon(self, max_iter: int) -> None:
        """Where the run ends now: the loop, the schedule and the log follow it."""
        self.max_iter = max_iter
        self.state.scheduler.set_horizon(max_iter)
        self.logger.set_horizon(max_iter)

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
            dump_config(cfg, self.run_dir / "config.yaml")  # model.num_classes resolved
        model = self.model
        if self.world_size > 1:
            model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        model.train()
        self._describe_run()
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
                          f"({self.state.budget.spent / 60:.1f} min of data + step time, {self.iteration} "
                          f"iterations); weights: {self.run_dir / 'model_final.pth'}")
        metrics = self.evaluate(final=True) if cfg.train.eval_at_end else {}
        self.logger.close()
        return metrics

    def _describe_run(self) -> None:
        """The log's first lines: the train set, the time budget, what is trained where."""
        cfg, ds, budget = self.cfg, self.train_set, self.state.budget
        self.logger.write(f"train set: {ds.source}")
        self.logger.write(f"train set: {len(ds)} images, {ds.num_classes} classes, "
                          f"{ds.num_degenerate} degenerate boxes dropped (under 1 px or not finite)")
        if cfg.data.cache == "ram":
            self.logger.write(f"train set: {ds.cache_images()}")
        if budget.limited:
            self.logger.write(f"training for {cfg.solver.max_minutes:g} min of data + step time "
                              f"({budget.spent / 60:.1f} spent), at most {cfg.solver.max_iter} "
                              f"iterations: the schedule's length follows the pace")
        self.logger.write(f"training {self.max_iter - self.iteration} iterations from "
                          f"{self.iteration} on {self.device} x{self.world_size}; run dir {self.run_dir}")

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
        window = LogWindow()
        while self.iteration < self.max_iter:
            t0 = time.perf_counter()
            batch = self._next_batch(data) if self.stop_signal is None else None
            t1 = time.perf_counter()
            if batch is not None:
                losses = self._step(model, *batch)
                if self.state.ema is not None:
                    self.state.ema.update_parameters(self.model)
                self.state.iteration += 1
                losses["num_pos_per_image"] = losses.pop("num_pos") / len(batch[0])
                t2 = time.perf_counter()
                window.add(losses, t1 - t0, t2 - t1)
                self.state.budget.add(t2 - t0)
            if self.stop_signal is not None:
                path = self.save()
                raise Interrupted(f"stopped at iteration {self.iteration}; checkpoint {path}; "
                                  f"continue with: retina train --resume --out {self.run_dir}",
                                  self.stop_signal)
            if self._after_step(model, window):
                window = LogWindow()

    def _after_step(self, model: torch.nn.Module, window: LogWindow) -> bool:
        """After a step: the horizon re-estimated when due, the log line, the periodic checkpoint
        and evaluation. Whether the line was recorded (a new log window starts)."""
        t, it = self.cfg.train, self.iteration
        period = it % t.log_period == 0
        progress = not period and early_progress(it, self.start_iter, t.log_period)
        if self.state.budget.limited and (period or progress or it % ESTIMATE_PERIOD == 0 or it >= self.max_iter):
            self._set_horizon(self._horizon())
        recorded = period or it == self.max_iter
        if recorded or progress:
            self._log(window, record=recorded)
        if it % t.checkpoint_period == 0 and it < self.max_iter:
            self.save()
        if t.eval_period and it % t.eval_period == 0 and it < self.max_iter:
            self.evaluate(final=False)
            model.train()
        return recorded

    def _log(self, window: LogWindow, record: bool = True) -> None:
        """The window's means over its steps and the ranks, and its pace; ``record=False``: a
        progress line only (``early_progress``)."""
        names, count = sorted(window.sums), max(window.count, 1)
        stacked = torch.stack([window.sums[k].to(self.device) for k in names]) / count
        means = dict(zip(names, (dist.all_reduce(stacked) / self.world_size).tolist()))  # over ranks
        means["lr"] = self.state.optimizer.param_groups[0]["lr"]
        seconds = window.data_time + window.step_time
        means["images_per_sec"] = window.count * self.cfg.solver.batch_size / max(seconds, 1e-9)
        means["time/data_per_iter"] = window.data_time / count
        means["time/step_per_iter"] = window.step_time / count
        if self.device.type == "cuda":
            means["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.state.skipped:
            means["skipped_steps"] = self.state.skipped
        self.logger.log(self.iteration, means, record=record)

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
        ema = self.state.ema
        evaluated = ema.module if ema is not None else self.model
        metrics = self._validator(evaluated, self.iteration, self.run_dir if final else None,
                                  "EMA weights" if ema is not None else "")
        ap = metrics.get("AP", float("nan"))
        if not final and math.isfinite(ap) and ap > self.state.best_ap:
            self.state.best_ap = ap
            self.save("model_best.pth")
            self.logger.write(f"new best AP {ap:.1f}: {self.run_dir / 'model_best.pth'}")
        if final:
            self.logger.write(f"metrics: {self.run_dir / 'metrics.json'}")
        return metrics
