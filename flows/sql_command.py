"""`d2l sql`: run one sandboxed query over the catalog's read replica; print it, or stream it to a file."""

from __future__ import annotations

from pathlib import Path

import typer

from flows.summary import console, print_rows
from tasks.sql import QueryTimeoutError, ReadOnlySQLError, export_query, open_catalog, run_query


def run_sql_command(store: str, query: str, fmt: str, out: Path | None, timeout: float, limit: int,
                    memory_limit: str) -> int:
    """The exit code: 0 done, 2 refused (or no catalog), 3 over the time limit, 1 the query failed."""
    try:
        cat = open_catalog(store)
        if out is not None:
            n = export_query(cat, query, out, timeout=timeout, memory_limit=memory_limit)
            typer.echo(f"wrote {n} rows to {out}")
            return 0
        columns, rows = run_query(cat, query, timeout=timeout, limit=limit, memory_limit=memory_limit)
    except (ReadOnlySQLError, FileNotFoundError) as exc:
        typer.secho(str(exc), fg="red", err=True)
        return 2
    except QueryTimeoutError as exc:
        typer.secho(str(exc), fg="red", err=True)
        return 3
    except Exception as exc:  # noqa: BLE001 - DuckDB errors are user errors here
        typer.secho(f"Query failed: {' '.join(str(exc).split())}", fg="red", err=True)
        return 1
    cut = len(rows) > limit
    print_rows(columns, rows[:limit], fmt)
    if cut:
        note = (f"only the first {limit} rows are shown (--limit); add a LIMIT, raise --limit, or write them all "
                "with --out FILE.parquet")
        if fmt == "table":
            console.print(f"[yellow]{note}[/yellow]")
        else:
            typer.secho(note, fg="yellow", err=True)
    return 0
