from datetime import UTC, datetime, timedelta
from urllib.parse import unquote, urlsplit

import polars as pl
import pytest

from rts_dagster.discovery import (
    DiscoveryRule,
    DiscoveryRules,
    classify_runs,
    extract_lp_config,
    load_rules,
    match_run,
    partition_key,
    row_files,
    slug,
    wandb_run_url,
    wandb_web_root,
    with_run_urls,
)
from rts_dagster.schema import DISCOVERED_RUNS, conform
from rts_dagster.sources.base import RunRecord, UnreadableRun

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def run(name, config=None, tags=("user:alice",), created=0, run_id=None, state="finished"):
    return RunRecord(
        run_id=run_id or name,
        run_name=name,
        project="metta",
        entity="metta-research",
        tags=tuple(tags),
        config=config or {},
        state=state,
        created_at=T0 + timedelta(minutes=created),
        heartbeat_at=T0 + timedelta(minutes=created + 60),
        source="offline",
        location=f"/runs/{run_id or name}.wandb",
        fingerprint="f",
    )


@pytest.mark.parametrize(
    ("name", "config", "task", "seed"),
    [
        ("alice.fixed_maps.seed1", {}, "fixed_maps", 1),
        ("alice.fixed.maps.seed12", {}, "fixed.maps", 12),  # DOMAIN.md's example name
        ("bob.assembly_lines", {"seed": 3}, "assembly_lines", 3),  # seed from config
        ("bob.assembly_lines", {"seed": "4"}, "assembly_lines", 4),
        ("bob.x.seed2", {"seed": 9}, "x", 2),  # the name wins over the config
    ],
)
def test_default_rule_parses_name_then_config(name, config, task, seed):
    match = match_run(run(name, config), DiscoveryRules())
    assert (match.task, match.seed) == (task, seed)


@pytest.mark.parametrize(
    ("name", "config"),
    [("nodots", {"seed": 1}), ("alice.task", {}), ("alice.task", {"seed": 1.5})],
)
def test_unmatched_runs_say_why(name, config):
    match = match_run(run(name, config), DiscoveryRules())
    assert match.task is None
    assert "default" in match.reason


def test_custom_rules_filters_and_fixed_task(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - name: lines\n"
        "    name_regex: '^lines-(?P<seed>\\d+)$'\n"
        "    task: assembly_lines\n"
        "    tags_all: ['user:bob']\n"
        "    states: [finished]\n"
    )
    rules = load_rules(path)
    assert match_run(run("lines-7", tags=["user:bob"]), rules).task == "assembly_lines"
    assert match_run(run("lines-7", tags=["user:bob"]), rules).seed == 7
    assert match_run(run("lines-7", tags=["user:carol"]), rules).task is None
    assert match_run(run("lines-7", tags=["user:bob"], state="crashed"), rules).task is None


def test_bad_rules_file_names_the_file(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name_regex: '(unclosed'\n")
    with pytest.raises(ValueError, match=r"rules\.yaml"):
        load_rules(path)
    path.write_text("rules:\n  - nme: typo\n")
    with pytest.raises(ValueError, match="nme"):
        load_rules(path)


@pytest.mark.parametrize(
    "text",
    [
        "a|b",
        "a,b",
        "a[b]",
        "../../etc/passwd",
        "a/b",
        "",
        ".",
        "..",
        "wandb",
        "report",
        "x" * 200,
        "a b\nc",
        "ünïcode",
        "<script>",
    ],
)
def test_slug_is_safe_for_paths_and_keys(text):
    s = slug(text)
    assert s and len(s) <= 64
    assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in s)
    assert s not in {".", ".."} and not s.startswith(".")
    assert s not in {"wandb", "report"}


def test_slug_keeps_clean_names_and_separates_collisions():
    assert slug("fixed_maps") == "fixed_maps"
    assert slug("a|b") != slug("a,b")  # both sanitise to a-b; the hash keeps them apart
    assert slug("a/b") != slug("a-b")


