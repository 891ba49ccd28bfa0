"""Read-only SQL over the catalog, for people: statements that could write anything are refused."""

from __future__ import annotations

import duckdb

from storage.catalog import Catalog

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class ReadOnlySQLError(ValueError):
    """The statement would change the catalog or write files."""


def check_read_only(sql: str) -> list[str]:
    """The statements of `sql`, after refusing any that is not a query."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ReadOnlySQLError(f"Could not parse the SQL: {exc}") from None
    if not statements:
        raise ReadOnlySQLError("No SQL statement given.")
    for st in statements:
        if st.type not in ALLOWED:
            kind = st.type.name.replace("_", " ")
            raise ReadOnlySQLError(
                f"Refused: `{st.query.strip()[:60]}` is a {kind} statement. `d2l sql` is read-only: only "
                "SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN queries run here; the stages write the "
                "catalog."
            )
    return [st.query for st in statements]


def run_query(catalog: Catalog, sql: str) -> tuple[list[str], list[tuple]]:
    """Run read-only `sql`; returns the column names and rows of the last statement."""
    statements = check_read_only(sql)
    with catalog.read() as con:
        for q in statements[:-1]:
            con.execute(q)
        cur = con.execute(statements[-1])
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, cur.fetchall()


def query_arrow(catalog: Catalog, sql: str):
    """Run read-only `sql` and return an Arrow table (for exports)."""
    statements = check_read_only(sql)
    with catalog.read() as con:
        for q in statements[:-1]:
            con.execute(q)
        return con.sql(statements[-1]).to_arrow_table()
