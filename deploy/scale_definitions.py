"""Scale-out code location: the same assets and resources as `rts_dagster.definitions`,
with every step sent to Celery workers through a broker (deploy/dagster.scale-out.yaml).

Three jobs cover the demo in dependency order: `scale_discover` (registers the `runs`
partitions), `scale_partition` (one run's reward_streams -> series_metrics + lp_replay,
three steps of which the last two can run on different workers at once) and
`scale_aggregates` (everything unpartitioned downstream, ending in the report).

No sensors here: in a scale-out demo the runs are submitted explicitly to the queue, so
what ran is exactly what was asked for. The broker and result backend come from
CELERY_BROKER_URL / CELERY_RESULT_BACKEND; workers must see the same values.
"""

import dagster as dg
from dagster_celery import celery_executor

from rts_dagster.definitions import ASSETS, RESOURCES
from rts_dagster.defs.partitions import runs_partitions

PARTITION_ASSETS = ["reward_streams", "series_metrics", "lp_replay"]

celery_from_env = celery_executor.configured(
    {
        "broker": {"env": "CELERY_BROKER_URL"},
        "backend": {"env": "CELERY_RESULT_BACKEND"},
    },
    name="celery_from_env",
)

scale_discover = dg.define_asset_job("scale_discover", selection=["discovered_runs"])
scale_partition = dg.define_asset_job(
    "scale_partition", selection=PARTITION_ASSETS, partitions_def=runs_partitions
)
scale_aggregates = dg.define_asset_job(
    "scale_aggregates",
    selection=dg.AssetSelection.all()
    - dg.AssetSelection.assets("discovered_runs", *PARTITION_ASSETS),
)

defs = dg.Definitions(
    assets=ASSETS,
    resources=RESOURCES,
    jobs=[scale_discover, scale_partition, scale_aggregates],
    executor=celery_from_env,
)
