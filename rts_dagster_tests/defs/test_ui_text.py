"""What the Dagster UI shows: every asset check described, no description the UI's
Markdown would eat (a `<task>` placeholder renders as an HTML tag and vanishes)."""

from __future__ import annotations

from rts_dagster.definitions import defs


def test_every_asset_check_has_a_description():
    graph = defs.resolve_asset_graph()
    keys = list(graph.asset_check_keys)
    assert len(keys) >= 6
    for key in keys:
        spec = graph.get_check_spec(key)
        assert spec.description and len(spec.description) > 20, key


def test_asset_descriptions_survive_markdown():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        description = graph.get(key).description or ""
        assert description, key
        assert "<" not in description and ">" not in description, (key, description)
