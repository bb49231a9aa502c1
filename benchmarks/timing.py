"""How the benchmarks measure one call: wall and CPU seconds (``timed``) and peak memory
(``PeakMemory``). What is compared, and how often, is each benchmark's own."""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def timed(fn: Callable[[], object], device: Optional[torch.device] = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call; on a CUDA
    ``device``, the device is synchronised before and after."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak memory of one call, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, after a reset). CPU on Linux: the
    process's peak resident set size during the call above its RSS at the start (VmHWM after
    resetting it through /proc/self/clear_refs); memory freed earlier and kept by the allocator is
    reused without counting, so this is a lower bound on what the call needs. Elsewhere: growth of
    ``ru_maxrss``, which only sees a new process-wide peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda.max_memory_allocated"
        if device.type != "cuda":
            self.method = "VmHWM-VmRSS" if self._reset_hwm() else "ru_maxrss delta"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return _proc_status_kib("VmHWM") is not None
        except OSError:
            return False

    def measure(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        if self.method == "VmHWM-VmRSS":
            self._reset_hwm()
            base = _proc_status_kib("VmRSS") or 0
            fn()
            return ((_proc_status_kib("VmHWM") or 0) - base) / 1024
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
