"""The experiment plan: arms and seeds from a verdict, run names the discovery rules map
back to the right task and arm, shell-safe commands."""

from __future__ import annotations

import copy
import shlex

import polars as pl

from rts_dagster.analysis.experiment_plan import PlanConfig, parse_settings, plan_experiments
from rts_dagster.discovery import LP_CONFIG_KEYS, DiscoveryRules, classify_runs
from rts_dagster.report.plan import render_plan
from rts_dagster.schema import RUN_STATUS_MATCHED, VERDICTS
from rts_dagster_tests.test_arms import FIXED_MAPS_TG, metta_config
from rts_dagster_tests.test_discovery import run

PROPOSAL = "ema_timescale=0.00627, slow_timescale_factor=0.899"


def verdicts(task="fixed_maps", seeds=3, action="keep_default", proposal=PROPOSAL):
    return pl.DataFrame(
        [
            {
                "task": task,
                "action": action,
                "proposal": proposal,
                "confidence": "low",
                "conflict": True,
                "rule": "3: noise vs replay",
                "settle_arms": ["metta_default", proposal],
                "settle_seeds_per_arm": seeds,
                "settle_reason": "the noise analysis proposes it; the replay finds it worse",
                "evidence": [],
            }
        ],
        schema=VERDICTS,
    )


def baseline_runs(seeds=(1, 2)):
    return [
        run(
            f"prashant.fixed.maps.seed{s}",
            metta_config(f"prashant.fixed.maps.seed{s}", s, FIXED_MAPS_TG),
            created=s,
        )
        for s in seeds
    ]


def with_overrides(config: dict, overrides: list[str], prefix: str) -> dict:
    """What the launcher does with `key.path=value` overrides (here: the LP block)."""
    out = copy.deepcopy(config)
    node = out["training_env"]["curriculum"]["algorithm_config"]
    for item in overrides:
        key, value = item.split("=", 1)
        assert key.startswith(prefix + ".")
        node[key[len(prefix) + 1 :]] = float(value)
    return out


def test_plan_arms_seeds_and_names_map_back_to_task_and_arm():
    runs = baseline_runs()
    discovered = classify_runs(runs, [], DiscoveryRules())
    plan = plan_experiments(verdicts(seeds=4), discovered, LP_CONFIG_KEYS)
    assert plan.height == 8  # 2 arms x 4 seeds
    base = plan.filter(pl.col("arm") == "baseline")
    arm = plan.filter(pl.col("arm") != "baseline")
    # the baseline's own seeds first (pairing), then new ones; existing runs found
    assert base["seed"].to_list() == arm["seed"].to_list() == [1, 2, 3, 4]
    assert base["exists"].to_list() == [True, True, False, False]
    assert base["run_name"][0] == "prashant.fixed.maps.seed1"
    assert not arm["exists"].any()
    assert arm["overrides"][0].to_list() == [
        "trainer.curriculum.algorithm_config.ema_timescale=0.00627",
        "trainer.curriculum.algorithm_config.slow_timescale_factor=0.899",
    ]
    assert arm["command"][0].startswith(
        "./devops/skypilot/launch.py recipes.prod.cvc.fixed_maps.train run=prashant.fixed_maps."
    )
    # launch the planned runs (config = baseline's + overrides): discovery maps every one
    # back to the plan's task, and the arm runs to one arm that is not the baseline
    prefix = PlanConfig().override_prefix
    launched = []
    for i, r in enumerate(plan.filter(~pl.col("exists")).iter_rows(named=True)):
        cfg = with_overrides(
            metta_config(r["run_name"], r["seed"], FIXED_MAPS_TG), r["overrides"], prefix
        )
        launched.append(run(r["run_name"], cfg, created=10 + i))
    table = classify_runs(runs + launched, [], DiscoveryRules(), previous=discovered)
    found = {
        r["run_name"]: r for r in table.filter(pl.col("status") == RUN_STATUS_MATCHED).to_dicts()
    }
    for r in plan.iter_rows(named=True):
        assert found[r["run_name"]]["task"] == "fixed_maps"
        assert found[r["run_name"]]["baseline"] == (r["arm"] == "baseline")
    arms = {found[r["run_name"]]["arm"] for r in arm.iter_rows(named=True)}
    assert arms == {PROPOSAL}
    # and the refreshed plan sees them all
    again = plan_experiments(verdicts(seeds=4), table, LP_CONFIG_KEYS)
    assert again["exists"].all()
    assert set(again.filter(pl.col("arm") != "baseline")["found_arm"]) == {PROPOSAL}


def test_no_plan_without_a_proposal_and_seed_bounds():
    discovered = classify_runs(baseline_runs(), [], DiscoveryRules())
    none = plan_experiments(
        verdicts(proposal=None).with_columns(pl.lit(["metta_default"]).alias("settle_arms")),
        discovered,
        LP_CONFIG_KEYS,
    )
    assert none.height == 0
    assert "nothing is planned" in render_plan(none, PlanConfig().command_template)
    big = plan_experiments(verdicts(seeds=40), discovered, LP_CONFIG_KEYS)
    assert big.filter(pl.col("arm") == "baseline").height == PlanConfig().max_seeds
    small = plan_experiments(verdicts(seeds=None), discovered, LP_CONFIG_KEYS)
    assert small.filter(pl.col("arm") == "baseline").height == PlanConfig().min_seeds


def test_untrusted_names_are_quoted_in_commands_and_escaped_in_markdown():
    evil = "x$(touch pwned)`id`"
    runs = [run(f"{evil}.fixed.maps.seed1", metta_config("a", 1, FIXED_MAPS_TG))]
    discovered = classify_runs(runs, [], DiscoveryRules())
    plan = plan_experiments(verdicts(), discovered, LP_CONFIG_KEYS)
    for command in plan["command"].to_list():
        words = shlex.split(command)
        assert any(w.startswith(f"run={evil}.") for w in words)  # one word, not executed
    text = render_plan(plan, PlanConfig().command_template)
    assert "```sh" in text or "````sh" in text
    table = text.split("Launch the missing runs")[0]
    assert "`id`" not in table and "\\`id\\`" in table  # no code span from a run name


def test_parse_settings_keeps_only_lp_keys():
    assert parse_settings("ema_timescale=0.003 and foo=1, memory=25", LP_CONFIG_KEYS) == {
        "ema_timescale": "0.003",
        "memory": "25",
    }
