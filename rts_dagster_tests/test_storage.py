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
