"""Files written whole or not at all: ``atomic_write``, and strict JSON (``write_json``,
``read_json``) on top of it; the records of a JSON-lines log (``read_jsonl``).

``atomic_write`` writes to a temporary file ``.<name>.<random>.tmp`` in the target's directory,
then renames it over the target (``os.replace`` is atomic on POSIX and Windows), so a process
killed mid-write (kill -9, a crash) leaves the old file or the new one under the final name,
never a truncated one; only a stray temporary file. With ``fsync`` (the default) the data and
the rename are also flushed to the disk before returning, so a power cut cannot leave a renamed
but empty file either. Files are created with the usual permissions (0o666 less the umask).

``lock_dir`` gives one process a folder (a run directory, a sweep folder): an exclusive ``flock``
on ``FOLDER/.retina.lock``, which holds the holder's pid while it is held. A second process is
refused at once, in one line naming the folder and that pid (``DirInUseError``). The OS drops
an ``flock`` when its process ends, however it ends, so a lock left by a killed process (kill -9,
a crash, a power cut) never blocks: the next process takes the stale file over.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import threading
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union

from retina.errors import InputError, RetinaError

try:
    import fcntl
except ImportError:  # Windows has no flock: folders are not locked there (lock_dir only creates them)
    fcntl = None

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


def read_jsonl(path: str | Path) -> list[dict]:
    """The records (JSON objects, one a line) of a log such as ``metrics.jsonl``: a line cut by a
    kill, or anything but an object, is skipped; a missing or unreadable file has none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def weights_dir(weights: str | Path) -> Path:
    """The folder of a ``--weights`` argument, beside which its outputs go by default: a run
    directory itself, or the folder of a checkpoint or an exported model."""
    weights = Path(weights)
    return weights if weights.is_dir() else weights.parent


def unused_dir(base: str | Path) -> Path:
    """``base`` if it does not exist or is an empty directory, else the first of ``base2``,
    ``base3``, ... that does not exist or is empty: a default output folder (``runs/predict``,
    ``<run>/eval``, ``<run>/analysis/errors``) never overwrites earlier results (ultralytics numbers
    its ``runs/detect/predict`` and ``val`` folders the same way). Creates nothing."""
    base = Path(base)
    candidate, n = base, 1
    while candidate.exists() and not (candidate.is_dir() and not any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}{n}")
    return candidate


# -------------------------------------------------------------------------------- folder locks
LOCK_NAME = ".retina.lock"


class DirInUseError(RetinaError):
    """Another process holds the folder's lock (``lock_dir``); the message names it and its pid."""


# Per process, the folders locked and how many holds each has: a process that holds a folder takes
# it again (a Trainer built twice on one run directory), as flock alone would refuse it.
_held: dict[Path, list[int]] = {}  # resolved folder -> [descriptor, holds]
_held_guard = threading.Lock()


def _forget_held_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited descriptors, so the lock goes
    with the process that took it, not with the last of its workers."""
    global _held_guard
    for fd, _ in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()
    _held_guard = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held_locks)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"  # empty: it is writing its pid


def _take(directory: Path) -> Optional[int]:
    """A descriptor of ``directory/LOCK_NAME`` that holds its flock, with this pid written in;
    ``None`` on a filesystem without flock (some network mounts), where the folder goes unlocked."""
    path = directory / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the holder before us removed the empty folder it had made
            directory.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as e:
            raise InputError(f"cannot write the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return None
            raise DirInUseError(f"{directory} is in use: {_holder(path)} holds its lock ({path}); "
                                f"wait for it to end, or choose another --out folder") from None
        # The holder before us unlinks the file as it lets go: if we locked that unlinked file,
        # the lock is on nothing anyone else will open; open the current one again.
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


class DirLock:
    """An exclusive lock on a folder, shared by none: ``acquire`` (or ``with``) takes it, creating
    the folder, or raises ``DirInUseError``; ``release`` (or leaving the ``with``) removes the lock
    file, and the folder if it made it and it is still empty, and lets go. A process ending lets go
    too. Held per process: taken twice in one process, it is let go at the second release."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._key: Optional[Path] = None  # the resolved folder while this object holds it
        self._made = False  # acquire created the folder

    def acquire(self) -> "DirLock":
        if self._key is not None:
            return self
        self._made = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.directory.resolve()
        with _held_guard:
            if key in _held:
                _held[key][1] += 1
            elif fcntl is not None:
                fd = _take(self.directory)
                if fd is not None:
                    _held[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        with _held_guard:
            entry = _held.get(key) if key is not None else None
            if entry is None:  # not held, not lockable here, or inherited across a fork
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                (key / LOCK_NAME).unlink(missing_ok=True)  # while still locked: see _take
                if self._made and not any(key.iterdir()):
                    try:
                        key.rmdir()  # nothing was written (a refused config): nothing is left
                    except OSError:  # another process is taking the folder now
                        pass
                os.close(entry[0])  # lets go of the flock

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_dir(directory: str | Path) -> DirLock:
    """``DirLock(directory).acquire()``: the folder, held by this process until ``release``."""
    return DirLock(directory).acquire()
