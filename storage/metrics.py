"""Training metrics in the catalog: one row per (run name, kind, step), upserted, so a resumed run that
re-produces steps after its checkpoint replaces them instead of duplicating them."""

from __future__ import annotations

import json
from typing import Any

from storage.catalog import Catalog

_DDL = """
CREATE TABLE IF NOT EXISTS train_metrics (
    name VARCHAR, kind VARCHAR, step BIGINT, loss DOUBLE, metrics VARCHAR,
    PRIMARY KEY (name, kind, step));
"""


def record_metrics(catalog: Catalog, name: str, rows: list[dict[str, Any]]) -> None:
    """Upsert metrics rows ({"kind": "train"|"eval", "step": int, ...}) for the run `name`."""
    if not rows:
        return
    with catalog.write() as con:
        con.execute(_DDL)
        for r in rows:
            loss = r.get("loss", r.get("eval_loss", r.get("distill")))
            con.execute("INSERT OR REPLACE INTO train_metrics VALUES (?, ?, ?, ?, ?)",
                        [name, str(r.get("kind", "train")), int(r.get("step", 0)),
                         None if loss is None else float(loss), json.dumps(r, default=str)])


def read_metrics(catalog: Catalog, name: str) -> list[dict[str, Any]]:
    """The metrics rows of run `name`, ordered by kind and step."""
    with catalog.read() as con:
        if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'train_metrics'"
                           ).fetchone()[0]:
            return []
        rows = con.execute("SELECT metrics FROM train_metrics WHERE name = ? ORDER BY kind, step", [name]).fetchall()
    return [json.loads(r[0]) for r in rows]
