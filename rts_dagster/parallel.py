"""Run independent jobs in spawned worker processes (or inline for one worker).

Spawned, not forked: the caller may hold threads (a Dagster run, wandb's service), and a
forked child would inherit their locks mid-state. Used by the simulator's writer and the
closed-loop check.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

T = TypeVar("T")


def run_spawned(
    fn: Callable[..., T], jobs: Sequence[tuple[Any, ...]], workers: int
) -> Iterator[tuple[int, T]]:
    """Yield `(index, fn(*jobs[index]))` as jobs finish. `fn` must be importable (a module
    function). If the consumer stops early or an exception escapes (a cancelled run, a
    failed job), queued jobs are dropped instead of waited for."""
    if workers <= 1 or len(jobs) <= 1:
        for index, args in enumerate(jobs):
            yield index, fn(*args)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context)
    try:
        futures = {pool.submit(fn, *args): index for index, args in enumerate(jobs)}
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BaseException:  # includes GeneratorExit: the consumer stopped early
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
