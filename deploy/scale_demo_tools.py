"""Helpers for deploy/scale_demo.sh: submit runs through the webserver, wait for them, and
print the evidence (from Postgres by SQL, and from the UI's GraphQL) that the demo ran on
the scale-out instance with several Celery workers.

Subcommands: `submit`, `wait`, `evidence`. Connection settings come from the same
environment the Dagster processes use (DAGSTER_HOME, DAGSTER_PG_*).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from typing import Any

LOCATION = "rts_dagster_scale"
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def _client(port: int) -> Any:
    from dagster_graphql import DagsterGraphQLClient

    return DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60)


def submit(port: int, job: str, partitions: Sequence[str], all_partitions: bool) -> list[str]:
    """Queue one run of `job` (per partition, if any) through the webserver, as the UI does."""
    keys: list[str | None] = list(partitions)
    if all_partitions:
        from dagster import DagsterInstance

        with DagsterInstance.get() as instance:
            keys = list(instance.get_dynamic_partitions("runs"))
        if not keys:
            raise SystemExit("no `runs` partitions registered: run scale_discover first")
    if not keys:
        keys = [None]
    client = _client(port)
    run_ids = []
    for key in keys:
        tags = {"dagster/partition": key} if key else None
        run_ids.append(
            client.submit_job_execution(job, repository_location_name=LOCATION, tags=tags)
        )
    return run_ids


def wait(run_ids: Sequence[str], timeout: float) -> int:
    """Poll the instance until every run is terminal; 0 if all succeeded."""
    from dagster import DagsterInstance

    deadline = time.monotonic() + timeout
    seen_queued: set[str] = set()
    with DagsterInstance.get() as instance:
        while True:
            statuses = {}
            for run_id in run_ids:
                run = instance.get_run_by_id(run_id)
                statuses[run_id] = "MISSING" if run is None else run.status.value
            seen_queued |= {r for r, s in statuses.items() if s == "QUEUED"}
            if all(s in TERMINAL for s in statuses.values()):
                break
            if time.monotonic() > deadline:
                print(f"timeout after {timeout:.0f}s: {dict(Counter(statuses.values()))}")
                return 2
            time.sleep(1.0)
        counts = Counter(statuses.values())
        print(
            f"  {len(run_ids)} run(s): {dict(counts)}; seen QUEUED while polling: "
            f"{len(seen_queued)}"
        )
        for run_id, status in statuses.items():
            if status != "SUCCESS":
                _print_failure(instance, run_id)
    return 0 if counts.get("SUCCESS", 0) == len(run_ids) else 1


def _print_failure(instance: Any, run_id: str) -> None:
    """Print the failure messages (and errors) of one run from its event log."""
    print(f"  run {run_id} did not succeed:")
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        data = getattr(event, "event_specific_data", None) if event else None
        error = getattr(data, "error", None)
        if event is not None and (event.is_failure or error is not None):
            print(f"    {event.event_type_value} {event.step_key or ''}: {event.message}")
            if error is not None:
                print("      " + error.to_string().replace("\n", "\n      ")[-3000:])


def _connect() -> Any:
    import psycopg2

    return psycopg2.connect(
        host=os.environ["DAGSTER_PG_HOST"],
        port=int(os.environ["DAGSTER_PG_PORT"]),
        user=os.environ["DAGSTER_PG_USER"],
        password=os.environ["DAGSTER_PG_PASSWORD"],
        dbname=os.environ["DAGSTER_PG_DB"],
    )


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """Largest number of [start, end) intervals open at one instant."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    open_now = best = 0
    for _, change in points:
        open_now += change
        best = max(best, open_now)
    return best


def _step_events(cur: Any) -> list[tuple[str, str, str, float, Any]]:
    from dagster._serdes import deserialize_value

    cur.execute(
        "SELECT run_id, step_key, dagster_event_type, event FROM event_logs "
        "WHERE step_key IS NOT NULL AND dagster_event_type IN "
        "('STEP_START', 'STEP_SUCCESS', 'STEP_FAILURE', 'ENGINE_EVENT') ORDER BY id"
    )
    rows = []
    for run_id, step_key, event_type, body in cur.fetchall():
        entry = deserialize_value(body)
        rows.append((run_id, step_key, event_type, entry.timestamp, entry.dagster_event))
    return rows


