"""How long ``retina`` takes to answer what needs no model: ``--help``, a verb's ``--help`` and a
config error, each in a fresh process, beside ``python -c "import torch"`` measured the same way
(what an answer would cost if it imported torch).

    python -m benchmarks.cli --repeats 10

Each command runs ``--repeats`` times in a new interpreter (``subprocess``, the machine's file
cache warm after a first untimed run); the table gives the median and the fastest wall seconds
and each command's exit status. Run it on a quiet machine: other work on the cores shows up in
every figure.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Sequence

CLI = [sys.executable, "-m", "retina"]
COMMANDS = {
    "retina --help": [*CLI, "--help"],
    "retina train --help": [*CLI, "train", "--help"],
    "retina data check --help": [*CLI, "data", "check", "--help"],
    "retina train --set loss.gama=1 (config error)": [*CLI, "train", "--set", "loss.gama=1"],
    'python -c "import torch" (the peer)': [sys.executable, "-c", "import torch"],
}


def time_command(argv: Sequence[str], repeats: int) -> tuple[list[float], int]:
    """(wall seconds of each of ``repeats`` runs, the exit status of the last); one untimed run
    first, so that every timed run finds the files in the page cache."""
    subprocess.run(argv, capture_output=True)
    seconds, code = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        code = subprocess.run(argv, capture_output=True).returncode
        seconds.append(time.perf_counter() - t0)
    return seconds, code


def format_table(rows: dict[str, tuple[list[float], int]]) -> str:
    """A markdown table: command, runs, median s, min s, exit status."""
    width = max(len(name) for name in rows)
    lines = [f"| {'command'.ljust(width)} | runs | median s |  min s | exit |",
             f"|{'-' * (width + 2)}|-----:|---------:|-------:|-----:|"]
    for name, (seconds, code) in rows.items():
        lines.append(f"| {name.ljust(width)} | {len(seconds):4d} | {statistics.median(seconds):8.3f} | "
                     f"{min(seconds):6.3f} | {code:4d} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", "-n", type=int, default=10, help="timed runs per command (default: 10)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected at least 1")
    rows = {name: time_command(cmd, args.repeats) for name, cmd in COMMANDS.items()}
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
