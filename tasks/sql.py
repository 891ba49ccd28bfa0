"""Read-only SQL for the CLI and the UI: a thin door from flows to the sandboxed catalog replica."""

from __future__ import annotations

import os
from pathlib import Path

from storage.catalog import Catalog
from storage.sql import (QueryTimeoutError, ReadOnlySQLError, check_read_only, export_query, query_arrow,
                         run_query)

__all__ = ["QueryTimeoutError", "ReadOnlySQLError", "check_read_only", "export_query", "find_store",
           "open_catalog", "query_arrow", "run_query"]


def find_store(start: str | Path | None = None) -> str:
    """The store to query when none is named: $D2L_STORE, else the nearest folder (this one or a parent)
    with a `store/catalog.duckdb`, else `store`."""
    env = os.environ.get("D2L_STORE")
    if env:
        return env
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "catalog.duckdb").is_file() and folder.name == "store":
            return str(folder)
        if (folder / "store" / "catalog.duckdb").is_file():
            return str(folder / "store")
    return "store"


def open_catalog(store: str) -> Catalog:
    """The catalog of `store`; a clear error if the folder holds none yet."""
    cat = Catalog(store)
    if not cat.path.exists() and not cat.replica_path.exists():
        raise FileNotFoundError(f"No catalog at {cat.path}. Run `d2l run` (or `d2l index --store {store}`) first.")
    return cat
