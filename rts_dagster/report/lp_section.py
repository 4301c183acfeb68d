"""The report's LP replay section (built from the lp_recommendations tables)."""

from __future__ import annotations

import polars as pl

from rts_dagster.report.document import Heading, Paragraph, Report


def add_lp_section(report: Report, lp: dict[str, pl.DataFrame]) -> None:
    """Append the LP configuration section to `report`."""
    report.add(Heading("LP configuration: replay and closed-loop check"))
    recs = lp["recommendations"]
    report.add(Paragraph([s for s in recs["sentence"].to_list()]))
