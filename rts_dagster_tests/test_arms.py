"""Tasks from configs and aliases, arms from config diffs (discovery.resolve_tasks,
arms.assign_arms), on runs named and configured as the study plan's are."""

from __future__ import annotations

import copy
import json

import polars as pl
import pytest

from rts_dagster.arms import flatten_config, is_bookkeeping, setting_keys
from rts_dagster.discovery import DiscoveryRules, classify_runs, partition_key
from rts_dagster.schema import RUN_STATUS_MATCHED
from rts_dagster_tests.test_discovery import run

FIXED_MAPS_TG = {"missions": ["extractor_hub_30", "collect_far"], "max_steps": [750, 1000]}


def metta_config(name: str, seed: int, tg: dict, **lp: object) -> dict:
    """A run config shaped like Metta's tool config (DOMAIN.md): LP settings in
    `algorithm_config`, the task generator beside it, bookkeeping that differs per run."""
    return {
        "run": name,
        "seed": seed,
        "run_dir": f"/tmp/train_dir/{name}",
        "start_time": f"2026-11-0{seed}T10:00:00",
        "wandb": {"run_id": name, "group": "prashant"},
        "trainer": {"batch_size": 524288, "total_timesteps": 1_000_000_000},
        "training_env": {
            "curriculum": {
                "task_generator": copy.deepcopy(tg),
                "num_active_tasks": 1500,
                "algorithm_config": {
                    "ema_timescale": 0.001,
                    "slow_timescale_factor": 0.2,
                    "exploration_bonus": 0.1,
                    **lp,
                },
            }
        },
    }


def plan_runs():
    """The issue's six runs: baseline x2, z30 x2 (same recipe), variants, density."""
    out = []
    for i, seed in enumerate((1, 2)):
        name = f"prashant.fixed.maps.seed{seed}"
        out.append(run(name, metta_config(name, seed, FIXED_MAPS_TG), created=i))
    for i, seed in enumerate((1, 2)):
        name = f"prashant.fixed.maps.z30.seed{seed}"
        cfg = metta_config(name, seed, FIXED_MAPS_TG, z_score_amplification=30)
        out.append(run(name, cfg, created=10 + i))
    out.append(run("prashant.variants.seed0", metta_config("v", 0, {"variants": 42}), created=20))
    out.append(run("prashant.density.seed0", metta_config("d", 0, {"density": 3}), created=21))
    return out


def matched(table: pl.DataFrame) -> dict[str, dict]:
    rows = table.filter(pl.col("status") == RUN_STATUS_MATCHED).iter_rows(named=True)
    return {r["run_name"]: r for r in rows}


def test_plan_names_map_to_plan_recipes_and_z30_is_an_arm_not_a_task():
    rows = matched(classify_runs(plan_runs(), [], DiscoveryRules()))
    assert len(rows) == 6
    fixed = [r for n, r in rows.items() if ".fixed.maps." in n]
    assert {r["task"] for r in fixed} == {"fixed_maps"}
    assert {r["recipe"] for r in fixed} == {"recipes.prod.cvc.fixed_maps.train"}
    assert rows["prashant.variants.seed0"]["recipe"] == (
        "recipes.experiment.cvc.variants_curriculum.train"
    )
    assert rows["prashant.density.seed0"]["recipe"] == "recipes.experiment.density_curriculum.train"
    # seeds of one setting share an arm; the z30 runs are another arm of the same task
    base = [rows[f"prashant.fixed.maps.seed{s}"] for s in (1, 2)]
    z30 = [rows[f"prashant.fixed.maps.z30.seed{s}"] for s in (1, 2)]
    assert {r["arm"] for r in base} == {"baseline"} and all(r["baseline"] for r in base)
    assert {r["arm"] for r in z30} == {"z_score_amplification=30"}
    assert not any(r["baseline"] for r in z30)
    assert len({r["arm_id"] for r in base}) == 1 and len({r["arm_id"] for r in z30}) == 1
    assert json.loads(z30[0]["arm_settings"]) == {
        "training_env.curriculum.algorithm_config.z_score_amplification": 30
    }
    assert "Metta's defaults" in base[0]["baseline_reason"]
    # every run says which rule and how its task was decided
    assert all(r["rule"] == "default" and r["task_source"] for r in rows.values())
    assert "prefix of name task 'fixed.maps.z30'" in z30[0]["task_source"]
    # keys: no two runs share one; the baseline keeps the plain key, the arm is readable
    keys = {r["partition_key"] for r in rows.values()}
    assert len(keys) == 6
    assert base[0]["partition_key"] == partition_key("fixed_maps", 1)
    assert z30[0]["partition_key"].startswith(partition_key("fixed_maps", 1) + ".")
    assert "duplicate" not in z30[0]["reason"]


def test_arms_come_from_configs_never_from_names():
    # same names as seeds of one task, but one run has a different LP value: two arms
    cfg1 = metta_config("a", 1, FIXED_MAPS_TG)
    cfg2 = metta_config("b", 2, FIXED_MAPS_TG, ema_timescale=0.005)
    cfg3 = metta_config("c", 3, FIXED_MAPS_TG)
    runs = [
        run("alice.fixed.maps.seed1", cfg1, created=0),
        run("alice.fixed.maps.seed2", cfg2, created=1),
        run("alice.fixed.maps.seed3", cfg3, created=2),
    ]
    rows = matched(classify_runs(runs, [], DiscoveryRules()))
    assert rows["alice.fixed.maps.seed2"]["arm"] == "ema_timescale=0.005"
    assert rows["alice.fixed.maps.seed1"]["arm"] == rows["alice.fixed.maps.seed3"]["arm"]
    assert rows["alice.fixed.maps.seed1"]["baseline"]
    # and a name part that looks like an arm is not one when the configs agree
    runs = [
        run("alice.fixed.maps.seed1", metta_config("a", 1, FIXED_MAPS_TG), created=0),
        run("alice.fixed.maps.z30.seed2", metta_config("b", 2, FIXED_MAPS_TG), created=1),
    ]
    rows = matched(classify_runs(runs, [], DiscoveryRules()))
    assert {r["arm"] for r in rows.values()} == {"baseline"}
    assert len({r["arm_id"] for r in rows.values()}) == 1