def test_classify_lists_every_run_and_never_overwrites_duplicates():
    runs = [
        run("alice.fixed_maps.seed1", created=0, run_id="r1"),
        run("alice.fixed_maps.seed1", created=5, run_id="r2"),  # rerun, same task/seed
        run("alice.fixed_maps.seed2", created=1),
        run("stray-run", created=2),
    ]
    bad = [UnreadableRun(location="/runs/bad.wandb", error="bad CRC at byte 77", source="offline")]
    table = classify_runs(runs, bad, DiscoveryRules())
    assert table.schema == DISCOVERED_RUNS
    assert table.height == 5
    keys = table.filter(pl.col("status") == "matched")["partition_key"].to_list()
    # both runs of a (task, seed) found together get run-id keys: neither depends on order
    assert sorted(keys) == sorted(
        ["fixed_maps.seed1.r1", "fixed_maps.seed1.r2", "fixed_maps.seed2"]
    )
    assert len(set(keys)) == len(keys)
    dup = table.filter(pl.col("run_id") == "r2").row(0, named=True)
    assert "r1" in dup["reason"]
    stray = table.filter(pl.col("run_name") == "stray-run").row(0, named=True)
    assert stray["status"] == "ignored" and stray["partition_key"] is None
    unreadable = table.filter(pl.col("status") == "unreadable").row(0, named=True)
    assert unreadable["location"] == "/runs/bad.wandb" and "byte 77" in unreadable["reason"]
    assert table.filter(pl.col("run_id") == "r1")["user"].item() == "alice"


def test_partition_keys_avoid_dagster_separators():
    key = partition_key("weird|task,[x]", 3)
    assert not set("|,[]") & set(key)
    assert key.endswith(".seed3")


def test_extract_lp_config_from_nested_metta_config():
    config = {
        "seed": 1,
        "trainer": {
            "curriculum": {
                "num_active_tasks": 64,
                "algorithm": {"type": "learning_progress", "ema_timescale": 0.001, "lp_gain": 0.1},
            }
        },
        "other": {"deep": {"ema_timescale": 0.5}},
    }
    lp = extract_lp_config(config)
    assert lp == {"num_active_tasks": 64, "ema_timescale": 0.001, "lp_gain": 0.1}


def test_rule_config_equals_uses_dotted_keys():
    rules = DiscoveryRules(
        rules=[DiscoveryRule(name="nav", config_equals={"trainer.recipe": "nav"})]
    )
    ok = run("a.nav.seed1", config={"trainer": {"recipe": "nav"}})
    other = run("a.nav.seed1", config={"trainer": {"recipe": "cvc"}})
    assert match_run(ok, rules).task == "nav"
    assert match_run(other, rules).task is None


def test_no_task_slug_can_collide_with_an_output_file_or_folder(tmp_path):
    """Task folders share metrics/ and lp/ with the aggregate files: a task named like one
    of them gets a hashed slug, so a run can never overwrite or block another output."""
    from rts_dagster import storage
    from rts_dagster.discovery import slug

    paths = [
        storage.discovered_runs_path(tmp_path),
        storage.variance_table_path(tmp_path),
        storage.timescales_path(tmp_path),
        *storage.lp_aggregate_paths(tmp_path).values(),
        *storage.quality_paths(tmp_path).values(),
        storage.lp_timescales_path(tmp_path),
        storage.epoch_view_path(tmp_path),
        storage.verdicts_path(tmp_path),
        storage.aggregates_manifest_path(tmp_path),
        storage.report_dir(tmp_path),
        storage.metrics_dir(tmp_path),
        storage.lp_dir(tmp_path),
    ]
    for path in paths:
        assert slug(path.name) != path.name, path.name


def _keys(table: pl.DataFrame) -> dict[str, str]:
    matched = table.filter(pl.col("status") == "matched")
    return dict(zip(matched["run_id"], matched["partition_key"], strict=True))


def _files(table: pl.DataFrame) -> dict[str, tuple[str, str]]:
    return {
        row["run_id"]: row_files(row)
        for row in table.filter(pl.col("status") == "matched").iter_rows(named=True)
    }


