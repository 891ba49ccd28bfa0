"""Index flow: check shards against the manifest, rebuild the SQL views, count what the store holds."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.runs import stage_run
from tasks.common import Store
from tasks.index import rebuild_catalog_task, refresh_catalog, table_counts


@flow(name="index", log_prints=True)
def index_flow(config: PipelineConfig = PipelineConfig(), rebuild: bool = False,
               verify: bool = False) -> dict[str, Any]:
    """Refresh the catalog so `d2l sql` sees every finished shard and nothing else.

    `rebuild`: first rebuild the manifest from the shards themselves (a lost or damaged catalog);
    `verify`: check every shard's full checksum, not only its size and mtime."""
    with Store(config.store, lock_timeout=config.lock_timeout).writing():  # the rebuild runs under the lock too
        rebuilt = rebuild_catalog_task(config.store) if rebuild else None
        with stage_run(config, "index") as (store, run_id, stats):
            if rebuilt is not None:
                stats["rebuild"] = rebuilt
            stats.update(refresh_catalog(str(store.root), verify_checksums=verify))
            stats.update(table_counts(str(store.root)))
            return dict(stats)