def test_bookkeeping_differences_do_not_make_arms():
    settings = [setting_keys(metta_config(f"r{s}", s, FIXED_MAPS_TG)) for s in (1, 2, 3)]
    assert settings[0] == settings[1] == settings[2]
    assert is_bookkeeping("wandb.group") and is_bookkeeping("trainer.checkpoint_dir")
    assert not is_bookkeeping("training_env.curriculum.algorithm_config.ema_timescale")
    assert flatten_config({"a": {"value": 3}, "b": {"c": [1, 2]}}) == {"a": 3, "b.c": [1, 2]}


def test_unknown_recipe_grouped_by_shared_task_generator():
    tg = {"maps": "bleeding-edge"}
    runs = [
        run("bob.newthing.seed1", metta_config("a", 1, tg), created=0),
        run("bob.newthing.big_z.seed1", metta_config("b", 1, tg, z_score_amplification=50)),
        run("bob.newthing.other.seed1", metta_config("c", 1, {"maps": "other"}), created=2),
    ]
    rows = matched(classify_runs(runs, [], DiscoveryRules()))
    assert rows["bob.newthing.big_z.seed1"]["task"] == "newthing"
    assert rows["bob.newthing.big_z.seed1"]["arm"] == "z_score_amplification=50"
    # a different task generator is a different task even though the name starts alike
    assert rows["bob.newthing.other.seed1"]["task"] == "newthing.other"


def test_prefix_alias_refused_when_the_task_generator_contradicts():
    runs = [
        run("p.fixed.maps.seed1", metta_config("a", 1, FIXED_MAPS_TG), created=0),
        run("p.fixed.maps.hard.seed1", metta_config("b", 1, {"other": 1}), created=1),
    ]
    rows = matched(classify_runs(runs, [], DiscoveryRules()))
    assert rows["p.fixed.maps.seed1"]["task"] == "fixed_maps"
    assert rows["p.fixed.maps.hard.seed1"]["task"] == "fixed.maps.hard"


def test_config_recipe_wins_and_user_aliases_and_baselines_apply():
    rules = DiscoveryRules.model_validate(
        {
            "aliases": {"nav": "recipes.navigation.train"},
            "baselines": {"nav": {"z_score_amplification": 10}},
        }
    )
    cfg10 = {**metta_config("a", 1, {}, z_score_amplification=10), "recipe": "x.y"}
    runs = [
        run("u.whatever.seed1", {**cfg10, "recipe": "recipes.navigation.train"}, created=0),
        run("u.nav.seed2", metta_config("b", 2, {}, z_score_amplification=10), created=1),
        run("u.nav.seed3", metta_config("c", 3, {}, z_score_amplification=30), created=2),
        run("u.nav.seed4", metta_config("c", 4, {}, z_score_amplification=30), created=3),
    ]
    rows = matched(classify_runs(runs, [], rules))
    assert rows["u.whatever.seed1"]["task"] == "nav"
    assert rows["u.whatever.seed1"]["task_source"] == "config recipe"
    # the user-named baseline wins over "most runs" (the z30 arm has two runs)
    assert rows["u.nav.seed2"]["arm"] == "baseline"
    assert rows["u.nav.seed3"]["arm"] == "z_score_amplification=30"
    assert "named in the rules" in rows["u.nav.seed2"]["baseline_reason"]


def test_keys_stay_stable_when_a_new_arm_arrives():
    first = classify_runs(plan_runs()[:2], [], DiscoveryRules())
    later = classify_runs(plan_runs(), [], DiscoveryRules(), previous=first)
    before = dict(first.select("run_id", "partition_key").iter_rows())
    after = dict(later.select("run_id", "partition_key").iter_rows())
    assert all(after[rid] == key for rid, key in before.items())
    assert len(set(after.values())) == len(after)


@pytest.mark.parametrize("n_more", [0, 2])
def test_arm_names_are_short_and_unique(n_more):
    extra = {f"knob{i}": i + 1 for i in range(n_more)}
    runs = [
        run("a.fixed.maps.seed1", metta_config("a", 1, FIXED_MAPS_TG), created=0),
        run(
            "a.fixed.maps.x.seed1",
            metta_config("b", 1, FIXED_MAPS_TG, ema_timescale=0.01, memory=10, **extra),
            created=1,
        ),
    ]
    rows = matched(classify_runs(runs, [], DiscoveryRules()))
    name = rows["a.fixed.maps.x.seed1"]["arm"]
    assert name.startswith("ema_timescale=0.01, memory=10")
    assert name.endswith("+1 more") if n_more == 2 else "more" not in name


def test_an_lp_key_written_at_its_default_is_the_same_arm_as_unset():
    explicit = metta_config("a", 1, FIXED_MAPS_TG, memory=25, lp_gain=0.1)
    unset = metta_config("b", 2, FIXED_MAPS_TG)
    runs = [
        run("alice.fixed.maps.seed1", explicit, created=0),
        run("alice.fixed.maps.seed2", unset, created=1),
    ]
    rows = matched(classify_runs(runs, [], DiscoveryRules()))
    assert {r["arm"] for r in rows.values()} == {"baseline"}
    assert len({r["arm_id"] for r in rows.values()}) == 1