@pytest.mark.parametrize(
    "runs",
    [
        # issue 10 (a): a rerun of `coll.seed1` and task `coll.seed1` seed 2
        [
            run("rt.coll.seed1", run_id="r1"),
            run("rt.coll.seed1", run_id="seed2", created=1),
            run("rt.coll.seed1.seed2", run_id="r3", created=2),
        ],
        # issue 10 (b): a clean task name forging the hashed slug of another
        [
            run("rt.a|b.seed1", run_id="r1"),
            run(f"rt.{slug('a|b')}.seed1", run_id="r2"),
        ],
        # a run id that looks like a seed part, next to a task holding one
        [
            run("u.x.seed1", run_id="a"),
            run("u.x.seed1", run_id="seed2.b", created=1),
            run("u.x.seed1.seed2", run_id="c", created=2),
        ],
    ],
)
def test_distinct_runs_never_share_a_key_or_a_file(runs):
    table = classify_runs(runs, [], DiscoveryRules())
    keys = _keys(table)
    assert len(keys) == len(runs)  # every run matched
    assert len(set(keys.values())) == len(runs)
    assert len(set(_files(table).values())) == len(runs)


def test_keys_stay_when_a_run_found_later_is_older():
    """The run listed first keeps `fixed_maps.seed1` and `fixed_maps/1.parquet`; an
    earlier-created run of the same (task, seed) that appears later gets its own key."""
    newer = run("alice.fixed_maps.seed1", created=10, run_id="newer")
    older = run("alice.fixed_maps.seed1", created=0, run_id="older")
    first = classify_runs([newer], [], DiscoveryRules())
    assert _keys(first) == {"newer": "fixed_maps.seed1"}
    second = classify_runs([older, newer], [], DiscoveryRules(), previous=first)
    assert _keys(second) == {"newer": "fixed_maps.seed1", "older": "fixed_maps.seed1.older"}
    assert _files(second) == {"newer": ("fixed_maps", "1"), "older": ("fixed_maps", "1.older")}
    # the next refresh, listing in any order, changes nothing
    third = classify_runs([newer, older], [], DiscoveryRules(), previous=second)
    assert _keys(third) == _keys(second)


def test_a_gone_runs_key_is_never_handed_to_a_new_run():
    gone = run("alice.fixed_maps.seed1", run_id="gone")
    first = classify_runs([gone], [], DiscoveryRules())
    empty = classify_runs([], [], DiscoveryRules(), previous=first)  # the run disappeared
    newcomer = run("alice.fixed_maps.seed1", run_id="new", created=5)
    later = classify_runs(
        [newcomer], [], DiscoveryRules(), previous=empty, reserved_keys={"fixed_maps.seed1"}
    )
    assert _keys(later) == {"new": "fixed_maps.seed1.new"}
    # while the previous table still lists it, no reservation is needed
    direct = classify_runs([newcomer], [], DiscoveryRules(), previous=first)
    assert _keys(direct) == {"new": "fixed_maps.seed1.new"}


def test_run_listed_twice_under_one_id_is_not_keyed_twice():
    a = run("alice.fixed_maps.seed1", run_id="r1")
    copy = RunRecord(**{**a.__dict__, "location": "/backup/r1.wandb"})
    table = classify_runs([a, copy], [], DiscoveryRules())
    assert table.filter(pl.col("status") == "matched").height == 1
    assert "listed twice" in table.filter(pl.col("status") == "ignored")["reason"].item()


@pytest.mark.parametrize(
    ("name", "config"),
    [("alice.fixed_maps.seed99999999999999999999", {}), ("alice.fixed_maps", {"seed": 2**70})],
)
def test_seed_beyond_int64_is_unreadable_and_the_others_go_on(name, config):
    runs = [run(name, config, run_id="huge"), run("alice.fixed_maps.seed2", run_id="ok")]
    table = classify_runs(runs, [], DiscoveryRules())
    bad = table.filter(pl.col("run_id") == "huge").row(0, named=True)
    assert bad["status"] == "unreadable" and "64-bit" in bad["reason"]
    assert _keys(table) == {"ok": "fixed_maps.seed2"}


