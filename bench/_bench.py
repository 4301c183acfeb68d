"""Shared by the benchmarks in this folder (`python bench/<name>.py`, with the project
installed in the venv by `make install`)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of `repeats` calls, seconds (garbage collected before each)."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        del out
    return best


def bench_line(name: str, value: str, unit: str, op: str, target: str, ok: bool) -> str:
    """The project's result line: `BENCH <name> <value> <unit> target <op> <value> PASS|MISS`."""
    return f"BENCH {name} {value} {unit} target {op} {target} {'PASS' if ok else 'MISS'}"
