"""Many partitions in one Dagster run.

A Dagster run costs about a second of bookkeeping on its own; computing one small
partition costs far less. The per-run assets therefore accept a partition range
(`BackfillPolicy.multi_run`, or `rts refresh` batching keys) and compute each partition in
turn, while every partition stays its own file, its own materialization in the UI and
individually re-materializable (`--partition KEY`).

One bad partition must not cost the others: each is computed on its own; the run then
fails naming every failed key, after the others' files are written. `rts refresh`
re-runs the keys of a failed batch one per run, so each failure gets its own error and
each good partition its own materialization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from rts_dagster.escape import md_table

# Partitions per run when Dagster itself backfills (UI, automation); `rts refresh` uses
# its own batches (`--batch`).
MAX_PARTITIONS_PER_RUN = 100
BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN)


@dataclass
class PartitionOutcome:
    """What one partition's computation reports: metadata and asset check results."""

    metadata: dict[str, Any]
    checks: list[dg.AssetCheckResult] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # a few fields for a batch table


def _row_count(outcome: PartitionOutcome) -> int:
    value = outcome.metadata.get("dagster/row_count", 0)
    return int(value) if isinstance(value, int) else 0


def _combined_checks(keys: Sequence[str], outcomes: Sequence[PartitionOutcome]) -> list:
    """One result per check over the batch: passed if it passed on every partition; the
    severity and the keys of the partitions where it did not."""
    by_name: dict[str, list[tuple[str, dg.AssetCheckResult]]] = {}
    for key, outcome in zip(keys, outcomes, strict=True):
        for result in outcome.checks:
            by_name.setdefault(str(result.check_name), []).append((key, result))
    combined = []
    for name, results in by_name.items():
        failed = [(k, r) for k, r in results if not r.passed]
        severity = dg.AssetCheckSeverity.WARN
        if any(r.severity == dg.AssetCheckSeverity.ERROR for _, r in failed):
            severity = dg.AssetCheckSeverity.ERROR
        combined.append(
            dg.AssetCheckResult(
                check_name=name,
                passed=not failed,
                severity=severity if failed else dg.AssetCheckSeverity.ERROR,
                metadata={
                    "partitions": len(results),
                    "failed_partitions": ", ".join(k for k, _ in failed[:50]) or "none",
                    "n_failed": len(failed),
                },
            )
        )
    return combined


def run_partition_keys(context: dg.AssetExecutionContext) -> list[str]:
    """This run's partition keys. A one-partition run's key is read from its tag:
    `context.partition_keys` asks the instance whether both ends of the range exist
    (two event-log queries per call)."""
    if context.has_partition_key:
        return [context.partition_key]
    return list(context.partition_keys)


def partition_log(context: dg.AssetExecutionContext) -> Callable[[str], None]:
    """`context.log.info` when the run has one partition, else a no-op: every log line is
    an event-log write (~15 ms on SQLite), and a batch's per-partition table says the same."""
    if len(run_partition_keys(context)) == 1:
        return context.log.info
    return lambda message: None


def materialize_partitions(
    context: dg.AssetExecutionContext, compute: Callable[[str], PartitionOutcome]
) -> dg.MaterializeResult:
    """Run `compute` for every partition key of this run. One key: its own metadata and
    checks, as before batching. Several: totals, a per-partition table and one check
    result per check over the batch; a Failure naming every key that failed."""
    keys = run_partition_keys(context)
    if len(keys) == 1:
        outcome = compute(keys[0])
        return dg.MaterializeResult(metadata=outcome.metadata, check_results=outcome.checks)
    outcomes: list[PartitionOutcome] = []
    done: list[str] = []
    errors: dict[str, str] = {}
    for key in keys:
        try:
            outcomes.append(compute(key))
            done.append(key)
        except Exception as exc:  # one bad partition must not stop the others
            message = exc.description if isinstance(exc, dg.Failure) else f"{exc}"
            errors[key] = f"{type(exc).__name__}: {message}"
            context.log.error(f"{key}: {errors[key]}")
    if errors:
        listed = "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:20])
        raise dg.Failure(
            description=f"{len(errors)} of {len(keys)} partitions failed ({listed})",
            metadata={"failed": ", ".join(errors), "succeeded": len(done)},
        )
    columns = sorted({c for o in outcomes for c in o.summary})
    table = md_table(
        ["partition", *columns],
        [
            [k, *(o.summary.get(c, "") for c in columns)]
            for k, o in zip(done, outcomes, strict=True)
        ][:200],
    )
    return dg.MaterializeResult(
        metadata={
            "partitions": len(keys),
            "dagster/row_count": sum(_row_count(o) for o in outcomes),
            "per_partition": dg.MetadataValue.md(table),
        },
        check_results=_combined_checks(done, outcomes),
    )