def test_big_integer_seed_text_is_read_exactly():
    match = match_run(run("alice.t.seed9007199254740993"), DiscoveryRules())
    assert match.seed == 9007199254740993  # 2**53 + 1: a float round trip would lose the 1


def _with(record: RunRecord, **changes) -> RunRecord:
    return RunRecord(**{**record.__dict__, **changes})


def test_every_run_with_entity_and_project_links_to_its_wandb_page(monkeypatch):
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    runs = [
        run("alice.fixed_maps.seed1", run_id="ab12cd34"),
        run("nodots", run_id="zz99"),  # ignored runs are linked too
        _with(run("alice.x.seed1", run_id="noentity"), entity=""),
    ]
    bad = [UnreadableRun(location="/runs/cut.wandb", error="cut", source="offline")]
    table = classify_runs(runs, bad, DiscoveryRules())
    urls = dict(zip(table["location"], table["url"], strict=True))
    assert urls["/runs/ab12cd34.wandb"] == "https://wandb.ai/metta-research/metta/runs/ab12cd34"
    assert urls["/runs/zz99.wandb"] == "https://wandb.ai/metta-research/metta/runs/zz99"
    assert urls["/runs/noentity.wandb"] is None  # entity unknown: no guessed link
    assert urls["/runs/cut.wandb"] is None


@pytest.mark.parametrize(
    ("base_url", "root"),
    [
        (None, "https://wandb.ai"),
        ("", "https://wandb.ai"),
        ("https://api.wandb.ai", "https://wandb.ai"),  # the cloud API host -> its web app
        ("https://wandb.acme.io/", "https://wandb.acme.io"),
        ("http://10.0.0.5:8080/some/path", "http://10.0.0.5:8080"),
        ("https://user:secret@wandb.acme.io", "https://wandb.acme.io"),  # no credentials
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("ftp://wandb.acme.io", "https://wandb.ai"),  # not a web URL: the default
        ("https://wandb.acme.io:notaport", "https://wandb.ai"),
    ],
)
def test_wandb_web_root_is_the_configured_host(base_url, root):
    assert wandb_web_root(base_url) == root


def test_run_url_follows_wandb_base_url_and_quotes_untrusted_parts(monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.acme.io")
    hostile = _with(run("alice.x.seed1", run_id="r/../1?a=b#c"), entity="..", project="p q&<>")
    url = classify_runs([hostile], [], DiscoveryRules())["url"][0]
    assert url == "https://wandb.acme.io/%2E%2E/p%20q%26%3C%3E/runs/r%2F..%2F1%3Fa%3Db%23c"
    parts = urlsplit(url)
    assert (parts.netloc, parts.query, parts.fragment) == ("wandb.acme.io", "", "")
    # quoting is reversible: each path segment reads back as the original text
    assert [unquote(p) for p in parts.path.split("/")[1:]] == [
        "..",
        "p q&<>",
        "runs",
        "r/../1?a=b#c",
    ]
    assert wandb_run_url("e", "p", "id", base_url="https://other.io") == (
        "https://other.io/e/p/runs/id"
    )


def test_an_older_discovered_runs_table_gets_its_urls_and_conforms(monkeypatch):
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    runs = [run("alice.fixed_maps.seed1", run_id="ab12"), _with(run("b.x.seed1"), project="")]
    old = classify_runs(runs, [], DiscoveryRules()).drop("url")  # as written before `url`
    upgraded = conform(with_run_urls(old), DISCOVERED_RUNS, "discovered_runs")
    assert upgraded["url"].to_list() == ["https://wandb.ai/metta-research/metta/runs/ab12", None]
    # a url already there is kept
    kept = with_run_urls(upgraded, base_url="https://other.io")
    assert kept["url"].to_list() == upgraded["url"].to_list()
