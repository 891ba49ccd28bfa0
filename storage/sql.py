"""User SQL over the catalog, in a sandbox: one query, read-only, inside the store, with a time and memory limit.

Three layers, each enough to stop the attacks it names on its own:

- the statement check: exactly one statement, a query (SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE / FROM)
  or an EXPLAIN [ANALYZE] of one; COPY, ATTACH, INSTALL/LOAD, SET, PRAGMA, CALL, DDL and DML are refused,
  also when hidden inside EXPLAIN ANALYZE (which executes its statement);
- the connection: an in-memory DuckDB that attaches the catalog's read replica read-only, with file access
  limited to the store's `shards/` and `schemas/` folders (`enable_external_access = false` +
  `allowed_directories`), extension autoinstall/autoload off, and the configuration locked so that no
  statement can loosen it;
- the limits: the query is interrupted after `timeout` seconds, DuckDB may use at most `memory_limit`, and
  printed results stop after `limit` rows (exports stream every row to the file instead).
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb

from storage.catalog import Catalog

QUERY_TYPES = {duckdb.StatementType.SELECT}
DEFAULT_TIMEOUT = 60.0
DEFAULT_LIMIT = 1000
DEFAULT_MEMORY = "2GB"
ALIAS = "d2l"  # the name the replica is attached under inside the sandbox

_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:\((?:[^()]|\([^()]*\))*\)\s*)?(?:ANALY[SZ]E\s+)?", re.I)
_LEADING_COMMENT = re.compile(r"^\s*(?:--[^\n]*(?:\n|$)|/\*.*?\*/)", re.S)


class ReadOnlySQLError(ValueError):
    """The statement would change the catalog, write files, or leave the sandbox."""


class QueryTimeoutError(RuntimeError):
    """The query ran past its time limit and was interrupted."""


def _strip_comments(sql: str) -> str:
    while (m := _LEADING_COMMENT.match(sql)) is not None:
        sql = sql[m.end():]
    return sql


def _refuse(query: str, kind: str) -> ReadOnlySQLError:
    return ReadOnlySQLError(
        f"Refused: `{' '.join(query.split())[:60]}` ({kind} statement). `d2l sql` is read-only: one "
        "SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN query per call; no COPY, ATTACH, SET, PRAGMA, "
        "CALL, INSTALL/LOAD, DDL or DML.")


def _check_one(statement, depth: int = 0) -> None:
    """Refuse one parsed statement unless it is a query or an EXPLAIN of a query."""
    if statement.type in QUERY_TYPES:
        return
    kind = statement.type.name.replace("_", " ")
    if statement.type != duckdb.StatementType.EXPLAIN or depth > 2:
        raise _refuse(statement.query, kind)
    text = _strip_comments(statement.query)
    inner = _EXPLAIN.sub("", text, count=1)
    if inner == text:
        raise _refuse(statement.query, "EXPLAIN of an unrecognised form")
    try:
        parsed = duckdb.extract_statements(inner)
    except duckdb.Error:
        raise _refuse(statement.query, "EXPLAIN of an unparsable") from None
    if len(parsed) != 1:
        raise _refuse(statement.query, "EXPLAIN of several")
    try:
        _check_one(parsed[0], depth + 1)
    except ReadOnlySQLError:
        raise _refuse(statement.query, f"EXPLAIN of a {parsed[0].type.name.replace('_', ' ')}") from None


def check_read_only(sql: str) -> list[str]:
    """The one statement of `sql` (as a list, for callers that loop), after refusing anything but a query."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ReadOnlySQLError(f"Could not parse the SQL: {exc}") from None
    if not statements:
        raise ReadOnlySQLError("No SQL statement given.")
    for st in statements:
        _check_one(st)
    if len(statements) > 1:
        raise ReadOnlySQLError(f"Refused: {len(statements)} statements given; `d2l sql` runs one query per call.")
    return [statements[0].query]


def _literal(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


@contextmanager
def sandbox(catalog: Catalog, memory_limit: str = DEFAULT_MEMORY, threads: int | None = None
            ) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB holding the catalog's read replica, read-only, able to read only the store's
    shards and schemas, with its configuration locked."""
    replica = catalog.replica()
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    try:
        dirs = [str(catalog.root / "shards") + "/", str(catalog.root / "schemas") + "/"]
        con.execute("SET allowed_directories = ?", [dirs])
        con.execute(f"ATTACH {_literal(replica)} AS {ALIAS} (READ_ONLY)")
        con.execute(f"USE {ALIAS}")
        con.execute("SET enable_external_access = false")
        con.execute(f"SET memory_limit = {_literal(memory_limit)}")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        con.execute("SET lock_configuration = true")
        yield con
    finally:
        con.close()


@contextmanager
def time_limit(con: duckdb.DuckDBPyConnection, timeout: float | None) -> Iterator[None]:
    """Interrupt whatever `con` runs after `timeout` seconds (None or 0: no limit)."""
    if not timeout:
        yield
        return
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        con.interrupt()

    timer = threading.Timer(timeout, stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    except (duckdb.InterruptException, duckdb.Error) as exc:
        if fired.is_set():
            raise QueryTimeoutError(f"The query ran past its {timeout:g} s limit and was stopped; narrow it, or "
                                    "raise --timeout.") from None
        raise exc
    finally:
        timer.cancel()


def run_query(catalog: Catalog, sql: str, *, timeout: float | None = DEFAULT_TIMEOUT, limit: int | None = None,
              memory_limit: str = DEFAULT_MEMORY) -> tuple[list[str], list[tuple]]:
    """Run one read-only query; the column names and rows (at most `limit`, when given, plus one so a caller
    can tell the result was cut)."""
    query = check_read_only(sql)[0]
    with sandbox(catalog, memory_limit) as con, time_limit(con, timeout):
        cur = con.execute(query)
        cols = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchall() if limit is None else cur.fetchmany(limit + 1)
        return cols, rows


def query_arrow(catalog: Catalog, sql: str, *, timeout: float | None = DEFAULT_TIMEOUT,
                memory_limit: str = DEFAULT_MEMORY):
    """Run one read-only query and return an Arrow table."""
    query = check_read_only(sql)[0]
    with sandbox(catalog, memory_limit) as con, time_limit(con, timeout):
        return con.sql(query).to_arrow_table()


def export_query(catalog: Catalog, sql: str, out: Path, *, timeout: float | None = DEFAULT_TIMEOUT,
                 memory_limit: str = DEFAULT_MEMORY) -> int:
    """Stream the rows of one read-only query into a .parquet or .csv file (written atomically); rows written."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from storage.fsutil import atomic_write

    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise ReadOnlySQLError(f"--out must end in .parquet or .csv, not {out.suffix or 'no suffix'!r}")
    query = check_read_only(sql)[0]
    n = 0
    with sandbox(catalog, memory_limit) as con, time_limit(con, timeout):
        reader = con.sql(query).to_arrow_reader(64_000)

        def write(f) -> None:
            nonlocal n
            writer = (pq.ParquetWriter(f, reader.schema) if out.suffix == ".parquet"
                      else pacsv.CSVWriter(f, reader.schema))
            with writer:
                for batch in reader:
                    writer.write_batch(batch)
                    n += batch.num_rows

        atomic_write(out, write)
    return n
