"""Atomic writes: the file modes a user on a shared machine relies on."""

from __future__ import annotations

import os
import stat

import polars as pl
import pytest

from rts_dagster import storage


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mode):
    writers = {
        "a.parquet": lambda p: storage.write_parquet(pl.DataFrame({"x": [1]}), p),
        "b.json": lambda p: storage.write_json({"x": 1}, p),
        "c.md": lambda p: storage.write_text("x", p),
        "d.png": lambda p: storage.write_bytes(b"x", p),
    }
    old = os.umask(umask)
    try:
        for name, write in writers.items():
            write(tmp_path / name)
            write(tmp_path / name)  # replacing an existing file too
        assert storage.current_umask() == umask  # read, not changed
    finally:
        os.umask(old)
    for name in writers:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)  # no temp left


def test_a_killed_writers_temp_files_are_removed_by_the_next_write(tmp_path):
    import os
    import subprocess
    import time

    from rts_dagster import storage

    target = tmp_path / "x.parquet"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".x.parquet.{dead.pid}.abc123.tmp"
    live = tmp_path / f".x.parquet.{os.getppid()}.def456.tmp"
    old_format = tmp_path / ".x.parquet.zz9abc.tmp"
    other = tmp_path / f".y.parquet.{dead.pid}.abc123.tmp"
    for p in (stale, live, old_format, other):
        p.write_bytes(b"partial")
    hour_ago = time.time() - 2 * storage.STALE_TMP_AGE_S
    os.utime(old_format, (hour_ago, hour_ago))
    storage.write_json({"a": 1}, target)
    assert not stale.exists() and not old_format.exists()
    assert live.exists() and other.exists()  # a live writer's file, another target's file
    assert storage.read_json(target) == {"a": 1}
