"""Human-readable output: the end-of-run summary and query results as tables, CSV or JSON."""

from __future__ import annotations

import csv
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)


def print_rows(columns: list[str], rows: list[tuple], fmt: str = "table", title: str | None = None) -> None:
    """Print query results in the chosen format."""
    if fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
    elif fmt == "json":
        print(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=1))
    else:
        t = Table(title=title, show_lines=False)
        for c in columns:
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*("" if v is None else str(v) for v in r))
        console.print(t)
        console.print(f"[dim]{len(rows)} row(s)[/dim]")


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _print_damaged(stats: dict[str, Any], con: Console) -> None:
    """Every shard a stage found damaged and redid, and every manifest entry the index dropped."""
    lines = [(name, "redone", path) for name, st in stats.items() if isinstance(st, dict)
             for path in st.get("redone_shards", [])]
    lines += [("index", "dropped", path) for path in stats.get("index", {}).get("dropped_entries", [])]
    if not lines:
        return
    t = Table(title=f"damaged shards ({len(lines)}): missing or altered on disk")
    for col in ("stage", "action", "shard"):
        t.add_column(col, overflow="fold")
    for row in lines:
        t.add_row(*row)
    con.print(t)


def pipeline_summary_text(stats: dict[str, Any]) -> str:
    """The summary as plain text (no colour) at the terminal's width: what a rerun prints from the stamp."""
    import io

    buf = io.StringIO()
    print_pipeline_summary(stats, Console(file=buf, width=console.width, color_system=None, force_terminal=False))
    return buf.getvalue()


def print_pipeline_summary(stats: dict[str, Any], con: Console | None = None) -> None:
    """What a pipeline run made and where, and a first query to try (on `con`, default the terminal)."""
    con = con or console
    idx = stats.get("index", {})
    counts = idx.get("counts", {})
    t = Table(title="doc2lora: what this run made", show_header=True)
    t.add_column("stage")
    t.add_column("units done before", justify="right")
    t.add_column("units written now", justify="right")
    t.add_column("detail")
    ing, ch = stats.get("ingest", {}), stats.get("chunk", {})
    t.add_row("ingest", str(ing.get("done_before", 0)), str(ing.get("written", 0)),
              f"{ing.get('documents', 0)} documents read, {ing.get('duplicates', 0)} duplicates dropped, "
              f"{ing.get('rejects', 0)} rejects")
    t.add_row("chunk", str(ch.get("done_before", 0)), str(ch.get("written", 0)),
              f"{ch.get('chunks', 0)} chunks written, {ch.get('rejects', 0)} rejects")
    sy, te = stats.get("synthesize"), stats.get("teacher")
    if sy is not None:
        kinds = ", ".join(f"{k[5:]} {v}" for k, v in sy.items() if k.startswith("kind_"))
        t.add_row("synthesize", str(sy.get("done_before", 0)), str(sy.get("written", 0)),
                  f"{sy.get('questions', 0)} questions ({kinds or 'none'}), {sy.get('rejects', 0)} rejects")
    if te is not None:
        t.add_row("teacher", str(te.get("done_before", 0)), str(te.get("written", 0)),
                  f"{te.get('samples', 0)} answers, {te.get('answer_tokens', 0)} answer tokens with top-k, "
                  f"{te.get('unfinished', 0)} cut at max_new_tokens (kept, finished=false), "
                  f"{te.get('rejects', 0)} rejects")
    tr = stats.get("train")
    if tr is not None:
        now = (tr.get("steps") or 0) - (tr.get("resumed_from") or 0)  # 0 when a finished run was found
        t.add_row("train", str(tr.get("resumed_from") or 0) + " steps", f"{now} steps",
                  f"held-out KL {_num(tr.get('eval_kl_start'))} -> {_num(tr.get('eval_kl_end'))}, top-1 agreement "
                  f"{_num(tr.get('eval_agreement_start'))} -> {_num(tr.get('eval_agreement_end'))}")
    ad = stats.get("adapter")
    if ad is not None:
        written = ad.get("written", True)
        t.add_row("adapter", "0" if written else "1", "1" if written else "0",
                  f"rank {ad['rank']}, {ad.get('chunks', '?')} chunk(s), made in {ad['seconds'] * 1000:.0f} ms")
    con.print(t)
    c = Table(title="catalog views (rows)")
    for name in counts:
        c.add_column(name, justify="right")
    c.add_row(*(str(v) for v in counts.values()))
    con.print(c)
    rej = idx.get("rejects_by_reason", [])
    if rej:
        r = Table(title="rejects by reason")
        for col in ("stage", "reason", "count"):
            r.add_column(col)
        for row in rej:
            r.add_row(*(str(v) for v in row))
        con.print(r)
    for problem in stats.get("data_loss") or []:
        con.print(f"[bold yellow]data loss:[/bold yellow] {problem}")
    _print_damaged(stats, con)
    print_next_steps(stats, con.file)


def print_next_steps(stats: dict[str, Any], file: Any = None) -> None:
    """Where things are, what the demo adapter is, and commands to paste: plain lines, never in a table."""
    out = file or sys.stdout

    def say(line: str) -> None:
        print(line, file=out)

    idx = stats.get("index", {})
    store = stats.get("store", "store")
    say(f"store: {store}  ({idx.get('shards', 0)} shards, {idx.get('shard_bytes', 0) / 1e6:.2f} MB; "
        f"{idx.get('duplicate_documents', 0)} duplicate documents across shards hidden by the views)")
    tr, ad = stats.get("train"), stats.get("adapter")
    if tr is not None:
        say(f"training curves: {tr.get('curve')}")
    if ad is not None:
        say(f"demo adapter: {ad['adapter']}")
        say(f"  What it is: the config's demo_document turned into a LoRA by a hypernetwork trained for only "
            f"{tr.get('steps') if tr else '?'} steps. It shows the path (document -> adapter -> answers with the "
            "document NOT in the prompt); it has not learned enough to answer from the document: expect about "
            "what the base model says alone. To see the method work, run the toy-world benchmark (last line).")
    say("try:")
    say(f'd2l sql "SELECT source_kind, count(*) AS docs FROM documents GROUP BY 1" --store {store}')
    if ad is not None:
        say(f'd2l ask --adapter {ad["adapter"]} "How is the hypernetwork trained?"')
        say("d2l bench toy --smoke")
    out.flush()
