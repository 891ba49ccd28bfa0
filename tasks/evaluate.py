"""Evaluate: held-out documents answered four ways (teacher, no document, D2L, per-document CD).

Held-out split: a document is held out when ``held_out_score(doc_id)`` (sha256 of a fixed salt and the
doc_id, model/training/data.py) is below ``held_out_fraction`` -- the same function and, by default, the same
fraction as the train stage, so evaluation never sees a training document, and a document's side never
changes when the corpus grows. Each held-out *chunk* is one context (a toy document is one chunk).

The unit of work is the whole evaluation (one ``eval_results`` shard, stage ``evaluate``); its key hashes
the hypernetwork checkpoint's weights, the base model folder, the held-out sample ids and these
settings, so a rerun with nothing changed does no model work and republishes the saved report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from storage.catalog import Catalog

__all__ = ["EvaluateConfig", "EVAL_VERSION", "eval_dir", "read_eval_contexts", "run_evaluation",
           "eval_settings", "method_rows"]

EVAL_VERSION = "1"
MethodName = Literal["teacher", "no_doc", "d2l", "cd"]


class EvaluateConfig(BaseModel):
    """Evaluation on held-out documents: which methods, how many documents, the CD baseline, long documents."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="Hypernetwork run folder or checkpoint folder "
                                   "(default: the store's hypernets folder of the run to evaluate).")
    held_out_fraction: float | None = Field(None, ge=0, lt=1, description="Held-out share by doc_id hash "
                                            "(default: train.held_out_fraction, the split training used).")
    max_docs: int | None = Field(64, ge=1, description="Evaluate at most this many held-out contexts (chunks).")
    max_questions_per_doc: int | None = Field(None, ge=1, description="At most this many questions per context.")
    methods: list[MethodName] = Field(default_factory=lambda: ["teacher", "no_doc", "d2l"], description=(
        "Methods to run: teacher, no_doc, d2l, cd. cd (per-document context distillation) is slow: "
        "cd_steps Adam steps per document; add it for the full comparison."))
    max_new_tokens: int = Field(64, ge=1, description="Greedy answer length limit, every method.")
    batch_size: int = Field(16, ge=1, description="Questions per generation / scoring batch.")
    chunk_max_tokens: int | None = Field(None, ge=8, description="D2L: wrapped tokens per chunk when "
                                         "internalizing (default: each context as one chunk, as in training).")
    merge: Literal["concat", "mean"] | None = Field(None, description="D2L chunk merge (default: the hypernetwork's).")
    cd_steps: int = Field(300, ge=1, description="Per-document CD: Adam steps (the reference: 300).")
    cd_lr: float = Field(5e-3, gt=0, description="Per-document CD: learning rate.")
    cd_train_fraction: float = Field(0.5, ge=0, le=1, description="Share of each document's questions CD "
                                     "trains on (stable by question_id hash); it is scored on all of them.")
    cd_max_docs: int | None = Field(16, ge=1, description="Run CD on the first N contexts only (it is slow).")
    long_factors: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], description="Toy base model only: "
                                    "document lengths, in multiples of the trained length.")
    long_docs: int = Field(16, ge=0, description="Toy base model only: documents per length (0: skip).")
    needle_factor: int = Field(4, ge=1, description="Toy base model only: haystack length (x trained length).")
    needle_depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                       description="Toy base model only: needle depths (0 = first sentence).")
    needle_docs: int = Field(8, ge=0, description="Toy base model only: haystacks per depth (0: skip).")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")


def eval_dir(store_root: str, key: str) -> Path:
    return Path(store_root) / "eval" / key


def _held_out_rows(store_root: str, fraction: float) -> list[dict[str, Any]]:
    from model.training.data import is_held_out

    cat = Catalog(store_root)
    cat.refresh_views()
    with cat.read() as con:
        rows = con.sql(
            "SELECT c.chunk_id, c.doc_id, c.text AS context_text, q.question_id, q.question, q.answer AS gold, "
            "q.kind, s.sample_id, s.answer AS teacher_answer, s.student_ids, s.answer_start, s.n_answer_tokens, "
            "s.topk, s.topk_ids, s.topk_logprobs "
            "FROM questions q JOIN chunks c USING (chunk_id) "
            "LEFT JOIN (SELECT * FROM samples QUALIFY row_number() OVER (PARTITION BY question_id ORDER BY "
            "sample_id) = 1) s USING (question_id) ORDER BY c.chunk_id, q.question_id"
        ).to_arrow_table().to_pylist()
    return [r for r in rows if is_held_out(r["doc_id"], fraction)]


def read_eval_contexts(store_root: str, fraction: float, max_docs: int | None = None,
                       max_questions: int | None = None):
    """Held-out contexts (chunks) with their questions, gold answers and teacher samples, in a stable order
    (by the held-out hash of the document, then chunk id)."""
    from model.evaluation.runner import EvalContext, EvalQuestion
    from model.training.data import held_out_score

    by_chunk: dict[str, Any] = {}
    for r in _held_out_rows(store_root, fraction):
        ctx = by_chunk.get(r["chunk_id"])
        if ctx is None:
            ctx = by_chunk[r["chunk_id"]] = EvalContext(r["chunk_id"], r["doc_id"], r["context_text"], [])
        sample = None
        if r["sample_id"] is not None:
            sample = {k: r[k] for k in ("sample_id", "student_ids", "answer_start", "n_answer_tokens", "topk",
                                        "topk_ids", "topk_logprobs")}
            sample["doc_id"] = r["doc_id"]
        if max_questions is None or len(ctx.questions) < max_questions:
            ctx.questions.append(EvalQuestion(r["question_id"], r["question"], r["gold"], sample))
    ordered = sorted(by_chunk.values(), key=lambda c: (held_out_score(c.doc_id), c.context_id))
    ordered = [c for c in ordered if c.questions]
    return ordered[:max_docs] if max_docs else ordered


