"""The nightly refresh: rescan the sources, process only what is new or changed, mark what disappeared.

Every stage already skips finished units (a changed file is a new unit key), so the refresh is the pipeline
plus bookkeeping:

1. ingest rescans the sources and records what it saw (`source_scans`);
2. the scan is compared with the one of the previous completed refresh (for the first refresh: the last
   ingest before it, e.g. a `d2l run`): new, changed, removed files;
3. chunk -> synthesize -> teacher (those in `stages`) -> index run; only the new units do work (the refresh
   does not train: `train` in `stages` is ignored here; the train deployment does that);
4. `document_status` is updated: documents the current files produce are `present`; documents that were
   present and are produced no more (a removed file, or a file whose content changed) become `missing`.
   Nothing is deleted: their shards and rows stay, and `since` says when the status changed;
5. a Markdown artifact (`d2l-nightly-summary`) says what changed and what model work was done.

Overlaps: the deployment has a concurrency limit of 1 (prefect.yaml), and the run holds the store's writer
lock for its whole duration. If another writer (a manual `d2l run`, a pipeline deployment) holds the lock,
the refresh waits up to `lock_timeout` seconds, then skips: no writes, a "skipped" summary naming the flow run
(id, deployment, start) that holds the store, and a final state named `Skipped` with that reason.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.chunk import chunk_flow
from flows.config import PipelineConfig, load_config, parse_override
from flows.data_loss import final_state
from flows.index import index_flow
from flows.ingest import ingest_flow
from flows.runners import shared_runner
from flows.runs import run_owner, stage_run
from flows.synthesize import synthesize_flow
from flows.teacher import teacher_flow
from tasks.common import Store, StoreLockedError

SUMMARY_KEY = "d2l-nightly-summary"
MAX_LISTED = 50  # file names listed per section of the summary

__all__ = ["diff_scans", "latest_scan", "nightly_refresh_flow", "previous_refresh_scan", "refresh_config",
           "summary_markdown"]


def refresh_config(config_file: str | None = None, config: PipelineConfig | None = None,
                   overrides: list[str] | None = None, sources: list[str] | None = None,
                   store: str | None = None, lock_timeout: float | None = None) -> PipelineConfig:
    """The refresh's config: a YAML file or an inline config (not both), then `key=value` overrides, then
    the explicit sources / store / lock timeout; validated as a whole."""
    if config_file and config is not None:
        raise ValueError("Give either config_file or an inline config, not both.")
    if config is not None:
        tree = config.model_dump(mode="json")
        for item in overrides or []:
            key, value = parse_override(item)
            node = tree
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        cfg = PipelineConfig.model_validate(tree)
    else:
        cfg = load_config(config_file, overrides)
    update: dict[str, Any] = {}
    if sources:
        update["sources"] = list(sources)
    if store:
        update["store"] = store
    if lock_timeout is not None:
        update["lock_timeout"] = lock_timeout
    return PipelineConfig.model_validate({**cfg.model_dump(mode="json"), **update}) if update else cfg


def previous_refresh_scan(store: Store) -> str | None:
    """The scan id of the last completed refresh on this store, if any."""
    if not store.catalog.path.exists():
        return None
    with store.catalog.read() as con:
        row = con.execute(
            "SELECT json_extract_string(stats, '$.scan_id') FROM runs WHERE flow = 'nightly-refresh' "
            "AND status = 'completed' AND json_extract_string(stats, '$.scan_id') IS NOT NULL "
            "ORDER BY finished DESC LIMIT 1").fetchone()
    return row[0] if row else None


def latest_scan(store: Store) -> str | None:
    """The most recent scan any ingest recorded on this store, if any."""
    if not store.catalog.path.exists():
        return None
    with store.catalog.read() as con:
        row = con.execute("SELECT scan_id FROM source_scans ORDER BY scanned DESC LIMIT 1").fetchone()
    return row[0] if row else None


def diff_scans(before: dict[str, tuple], after: dict[str, tuple]) -> dict[str, list[str]]:
    """Sources new, changed (other content), removed and unchanged between two scans (source -> (kind, fp, key))."""
    return {
        "new": sorted(s for s in after if s not in before),
        "changed": sorted(s for s in after if s in before and before[s][1] != after[s][1]),
        "removed": sorted(s for s in before if s not in after),
        "unchanged": sorted(s for s in after if s in before and before[s][1] == after[s][1]),
    }


def _model_work(stats: dict[str, Any]) -> dict[str, int]:
    sy, te = stats.get("synthesize") or {}, stats.get("teacher") or {}
    work = {
        "chunk_units": int(stats.get("chunk", {}).get("written", 0)),
        "chunks": int(stats.get("chunk", {}).get("chunks", 0)),
        "synthesize_units": int(sy.get("written", 0)),
        "llm_questions": sum(int(v) for k, v in sy.items() if k.startswith("kind_round")),
        "teacher_units": int(te.get("written", 0)),
        "teacher_answers": int(te.get("questions", 0)),
        "answer_tokens": int(te.get("answer_tokens", 0)),
    }
    work["model_calls"] = work["synthesize_units"] + work["teacher_units"]
    return work


def _listing(title: str, items: list[str], total: int) -> list[str]:
    if not total:
        return []
    lines = ["", f"## {title} ({total})", ""]
    lines += [f"- `{s}`" for s in items[:MAX_LISTED]]
    if total > len(items[:MAX_LISTED]):
        lines.append(f"- ... and {total - len(items[:MAX_LISTED])} more")
    return lines


def summary_markdown(stats: dict[str, Any]) -> str:
    """What a refresh changed, as Markdown for the UI (no indentation: Markdown would read it as code)."""
    if stats.get("skipped"):
        return "\n".join([
            "# doc2lora nightly refresh: skipped", "",
            f"Store `{stats.get('store', '?')}` was busy: {stats['skipped']}", "",
            "Nothing was read or written. The next refresh catches up.",
        ])
    files, docs, work = stats["files"], stats["documents"], stats["work"]
    base = stats.get("baseline") or {}
    first = ("" if base.get("kind") == "refresh" else
             " (first refresh: compared with the last ingest on this store)" if base.get("kind") == "ingest" else
             " (first scan of this store: every file counts as new)")
    rows = [
        ("files new", files["new"]), ("files changed", files["changed"]),
        ("files removed", files["removed"]), ("files unchanged", files["unchanged"]),
        ("documents present", docs["present"]), ("documents new", docs["new"]),
        ("documents marked missing", docs["missing"]), ("documents back after missing", docs["back"]),
        ("chunk units written", work["chunk_units"]), ("chunks written", work["chunks"]),
        ("synthesize units written", work["synthesize_units"]), ("LLM questions", work["llm_questions"]),
        ("teacher units written", work["teacher_units"]), ("teacher answers", work["teacher_answers"]),
        ("model calls (synthesize + teacher units)", work["model_calls"]),
    ]
    lines = [f"# doc2lora nightly refresh{first}", "",
             f"Store `{stats['store']}`, scan `{stats['scan_id']}`, {stats.get('finished', '')}", "",
             "| what | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    listed = stats.get("file_changes", {})
    for title, kind in (("New files", "new"), ("Changed files", "changed"), ("Removed files", "removed")):
        lines += _listing(title, listed.get(kind, []), files[kind])
    gone = docs.get("missing_documents", [])
    if gone:
        lines += ["", f"## Documents marked missing ({docs['missing']})", "", "| doc_id | source |", "|---|---|"]
        lines += [f"| `{d['doc_id']}` | `{d['source']}` |" for d in gone[:MAX_LISTED]]
        if docs["missing"] > MAX_LISTED:
            lines.append(f"| ... | and {docs['missing'] - MAX_LISTED} more |")
    lines += ["", "Query it: `d2l sql \"SELECT status, count(*) FROM document_status GROUP BY 1\"`"]
    return "\n".join(lines)


def _refresh(cfg: PipelineConfig) -> dict[str, Any]:
    """The refresh itself, under the store's writer lock (already held by the caller)."""
    with stage_run(cfg, "nightly-refresh") as (st, run_id, stats):
        # The baseline: the previous completed refresh; for the first refresh, the last ingest before it
        # (a `d2l run`, say), whose documents count as present so that what has gone since is marked.
        before_id, baseline = previous_refresh_scan(st), "refresh"
        if before_id is None:
            before_id, baseline = latest_scan(st), "ingest"
            if before_id is not None:
                st.catalog.mark_documents(before_id)
        before = st.catalog.scan(before_id)
        stats["store"] = str(st.root)
        with shared_runner(cfg.runner):  # the data stages share one runner (one Dask cluster / Ray runtime)
            stats["ingest"] = ingest_flow(cfg)
            scan_id = stats["ingest"]["scan_id"]
            stats["scan_id"] = scan_id
            stats["baseline"] = {"scan_id": before_id, "kind": baseline if before_id else None}
            stats["first_refresh"] = baseline == "ingest"
            diff = diff_scans(before, st.catalog.scan(scan_id))
            stats["files"] = {k: len(v) for k, v in diff.items()}  # counts; the names (capped) below
            stats["file_changes"] = {k: diff[k][:MAX_LISTED] for k in ("new", "changed", "removed")}
            stats["chunk"] = chunk_flow(cfg)
            if "synthesize" in cfg.stages:
                stats["synthesize"] = synthesize_flow(cfg)
            if "teacher" in cfg.stages:
                stats["teacher"] = teacher_flow(cfg)
        stats["documents"] = st.catalog.mark_documents(scan_id)
        stats["index"] = index_flow(cfg)
        stats["work"] = _model_work(stats)
        stats["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return dict(stats)


@flow(name="nightly-refresh", log_prints=True)
def nightly_refresh_flow(
    sources: list[str] | None = None,
    config_file: str | None = None,
    config: PipelineConfig | None = None,
    overrides: list[str] | None = None,
    store: str | None = None,
    lock_timeout: float = 1800.0,
) -> Any:
    """Rescan the sources; process only new or changed files; mark documents that disappeared.

    Args:
        sources: Files, folders, globs, synthetic:// or datasets:// specs; replace the config's sources.
        config_file: A YAML config file, relative to the repository (e.g. configs/default.yaml).
        config: An inline config, instead of config_file.
        overrides: `key=value` settings applied on top, as with `d2l --set` (e.g. chunk.max_tokens=256).
        store: The store folder; replaces the config's store.
        lock_timeout: Seconds to wait for another writer on the store before skipping this refresh.
    """
    cfg = refresh_config(config_file, config, overrides, sources, store, lock_timeout)
    logger = get_run_logger()
    t0 = time.monotonic()
    with ExitStack() as held:
        try:  # wait for another writer up to lock_timeout, then skip; nothing is read or written before this
            held.enter_context(Store(cfg.store, lock_timeout=cfg.lock_timeout).writing(run_owner()))
        except StoreLockedError as exc:
            logger.warning("nightly refresh skipped: %s", exc)
            result: dict[str, Any] = {"skipped": str(exc), "store": cfg.store,
                                      "seconds": round(time.monotonic() - t0, 2)}
        else:
            result = _refresh(cfg)
    create_markdown_artifact(markdown=summary_markdown(result), key=SUMMARY_KEY,
                             description="doc2lora nightly refresh: what changed")
    f = result.get("files")
    if f:
        logger.info("refresh: %d new, %d changed, %d removed files; %s documents marked missing; %s model calls",
                    f["new"], f["changed"], f["removed"], result["documents"]["missing"],
                    result["work"]["model_calls"])
    if result.get("skipped"):
        from prefect.states import Completed

        return Completed(name="Skipped", message=f"Skipped: {result['skipped']}", data=result)
    return final_state(result, cfg.data_loss, logger, cfg.train.optim.use_unfinished) or result
