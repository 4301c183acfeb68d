"""run_spawned: every job once, results tagged with their index, inline or spawned."""

from __future__ import annotations

import pytest

from rts_dagster.parallel import run_spawned


@pytest.mark.parametrize("workers", [1, 2])
def test_every_job_once_with_its_index(workers: int) -> None:
    jobs = [(3, 4), (10, 2), (0, 1)]
    results = dict(run_spawned(divmod, jobs, workers))
    assert results == {0: (0, 3), 1: (5, 0), 2: (0, 0)}


def test_a_failing_job_raises() -> None:
    with pytest.raises(ZeroDivisionError):
        list(run_spawned(divmod, [(1, 1), (1, 0)], 2))
