"""A training-time budget: train for so many minutes, with a schedule that ends when they do.

A schedule is laid out in iterations (cosine to zero at ``max_iter``), but a user with a clock to
meet (and a race at equal wall-clock time) knows minutes, and a step's cost drifts over a run on a
shared CPU. ``TimeBudget`` re-estimates the run's length from the pace measured so far: the
horizon is the iterations done plus the seconds left divided by the mean seconds per iteration,
capped at ``max_iter``; the schedule reads that horizon and the run stops when it is reached
(ultralytics' ``time`` argument, which re-estimates its epochs the same way). Seconds count data
loading and the step only (evaluations and checkpoints are not training time), summed over resumes.
The trainer re-estimates every ``ESTIMATE_PERIOD`` iterations and at each log line, not at every
step: under DDP an estimate is a collective (the earliest end over ranks) and a host sync.

A run on a budget is not reproducible iteration for iteration: its length depends on the machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ESTIMATE_PERIOD = 10  # iterations between estimates of the horizon: a pace drifts over minutes, not steps


@dataclass
class TimeBudget:
    seconds: float  # training seconds allowed (data + step); math.inf: ``max_iter`` alone decides
    max_iter: int  # the cap: never more iterations than this
    settle: int = 10  # iterations this process times before its own pace counts (start-up is slow)
    spent: float = 0.0  # training seconds so far, carried over resumes
    prior_pace: float = math.nan  # seconds per iteration of the run before a resume
    _timed_iters: int = 0  # this process's iterations after the first ``settle``, and their seconds
    _timed_seconds: float = 0.0
    _seen: int = 0

    @property
    def limited(self) -> bool:
        return not math.isinf(self.seconds)

    def add(self, seconds: float) -> None:
        """One more iteration that took ``seconds`` (data + step)."""
        self.spent += seconds
        self._seen += 1
        if self._seen > self.settle:
            self._timed_iters += 1
            self._timed_seconds += seconds

    @property
    def pace(self) -> float:
        """Mean seconds per iteration of this process after settling; before that, the pace the
        checkpoint recorded (NaN for a new run)."""
        return self._timed_seconds / self._timed_iters if self._timed_iters else self.prior_pace

    def horizon(self, iteration: int) -> int:
        """The iteration the run ends at, seen from ``iteration``: ``iteration`` plus as many
        iterations of the pace as the seconds left hold, at most ``max_iter``. Without a pace yet:
        ``max_iter`` (or ``iteration``, when the seconds are spent); without a limit: ``max_iter``."""
        if not self.limited:
            return self.max_iter
        left = max(self.seconds - self.spent, 0.0)
        if math.isnan(self.pace):
            return self.max_iter if left > 0 else min(iteration, self.max_iter)
        return min(self.max_iter, iteration + int(left / self.pace))

    def state_dict(self) -> dict:
        return {"spent": self.spent, "pace": self.pace}

    def load_state_dict(self, state: dict) -> None:
        self.spent, self.prior_pace = float(state["spent"]), float(state["pace"])
