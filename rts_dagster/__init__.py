"""rts_dagster: reward-stream analysis for Learning Progress curricula, as Dagster assets."""