def samples_fingerprint(contexts) -> str:
    from storage.hashing import sha256_text

    ids = [f"{c.context_id}:{q.question_id}:{(q.sample or {}).get('sample_id')}" for c in contexts for q in c.questions]
    return sha256_text("\n".join(ids))[:24]


def checkpoint_fingerprint(ckpt: Path) -> str:
    from storage.hashing import file_sha256

    return file_sha256(Path(ckpt) / "model.safetensors")[:24]


def _is_toy(model_dir: str):
    from model.toy.model import REPORT_KIND, world_of, read_report

    report = read_report(model_dir) or {}
    return world_of(model_dir) if report.get("kind") == REPORT_KIND else None


@task(name="evaluate-hypernet")
def run_evaluation(store_root: str, model_dir: str, checkpoint: str, cfg: EvaluateConfig, fraction: float,
                   run_id: str, progress: bool = False) -> dict[str, Any]:
    """Load the base model and the hypernetwork, evaluate, write the eval_results shard and the report."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.base_models import load_tokenizer
    from model.training.checkpoint import load_hypernet
    from model.evaluation.runner import evaluate_contexts
    from model.evaluation.long_docs import evaluate_long, needle_test
    from model.evaluation.report import long_summary
    from storage.hashing import content_key
    from storage.schemas import to_table
    from storage.store import Store
    from tasks.adapters import checkpoint_folder
    from tasks.common import entries_to_dicts

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt, _ = checkpoint_folder(checkpoint)
    contexts = read_eval_contexts(store_root, fraction, cfg.max_docs, cfg.max_questions_per_doc)
    if not contexts:
        raise ValueError(f"No held-out questions (fraction {fraction}): run synthesize/teacher first, or raise "
                         "evaluate.held_out_fraction.")
    world = _is_toy(model_dir)
    key = content_key("evaluate", EVAL_VERSION, cfg.model_dump(mode="json", exclude={"threads"}),
                      [checkpoint_fingerprint(ckpt), str(Path(model_dir).resolve()), samples_fingerprint(contexts),
                       fraction, world is not None])
    folder = eval_dir(store_root, key)
    store = Store(store_root)
    if store.done(store.catalog.manifest(), "evaluate", key) and (folder / "summary.json").exists():
        saved = json.loads((folder / "summary.json").read_text())
        return {"key": key, "done_before": True, "summary": saved["summary"], "long": saved.get("long"),
                "report": str(folder / "report.md"), "plot": str(folder / "results.png"), "entries": []}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    net = load_hypernet(ckpt)
    settings = eval_settings(cfg)
    out = evaluate_contexts(base, tok, net, contexts, settings, run_id=run_id, progress=progress)
    rows = list(out.rows)
    long = None
    notes = [f"held out: documents with held_out_score(doc_id) < {fraction} (sha256 of a salt and the doc_id)",
             f"checkpoint: {ckpt}", f"base model: {model_dir}", f"CD: {cfg.cd_steps} Adam steps at lr {cfg.cd_lr} "
             f"on {cfg.cd_train_fraction:.0%} of each document's questions, first {cfg.cd_max_docs} documents"]
    if world is not None and (cfg.long_docs or cfg.needle_docs):
        long_rows = []
        if cfg.long_docs and cfg.long_factors:
            long_rows += evaluate_long(base, tok, net, world, cfg.long_factors, cfg.long_docs, run_id=run_id,
                                       batch_size=cfg.batch_size)
        if cfg.needle_docs:
            long_rows += needle_test(base, tok, net, world, cfg.needle_factor, cfg.needle_depths, cfg.needle_docs,
                                     run_id=run_id, batch_size=cfg.batch_size)
        rows += long_rows
        long = long_summary(long_rows)
    elif world is None:
        notes.append("long documents and the needle test: skipped (they need the toy base model's world)")
    from model.evaluation.report import write_report

    paths = write_report(folder, out.summary, long, title=f"doc2lora evaluation ({Path(model_dir).name})",
                         notes=notes)
    entries = store.write_unit("evaluate", key, {"eval_results": to_table("eval_results", rows)})
    return {"key": key, "done_before": False, "summary": out.summary, "long": long, "timings": out.timings,
            "report": str(paths["report"]), "plot": str(paths["plot"]), "entries": entries_to_dicts(entries),
            "rows": len(rows), "contexts": len(contexts)}


def method_rows(summary: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """The per-method table (rows for a table artifact) and the same as Markdown with the ratio lines."""
    from model.evaluation.report import markdown_table, method_table, ratio_lines

    rows = method_table(summary)
    return rows, markdown_table(rows) + "\n" + "\n".join(ratio_lines(summary))


def eval_settings(cfg: EvaluateConfig):
    """The evaluator's settings from the stage config: every field of EvalSettings that the config has, by name
    (the rest keep the evaluator's defaults)."""
    import dataclasses

    from model.evaluation.runner import EvalSettings

    shared = {f.name for f in dataclasses.fields(EvalSettings)} & set(EvaluateConfig.model_fields)
    values = {name: getattr(cfg, name) for name in shared}
    values["methods"] = tuple(cfg.methods)
    return EvalSettings(**values)

