"""Files written whole or not at all: ``atomic_write``, and strict JSON (``write_json``,
``read_json``) on top of it.

``atomic_write`` writes to a temporary file ``.<name>.<random>.tmp`` in the target's directory,
then renames it over the target (``os.replace`` is atomic on POSIX and Windows), so a process
killed mid-write (kill -9, a crash) leaves the old file or the new one under the final name,
never a truncated one; only a stray temporary file. With ``fsync`` (the default) the data and
the rename are also flushed to the disk before returning, so a power cut cannot leave a renamed
but empty file either. Files are created with the usual permissions (0o666 less the umask).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import IO, Any, Callable, Union

Writer = Callable[[IO[bytes]], None]


def _open_temp(path: Path) -> tuple[int, Path]:
    """A new file next to ``path``, opened for writing (the name never collides)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                           0o666), tmp
        except FileExistsError:
            continue


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: Union[bytes, Writer], fsync: bool = True) -> Path:
    """Write ``data`` (bytes, or a function that writes to a binary file object) to ``path``
    atomically; creates the parent directories; returns ``path``.

    ``fsync=False`` skips the flushes to disk: still whole-or-nothing when the process dies, not
    when the machine does (for caches that can be regenerated, written by the thousand).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


def _nan_to_none(obj: Any) -> Any:
    """Recursively replace float NaN/inf by None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any, indent: int | None = None, fsync: bool = True) -> Path:
    """Write ``obj`` as strict JSON (NaN and inf become null) with ``atomic_write``."""
    text = json.dumps(_nan_to_none(obj), allow_nan=False, indent=indent)
    return atomic_write(path, text.encode(), fsync=fsync)


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: it is not valid JSON (one line naming the file, line and column).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def weights_dir(weights: str | Path) -> Path:
    """The folder of a ``--weights`` argument, beside which its outputs go by default: a run
    directory itself, or the folder of a checkpoint or an exported model."""
    weights = Path(weights)
    return weights if weights.is_dir() else weights.parent


def unused_dir(base: str | Path) -> Path:
    """``base`` if it does not exist or is an empty directory, else the first of ``base2``,
    ``base3``, ... that does not exist or is empty: a default output folder (``predictions``,
    ``<run>/eval``) never overwrites earlier results (ultralytics numbers its ``predict`` and
    ``val`` folders the same way)."""
    base = Path(base)
    candidate, n = base, 1
    while candidate.exists() and not (candidate.is_dir() and not any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}{n}")
    return candidate
