"""`rts`: simulate the embedded default data and refresh every asset on a persistent instance."""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rts_dagster import settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_FALLBACK_INSTANCE_YAML = "telemetry:\n  enabled: false\n"


def ensure_instance_home() -> Path:
    """Point DAGSTER_HOME at a persistent directory holding our dagster.yaml."""
    home = settings.dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    target = home / "dagster.yaml"
    template = PROJECT_ROOT / "dagster.yaml"
    if template.exists():
        if not target.exists() or target.read_bytes() != template.read_bytes():
            shutil.copyfile(template, target)
    elif not target.exists():
        target.write_text(_FALLBACK_INSTANCE_YAML)
    return home


def _has_offline_runs(directory: Path) -> bool:
    return directory.exists() and next(directory.rglob("*.wandb"), None) is not None


def cmd_simulate(args: argparse.Namespace) -> int:
    from rts_dagster.simulate.writer import simulate_default

    out = Path(args.out).resolve() if args.out else settings.offline_dir()
    if args.if_missing and _has_offline_runs(out):
        print(f"rts simulate: offline runs already present under {out}; skipping")
        return 0
    started = time.perf_counter()
    # wandb.init(dir=D) writes into D/wandb/: aim D at the parent of a `wandb` folder.
    wandb_parent = out.parent if out.name == "wandb" else out
    if args.engine == "mettagrid":
        paths = _simulate_mettagrid(args, wandb_parent)
    else:
        if args.time_budget is not None or args.seeds is not None:
            print("rts simulate: --time-budget and --seeds apply to --engine mettagrid only")
            return 2
        jobs = 2 if args.jobs is None else args.jobs
        paths = simulate_default(wandb_parent, n_jobs=jobs, epochs=args.epochs)
    written = wandb_parent / "wandb"
    print(
        f"rts simulate: wrote {len(paths)} runs under {written} in "
        f"{time.perf_counter() - started:.1f}s"
    )
    if not written.resolve().is_relative_to(settings.offline_dir().resolve()):
        # refresh searches $RTS_OFFLINE_DIR only: say how to point it at these runs
        print(f"  rts refresh reads $RTS_OFFLINE_DIR: run `RTS_OFFLINE_DIR={out} rts refresh`")
    return 0


def _simulate_mettagrid(args: argparse.Namespace, wandb_parent: Path) -> list[Path]:
    """Real MettaGrid training runs (needs the `mettagrid` extra; docs/mettagrid_engine.md)."""
    try:
        from rts_dagster.mettagrid_engine.run import DEFAULT_SEEDS, train_default
    except ImportError as error:
        raise SystemExit(
            f"rts simulate --engine mettagrid: {error}; install the extra: "
            "pip install -e '.[mettagrid]'"
        ) from error
    seeds = DEFAULT_SEEDS if args.seeds is None else tuple(args.seeds)
    return train_default(
        wandb_parent,
        seeds=seeds,
        epochs=args.epochs,
        time_budget=args.time_budget,
        jobs=args.jobs,
        policy=args.policy,
    )


def cmd_refresh(args: argparse.Namespace) -> int:
    ensure_instance_home()
    from rts_dagster.refresh import refresh

    return refresh(force=args.force, quiet=args.quiet, jobs=args.jobs, batch=args.batch)


def cmd_instance(args: argparse.Namespace) -> int:
    print(ensure_instance_home())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rts",
        description="Reward-stream analysis for Learning Progress curricula (Dagster assets).",
        epilog="Settings: RTS_DATA_DIR (outputs, default ./data), RTS_OFFLINE_DIR (offline "
        "WandB runs, default $RTS_DATA_DIR/wandb), RTS_RULES (YAML task/seed rules), "
        "DAGSTER_HOME (default $RTS_DATA_DIR/dagster_home).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="write the embedded default data: 3 tasks x 3 seeds of offline WandB runs",
        description="Simulate closed-loop LP training runs and write them with the real wandb "
        "library in offline mode (plus the per-completion reward stream).",
    )
    sim.add_argument(
        "--out",
        help="directory for the runs (default $RTS_OFFLINE_DIR); wandb writes them under "
        "OUT/wandb/ unless OUT is itself named wandb. To analyse runs written elsewhere, "
        "run `RTS_OFFLINE_DIR=OUT rts refresh` (the whole tree is searched)",
    )
    sim.add_argument("--if-missing", action="store_true", help="do nothing if runs exist")
    sim.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="parallel processes (default 2; mettagrid: one per seed)",
    )
    sim.add_argument("--epochs", type=int, default=None, help="epochs per run (default: model's)")
    sim.add_argument(
        "--engine",
        choices=("simulator", "mettagrid"),
        default="simulator",
        help="simulator (default): the embedded learner model; mettagrid: real MettaGrid "
        "environments trained by PPO under per-worker LP, logged as Metta logs (needs the "
        "extra: pip install -e '.[mettagrid]'; default set ~3-4 min on 2 cores, "
        "docs/mettagrid_engine.md)",
    )
    sim.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="mettagrid: stop each run after this many seconds (its length then depends on "
        "the machine's speed; --epochs stays a cap)",
    )
    sim.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="mettagrid: seeds (default 1 2 3)"
    )
    sim.add_argument(
        "--policy",
        choices=("ppo", "random"),
        default="ppo",
        help="mettagrid: the learner (random needs no torch: a smoke run)",
    )
    sim.set_defaults(func=cmd_simulate)

    ref = sub.add_parser(
        "refresh",
        help="discover runs and materialize every new or changed partition and its downstream",
        description="Materialize discovered_runs, then reward_streams (and downstream) for every "
        "partition whose run is new or changed, then the aggregates and the report, on the "
        "persistent Dagster instance in $DAGSTER_HOME (visible afterwards in `make ui`).",
    )
    ref.add_argument("--force", action="store_true", help="re-materialize every partition")
    ref.add_argument("--quiet", action="store_true", help="print only the summary")
    ref.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes for the per-run assets (default: the machine's cores)",
    )
    ref.add_argument(
        "--batch",
        type=int,
        default=settings.REFRESH_BATCH,
        help=f"partitions per Dagster run (default {settings.REFRESH_BATCH}; 1 = one run per partition). Every "
        "partition is still its own materialization; a failed batch is redone key by key",
    )
    ref.set_defaults(func=cmd_refresh)

    inst = sub.add_parser("instance", help="create $DAGSTER_HOME with dagster.yaml; print it")
    inst.set_defaults(func=cmd_instance)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    args = build_parser().parse_args(argv)
    return args.func(args)


def exit_now(code: int) -> NoReturn:
    """Exit with `code` once exit handlers have run and output is flushed, skipping the
    interpreter's teardown: freeing Dagster's module graph object by object takes ~0.9 s
    after every command and does nothing we need (every file we write is closed, and
    replaced atomically, before this)."""
    atexit._run_exitfuncs()  # logging.shutdown, Dagster's and multiprocessing's handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> NoReturn:
    """The `rts` console script: `main`, then `exit_now`."""
    try:
        code = main()
    except SystemExit as stop:  # argparse's --help and usage errors
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    exit_now(code)


if __name__ == "__main__":
    run()
