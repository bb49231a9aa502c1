"""retina.io: files written whole or not at all, strict JSON."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import retina.io as rio
from retina.io import atomic_write, read_json, read_jsonl, write_json


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_bytes_and_writer_function(tmp_path):
    path = atomic_write(tmp_path / "a" / "b.bin", b"\x00\x01")  # parents are created
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert names(path.parent) == ["b.bin"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("old")

    def half_then_fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and names(tmp_path) == ["c.json"]


def test_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "m.pth", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the umask 0o027


@pytest.mark.parametrize("fsync, calls", [(True, 2), (False, 0)])  # the file, then its directory
def test_fsync_flushes_file_and_directory(tmp_path, monkeypatch, fsync, calls):
    seen = []
    monkeypatch.setattr(rio.os, "fsync", lambda fd: seen.append(fd))
    atomic_write(tmp_path / "f", b"x", fsync=fsync)
    assert len(seen) == calls


def test_write_json_is_strict_and_read_json_reads_it_back(tmp_path):
    path = write_json(tmp_path / "sub" / "m.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": (2,)})
    assert read_json(path) == {"a": None, "b": [1.5, None], "c": [2]}
    assert "NaN" not in path.read_text() and names(path.parent) == ["m.json"]


def test_read_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError) as e:
        read_json(path)
    assert str(e.value).startswith(f"{path}: not valid JSON: ") and "line 2" in str(e.value)
    assert "\n" not in str(e.value)


def test_read_jsonl_skips_a_half_written_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1, "time": 5.0}\n{"iter": 2, "ti')
    assert read_jsonl(path) == [{"iter": 1, "time": 5.0}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []
