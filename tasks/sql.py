"""Read-only SQL for the CLI and the UI: a thin door from flows to the sandboxed catalog replica."""

from __future__ import annotations

from storage.catalog import Catalog
from storage.sql import (QueryTimeoutError, ReadOnlySQLError, check_read_only, export_query, query_arrow,
                         run_query)

__all__ = ["QueryTimeoutError", "ReadOnlySQLError", "check_read_only", "export_query", "open_catalog",
           "query_arrow", "run_query"]


def open_catalog(store: str) -> Catalog:
    """The catalog of `store`; a clear error if the folder holds none yet."""
    cat = Catalog(store)
    if not cat.path.exists() and not cat.replica_path.exists():
        raise FileNotFoundError(f"No catalog at {cat.path}. Run `d2l run` (or `d2l index --store {store}`) first.")
    return cat
