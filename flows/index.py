"""Index flow: check shards against the manifest, rebuild the SQL views, count what the store holds."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.runs import stage_run
from tasks.index import refresh_catalog, table_counts


@flow(name="index", log_prints=True)
def index_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Refresh the catalog so `d2l sql` sees every finished shard and nothing else."""
    with stage_run(config, "index") as (store, run_id, stats):
        stats.update(refresh_catalog(str(store.root)))
        stats.update(table_counts(str(store.root)))
        return dict(stats)