def _graphql_runs(port: int) -> list[dict[str, Any]]:
    query = (
        "{ runsOrError(limit: 500) { __typename ... on Runs { results { runId jobName status "
        "tags { key value } } } } }"
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.load(response)
    return payload["data"]["runsOrError"]["results"]


def evidence(webserver_port: int | None, max_runs_limit: int, min_workers: int) -> int:
    """Print what Postgres holds (runs, event log, per-worker steps) and what the UI shows."""
    from dagster import DagsterEventType

    problems: list[str] = []
    with _connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT version()")
        print(f"  server: {cur.fetchone()[0].split(',')[0]}")
        cur.execute("SELECT status, count(*) FROM runs GROUP BY status ORDER BY status")
        run_counts = dict(cur.fetchall())
        cur.execute("SELECT count(*) FROM event_logs")
        n_events = cur.fetchone()[0]
        cur.execute(
            "SELECT count(*), count(DISTINCT asset_key) FROM event_logs "
            "WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
        )
        n_mat, n_assets = cur.fetchone()
        # queue waits: RUN_ENQUEUED -> RUN_STARTING (the daemon launched it), per run; both
        # are stored under their legacy PIPELINE_* names
        cur.execute(
            "SELECT run_id, dagster_event_type, extract(epoch FROM timestamp) FROM event_logs "
            "WHERE dagster_event_type IN (%s, %s)",
            (DagsterEventType.RUN_ENQUEUED.value, DagsterEventType.RUN_STARTING.value),
        )
        queue_times: dict[str, dict[str, float]] = {}
        for run_id, event_type, ts in cur.fetchall():
            queue_times.setdefault(run_id, {})[event_type] = float(ts)
        cur.execute("SELECT start_time, end_time FROM runs WHERE start_time IS NOT NULL")
        run_spans = [(s, e if e is not None else float("inf")) for s, e in cur.fetchall()]
        steps = _step_events(cur)

    print(f"  runs table: {sum(run_counts.values())} runs {run_counts}")
    print(
        f"  event_logs table: {n_events} rows; {n_mat} asset materializations of {n_assets} assets"
    )
    enqueued, launched = DagsterEventType.RUN_ENQUEUED.value, DagsterEventType.RUN_STARTING.value
    waits = [t[launched] - t[enqueued] for t in queue_times.values() if len(t) == 2]
    print(
        f"  run queue: {sum(enqueued in t for t in queue_times.values())} runs enqueued, "
        f"{len(waits)} then launched by the daemon; longest wait in the queue "
        f"{max(waits, default=0.0):.1f} s"
    )
    if len(waits) != sum(run_counts.values()):
        problems.append("not every run went through the queued run coordinator")
    runs_at_once = max_overlap(run_spans)
    print(f"  most runs in progress at once: {runs_at_once} (limit {max_runs_limit})")
    if runs_at_once > max_runs_limit:
        problems.append(f"{runs_at_once} runs at once exceeds the limit {max_runs_limit}")

    worker_of: dict[tuple[str, str], str] = {}
    pid_of: dict[tuple[str, str], int] = {}
    start: dict[tuple[str, str], float] = {}
    end: dict[tuple[str, str], float] = {}
    for run_id, step_key, event_type, ts, dagster_event in steps:
        key = (run_id, step_key)
        if event_type == "ENGINE_EVENT":
            meta = dagster_event.event_specific_data.metadata
            if "Celery worker" in meta:
                worker_of[key] = str(meta["Celery worker"].value)
        elif event_type == "STEP_START":
            start[key], pid_of[key] = ts, dagster_event.pid
        else:
            end[key] = ts
    per_worker = Counter(f"{worker_of.get(k, '?')} pid {pid_of[k]}" for k in start)
    print(f"  steps executed: {len(start)}, by worker process:")
    for worker, n in sorted(per_worker.items()):
        print(f"    {worker}: {n} steps")
    spans_by_pid: dict[int, list[tuple[float, float]]] = {}
    for k, s in start.items():
        spans_by_pid.setdefault(pid_of[k], []).append((s, end.get(k, s)))
    workers_at_once = max_overlap(
        [(min(s for s, _ in v), max(e for _, e in v)) for v in spans_by_pid.values()]
    )
    steps_at_once = max_overlap([(start[k], end.get(k, start[k])) for k in start])
    print(f"  most steps running at once: {steps_at_once} (on distinct worker processes)")
    n_workers = len({pid_of[k] for k in start})
    if n_workers < min_workers:
        problems.append(f"steps ran in {n_workers} worker process(es), wanted >= {min_workers}")
    if any(k not in worker_of for k in start):
        problems.append("some steps did not run in a Celery worker")
    if workers_at_once < 2 <= min_workers:
        problems.append("worker processes never overlapped in time")

    if webserver_port is not None:
        ui_runs = _graphql_runs(webserver_port)
        ui_counts = Counter(r["status"] for r in ui_runs)
        ui_jobs = Counter(r["jobName"] for r in ui_runs)
        print(f"  UI (GraphQL runsOrError): {len(ui_runs)} runs {dict(ui_counts)} {dict(ui_jobs)}")
        if len(ui_runs) != sum(run_counts.values()):
            problems.append("the UI does not show the runs that Postgres holds")

    for problem in problems:
        print(f"  PROBLEM: {problem}")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scale_demo_tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_submit = sub.add_parser("submit", help="queue runs through the webserver; print run ids")
    p_submit.add_argument("--port", type=int, required=True)
    p_submit.add_argument("--job", required=True)
    p_submit.add_argument("--partition", action="append", default=[])
    p_submit.add_argument("--all-partitions", action="store_true")
    p_wait = sub.add_parser("wait", help="wait for runs to finish")
    p_wait.add_argument("run_ids", nargs="+")
    p_wait.add_argument("--timeout", type=float, default=900)
    p_ev = sub.add_parser("evidence", help="print the Postgres / UI evidence")
    p_ev.add_argument("--webserver-port", type=int)
    p_ev.add_argument("--max-runs", type=int, required=True)
    p_ev.add_argument("--min-workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "submit":
        print(" ".join(submit(args.port, args.job, args.partition, args.all_partitions)))
        return 0
    if args.command == "wait":
        return wait(args.run_ids, args.timeout)
    return evidence(args.webserver_port, args.max_runs, args.min_workers)


if __name__ == "__main__":
    sys.exit(main())
