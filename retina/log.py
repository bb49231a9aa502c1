"""The prefix of every line retina logs: the local time (``2025-01-31 14:05:09 ...``), shared by
the training log (``retina.engine.logger``) and the data generators' progress lines."""

from __future__ import annotations

import time


def timestamp() -> str:
    """The local time that starts every log line, e.g. ``2025-01-31 14:05:09``."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def stamped(text: str) -> str:
    """``text`` with each of its lines after the timestamp (an empty text: the timestamp alone)."""
    now = timestamp()
    return "\n".join(f"{now} {part}" for part in text.splitlines() or [""])
