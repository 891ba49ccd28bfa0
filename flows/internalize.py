"""Internalize flow: every document of a catalog query (or a list of files) into a stored adapter, in batches.

Idempotent and resumable: an adapter's id is the content key of (text, checkpoint, chunking), each batch's
adapters are written atomically as soon as it is done, and a document whose adapter is stored costs nothing.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from tasks.common import Catalog, current_run_id
from tasks.internalize import InternalizeFlowConfig, internalize_batch_task, read_documents_task


@flow(name="internalize", log_prints=True)
def internalize_flow(config: InternalizeFlowConfig) -> dict[str, Any]:
    """Documents -> adapters under <store>/adapters/, registered in the `adapters` table."""
    logger = get_run_logger()
    catalog, run_id, t0 = Catalog(config.store), current_run_id(), time.perf_counter()
    catalog.start_run(run_id, "internalize", config.model_dump(mode="json"))
    stats = {"documents": 0, "created": 0, "reused": 0, "rejected": 0, "batches": 0}
    try:
        docs = read_documents_task(config)
        stats["documents"] = len(docs)
        work_seconds = 0.0
        for i in range(0, len(docs), config.batch_size):
            results = internalize_batch_task(config, docs[i : i + config.batch_size])
            stats["batches"] += 1
            created = sum(1 for r in results if "error" not in r and not r["reused"])
            stats["created"] += created
            stats["reused"] += sum(1 for r in results if r.get("reused"))
            stats["rejected"] += sum(1 for r in results if "error" in r)
            if created:
                work_seconds += max(r["seconds"] for r in results if "seconds" in r)
            for r in results:
                if "error" in r:
                    logger.warning("document refused: %s", r["error"])
            logger.info("batch %d: %d new adapters, %d already stored", stats["batches"], created,
                        sum(1 for r in results if r.get("reused")))
        stats["adapters_per_second"] = round(stats["created"] / work_seconds, 3) if work_seconds else None
    except BaseException:
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        catalog.finish_run(run_id, "failed", stats)
        raise
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    catalog.finish_run(run_id, "completed", stats)
    logger.info("internalize: %s", stats)
    return stats
