"""`d2l`: the doc2lora command line. Every stage is a Prefect flow; the commands parse their options, run
a flow or a task, and print what it did."""

from __future__ import annotations

import os

# Sensible offline defaults for Prefect before it is imported anywhere (users can override each).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import sys  # noqa: E402
from enum import Enum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402

app = typer.Typer(
    help=(
        "doc2lora: turn documents into LoRA adapters with a trained hypernetwork (Doc-to-LoRA).\n\n"
        "The pipeline runs as Prefect flows over a store folder: ingest -> chunk -> synthesize -> teacher -> "
        "index. Every stage is "
        "idempotent: rerunning does only what is missing. Query the generated data with `d2l sql`.\n\n"
        "Quick start:  d2l run   then   d2l sql \"SELECT * FROM documents LIMIT 5\""
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

CONFIG_HELP = "YAML config file (see configs/). Its settings override the defaults."
SET_HELP = "Override one setting: --set chunk.max_tokens=256 (repeatable; YAML values)."
SOURCE_HELP = ("Input to ingest, replacing the config's sources (repeatable): a file, a folder, a glob, "
               "synthetic://facts?n=100&seed=0, or datasets://PATH?data_files=...&split=train.")


def _config(config: Optional[Path], sets: list[str], store: Optional[str], sources: list[str],
            base_model: Optional[str], lock_timeout: Optional[float], progress: bool):
    from flows.config import load_config

    overrides = list(sets)
    if store:
        overrides.append(f"store={store}")
    if base_model:
        overrides.append(f"base_model={base_model}")
    if lock_timeout is not None:
        overrides.append(f"lock_timeout={lock_timeout}")
    if not progress:
        overrides.append("progress=false")
    try:
        cfg = load_config(config, overrides)
    except Exception as exc:  # noqa: BLE001 - show the validation error, not a traceback
        typer.secho(f"Invalid configuration: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if sources:
        cfg = cfg.model_copy(update={"sources": list(sources)})
    return cfg


FLOWS = {
    "pipeline": ("flows.pipeline", "pipeline_flow"),
    "ingest": ("flows.ingest", "ingest_flow"),
    "chunk": ("flows.chunk", "chunk_flow"),
    "synthesize": ("flows.synthesize", "synthesize_flow"),
    "teacher": ("flows.teacher", "teacher_flow"),
    "index": ("flows.index", "index_flow"),
    "train": ("flows.train_ddp", "run_train"),  # the train flow; data-parallel under torchrun (docs/scaling.md)
    "evaluate": ("flows.evaluate", "evaluate_flow"),
}


def _run_stage(flow_name: str, cfg) -> dict:
    from tasks.common import StoreLockedError

    import importlib

    from flows.cli_errors import reported

    module, attr = FLOWS[flow_name]
    with reported(flow_name):
        fn = getattr(importlib.import_module(module), attr)
        try:
            return fn(cfg)
        except StoreLockedError as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(3) from None


def _stage_command(flow_name: str, doc: str):
    def command(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP, exists=True),
        sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
        store: Optional[str] = typer.Option(None, help="Store folder (default: ./store)."),
        source: list[str] = typer.Option([], "--source", help=SOURCE_HELP),
        base_model: Optional[str] = typer.Option(None, help="Model folder, hub id, or built-in name."),
        lock_timeout: Optional[float] = typer.Option(
            None, help="Seconds to wait if another writer holds the store (default 0: fail at once)."),
        progress: bool = typer.Option(True, help="Show progress bars."),
    ) -> None:
        cfg = _config(config, sets, store, source, base_model, lock_timeout, progress)
        from flows.cli_errors import preflight, reported
        from flows.interrupt import supervise

        with reported(flow_name):
            preflight(flow_name, cfg)
        supervise(cfg.store)  # Ctrl-C / SIGTERM stop everything at once (flows/interrupt.py)
        stats = _run_stage(flow_name, cfg)
        if flow_name == "pipeline":
            from flows.summary import print_pipeline_summary

            print_pipeline_summary(stats)
        else:
            import json

            typer.echo(json.dumps(stats, indent=1, default=str))

    command.__doc__ = doc
    return command


app.command("run")(_stage_command(
    "pipeline", "Run the whole pipeline (ingest -> chunk -> synthesize -> teacher -> index), then summarise."))
app.command("ingest")(_stage_command("ingest", "Read the sources into `documents` shards; bad input -> `rejects`."))
app.command("chunk")(_stage_command("chunk", "Split documents into token chunks with the base model's tokenizer."))
app.command("synthesize")(_stage_command(
    "synthesize", "Write questions per chunk: gold QA from the source, then two rounds from the question LLM."))
app.command("teacher")(_stage_command(
    "teacher", "Answer every question with its chunk in the prompt; cache the top-k log-probs per token."))
app.command("index")(_stage_command("index", "Verify shards and rebuild the catalog's SQL views."))
app.command("train")(_stage_command(
    "train", "Train (or resume) the hypernetwork on the teacher samples: --set train.optim.total_steps=200 ..."))
app.command("evaluate")(_stage_command(
    "evaluate", "Score the trained hypernetwork on held-out documents: teacher, no document, D2L, per-document "
    "CD (--set evaluate.cd_max_docs=4 ...); writes eval_results, a report and a plot under <store>/eval/."))


@app.command("internalize")
def internalize_cmd(
    document: str = typer.Argument(..., help="A text file, or the document text itself."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="store/hypernets/NAME (newest checkpoint) or a "
                                    "checkpoint folder."),
    out: Path = typer.Option(..., "--out", help="Folder for the PEFT adapter (adapter_config.json + "
                             "adapter_model.safetensors)."),
    base_model: Optional[str] = typer.Option(None, help="Base model folder (default: the one it was trained on)."),
    chunk_max_tokens: Optional[int] = typer.Option(
        None, help="Split longer documents into chunks of this many tokens (affixes included); one LoRA each, "
                   "concatenated along the rank. Default: the chunk length the hypernetwork was trained on; "
                   "0: the whole document as one chunk."),
) -> None:
    """Document in, LoRA adapter out: one forward pass of the trained hypernetwork, saved for PEFT / vLLM."""
    from flows.cli_errors import read_document, reported
    from tasks.adapters import internalize_to_peft

    with reported("internalize"):
        text = read_document(document)
        info = internalize_to_peft(text, str(checkpoint), str(out), base_model, chunk_max_tokens)
    how = {"trained": "the chunk length the hypernetwork was trained on",
           "given": "--chunk-max-tokens", "none": "the checkpoint does not record its chunk length"}[info["chunking"]]
    size = f"chunks of at most {info['chunk_max_tokens']} tokens" if info["chunk_max_tokens"] else "one chunk"
    typer.echo(f"chunking: {info['chunks']} chunk(s) ({size}; {how})")
    typer.echo(f"adapter: {info['adapter']}  ({info['modules']} modules, rank {info['rank']}, "
               f"made in {info['seconds'] * 1000:.0f} ms)")
    typer.echo("try:")
    typer.echo(f'd2l ask --adapter {info["adapter"]} "your question"')


@app.command("ask")
def ask_cmd(
    question: str = typer.Argument(..., help="The question; the document is NOT in the prompt."),
    adapter: Path = typer.Option(..., "--adapter", help="A PEFT adapter folder from `d2l internalize`."),
    max_new_tokens: int = typer.Option(64, help="Answer length limit."),
) -> None:
    """Answer a question with the base model + a generated adapter."""
    from flows.cli_errors import reported
    from tasks.adapters import answer_with_adapter

    with reported("ask"):
        answer = answer_with_adapter(str(adapter), question, max_new_tokens)
    typer.echo(answer)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command("sql")
def sql(
    query: str = typer.Argument(..., help='A read-only query, e.g. "SELECT reason, count(*) FROM rejects GROUP BY 1".'),
    store: str = typer.Option("store", help="Store folder whose catalog to query."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="Output format."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result to a .parquet or .csv file."),
) -> None:
    """Query the catalog (read-only). Views: documents, chunks, questions, samples, eval_results, rejects.
    Tables: manifest, runs, source_scans, document_status, train_metrics (once a training ran). Statements
    that write (DDL, DML, COPY, ATTACH, SET) are refused. Examples: README.md and docs/operating.md."""
    from tasks.sql import ReadOnlySQLError, open_catalog, query_arrow, run_query

    try:
        cat = open_catalog(store)
        if out is not None:
            import pyarrow.csv as pacsv
            import pyarrow.parquet as pq

            table = query_arrow(cat, query)
            if out.suffix == ".parquet":
                pq.write_table(table, out)
            elif out.suffix == ".csv":
                pacsv.write_csv(table, out)
            else:
                raise ReadOnlySQLError(f"--out must end in .parquet or .csv, not {out.suffix!r}")
            typer.echo(f"wrote {table.num_rows} rows to {out}")
            return
        columns, rows = run_query(cat, query)
    except (ReadOnlySQLError, FileNotFoundError) as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - DuckDB errors are user errors here
        typer.secho(f"Query failed: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    from flows.summary import print_rows

    print_rows(columns, rows, fmt.value)


bench_app = typer.Typer(help="Benchmarks of the method (CPU, one process; outputs under store/bench/).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("toy", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_toy(ctx: typer.Context,
              smoke: bool = typer.Option(False, "--smoke", help="Tiny sizes: the whole path in about a minute."),
              threads: int = typer.Option(2, help="torch CPU threads.")) -> None:
    """The toy-world benchmark: teacher vs no document vs D2L vs per-document CD, long documents, needle.

    Builds (or reuses) the toy base model, generates toy documents, trains the hypernetwork with a stated
    budget, evaluates on held-out documents and prints one table (~6 min on 2 cores; --smoke ~15 s).
    Every size is a flag passed through to the benchmark (model/toy/bench.py): d2l bench toy --steps 3000
    --cd-docs 16 (run `python benchmarks/toy_world.py --help` for the list).
    """
    from tasks.bench import run_toy_benchmark

    argv = (["--smoke"] if smoke else []) + ["--threads", str(threads)] + list(ctx.args)
    raise typer.Exit(run_toy_benchmark(argv))


@app.command("models")
def models(prepare: Optional[str] = typer.Option(None, help="Build or convert this built-in model now."),
           store: str = typer.Option("store", help="Store folder that caches model folders.")) -> None:
    """List the built-in base models, or prepare one (convert/build it into the store once)."""
    from tasks.models import BUILTIN_MODELS

    if prepare:
        from tasks.models import prepare_model

        typer.echo(prepare_model(prepare, store))
        return
    for name in sorted(BUILTIN_MODELS):
        typer.echo(name)


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    from flows.cli_errors import set_debug
    from flows.interrupt import enable_if_console

    set_debug(debug)
    enable_if_console()


def main() -> None:  # pragma: no cover - console entry
    from flows.interrupt import enable

    enable()
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
