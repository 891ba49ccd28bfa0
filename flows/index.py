"""Index flow: check shards against the manifest, rebuild the SQL views, count what the store holds."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.config import PipelineConfig
from flows.runs import stage_run
from tasks.common import Store
from tasks.index import rebuild_catalog_task, refresh_catalog, table_counts


@flow(name="index", log_prints=True)
def index_flow(config: PipelineConfig = PipelineConfig(), rebuild: bool = False,
               verify: bool = False) -> dict[str, Any]:
    """Refresh the catalog so `d2l sql` sees every finished shard and nothing else.

    `rebuild`: first rebuild the manifest from the shards themselves (a lost or damaged catalog);
    `verify`: check every shard's full checksum, not only its size and mtime (done anyway when counting
    finds a shard it cannot read)."""
    with Store(config.store, lock_timeout=config.lock_timeout).writing():  # the rebuild runs under the lock too
        rebuilt = rebuild_catalog_task(config.store) if rebuild else None
        with stage_run(config, "index") as (store, run_id, stats):
            if rebuilt is not None:
                stats["rebuild"] = rebuilt
            stats.update(refresh_catalog(str(store.root), verify_checksums=verify))
            counts = table_counts(str(store.root))
            if "unreadable" in counts and not verify:  # damage the size + mtime check missed: read every checksum
                get_run_logger().warning(f"a shard could not be read ({counts['unreadable']}); reading every "
                                         "shard's checksum")
                stats["dropped_entries"] += refresh_catalog(str(store.root), verify_checksums=True)["dropped_entries"]
                counts = table_counts(str(store.root))
            if "unreadable" in counts:
                raise RuntimeError(f"a shard cannot be read although its checksum is the recorded one "
                                   f"({counts['unreadable']}): rebuild the catalog with `d2l index --rebuild`")
            stats.update(counts)
            return dict(stats)
