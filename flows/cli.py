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
    "evaluate": ("flows.evaluate", "run_evaluate"),
}


def _run_stage(flow_name: str, cfg, **kwargs) -> dict:
    import importlib

    from flows.cli_errors import reported

    module, attr = FLOWS[flow_name]
    with reported(flow_name):
        fn = getattr(importlib.import_module(module), attr)
        return fn(cfg, **kwargs)


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
        allow_missing: bool = typer.Option(False, "--allow-missing", help="A source that does not exist or has "
                                           "an unknown scheme becomes a reject instead of an error."),
    ) -> None:
        extra = ["ingest.allow_missing=true"] if allow_missing else []
        if flow_name == "pipeline":  # an up-to-date store is answered before Prefect is imported
            from flows.uptodate import CliRun

            cli_run = CliRun(config, [*sets, *extra], store, source, base_model)
            if cli_run.shortcut():
                return
        cfg = _config(config, [*sets, *extra], store, source, base_model, lock_timeout, progress)
        from flows.cli_errors import preflight, reported
        from flows.interrupt import supervise

        with reported(flow_name):
            preflight(flow_name, cfg)
        supervise(cfg.store)  # Ctrl-C / SIGTERM stop everything at once (flows/interrupt.py)
        stats = _run_stage(flow_name, cfg)
        if flow_name == "pipeline":
            from flows.summary import print_pipeline_summary

            cli_run.remember(cfg, stats)
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


@app.command("index")
def index_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP, exists=True),
    sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    store: Optional[str] = typer.Option(None, help="Store folder (default: ./store)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild the catalog's manifest from the shards "
                                 "themselves (after losing or damaging catalog.duckdb)."),
    verify: bool = typer.Option(False, "--verify", help="Read every shard's full checksum (default: size and "
                                "mtime, and the checksum of files whose mtime changed)."),
    lock_timeout: Optional[float] = typer.Option(None, help="Seconds to wait if another writer holds the store."),
    progress: bool = typer.Option(True, help="Show progress bars (on a terminal)."),
) -> None:
    """Check shards against the manifest and rebuild the catalog's SQL views (--rebuild: the manifest too)."""
    import json

    cfg = _config(config, sets, store, [], None, lock_timeout, progress)
    typer.echo(json.dumps(_run_stage("index", cfg, rebuild=rebuild, verify=verify), indent=1, default=str))


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
    store: Optional[str] = typer.Option(None, help="Store folder whose catalog to query (default: $D2L_STORE, "
                                        "else the nearest ./store in this folder or a parent)."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="Output format."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result to a .parquet or .csv file."),
    timeout: float = typer.Option(60.0, help="Stop the query after this many seconds (0: no limit)."),
    limit: int = typer.Option(1000, help="Print at most this many rows (a note says when rows were cut; "
                              "--out writes them all)."),
    memory_limit: str = typer.Option("2GB", help="Most memory the query may use (DuckDB's memory_limit)."),
) -> None:
    """Query the catalog's read replica in a sandbox: one query (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE,
    EXPLAIN); it reads only the store's shards. Views: documents, chunks, questions, samples, eval_results,
    rejects. Tables: manifest, runs, source_scans, document_status, adapters, train_metrics (once a training
    ran). Writes (DDL, DML, COPY, ATTACH, SET, PRAGMA, CALL, INSTALL) are refused. Examples: README.md and
    docs/operating.md."""
    from flows.sql_command import run_sql_command
    from tasks.sql import find_store

    raise typer.Exit(run_sql_command(store or find_store(), query, fmt.value, out, timeout, limit, memory_limit))


bench_app = typer.Typer(help="Benchmarks of the method (CPU, one process; outputs under store/bench/).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("toy", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_toy(ctx: typer.Context,
              smoke: bool = typer.Option(False, "--smoke", help="Tiny sizes: the whole path in about a minute."),
              threads: int = typer.Option(2, help="torch CPU threads.")) -> None:
    """The toy-world benchmark: teacher vs no document vs D2L vs per-document CD, long documents, needle.

    Builds (or reuses) the toy base model, generates toy documents, trains the hypernetwork with a stated
    budget, evaluates on held-out documents and prints one table (~15 min on 2 idle cores; --smoke ~15 s).
    Every size is a flag passed through to the benchmark (model/toy/bench_profile.py):
    d2l bench toy --steps 3000 --cd-docs 16 (run `python benchmarks/toy_world.py --help` for the list).
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


@app.command("serve")
def serve_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="store/hypernets/NAME or a checkpoint folder."),
    store: str = typer.Option("store", help="Store folder: adapters go to <store>/adapters/<id>/."),
    backend: str = typer.Option("transformers", help="transformers (in-process) or vllm (needs --vllm-url)."),
    vllm_url: Optional[str] = typer.Option(None, help="A vLLM server started with --enable-lora "
                                           "(and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): http://HOST:PORT/v1."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    sets: list[str] = typer.Option([], "--set", help="Any other serve setting: --set max_loras=8 (repeatable)."),
) -> None:
    """Serve documents: POST /v1/documents makes an adapter, then chat with model=<adapter_id> (OpenAI API)."""
    import yaml

    from flows.serve import ServeConfig, serve

    tree = {"checkpoint": checkpoint, "store": store, "backend": backend, "vllm_url": vllm_url, "host": host,
            "port": port}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            typer.secho(f"--set {item!r} must look like key=value", fg="red", err=True)
            raise typer.Exit(2)
        tree[key.strip()] = yaml.safe_load(value)
    try:
        cfg = ServeConfig.model_validate(tree)
    except Exception as exc:  # noqa: BLE001 - show the validation error, not a traceback
        typer.secho(f"Invalid serve settings: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    serve(cfg)


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
