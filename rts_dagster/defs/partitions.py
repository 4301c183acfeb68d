"""Partitions: one dynamic dimension, one key per training run.

The key encodes the (task, seed) pair (`<task slug>.seed<N>`), not a 2-D multi-partition:
two dynamic dimensions form a cross product whose never-existing combinations stay
missing forever and block eager automation downstream (STACK.md, docs/ARCHITECTURE.md).
"""

import dagster as dg

RUNS_PARTITIONS_NAME = "runs"
runs_partitions = dg.DynamicPartitionsDefinition(name=RUNS_PARTITIONS_NAME)
