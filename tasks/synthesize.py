"""Synthesize: one task per `chunks` shard -> a `questions` shard (gold QA kept, LLM questions in 2 rounds)."""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from model.base_models import load_tokenizer
from model.text.chunking import wrap_as_user_turn
from model.generation import SamplingConfig
from model.text.synthesis import PROMPT_VERSION, parse_questions, render_prompt
from storage.hashing import content_key, sha256_text
from storage.schemas import to_table
from storage.store import Store
from tasks.common import entries_to_dicts
from tasks.generation import BackendConfig, get_generator

SYNTH_VERSION = "1"


class SynthesizeConfig(BaseModel):
    """Question synthesis settings (all part of the stage's content key)."""

    model_config = ConfigDict(extra="forbid")

    llm_questions: bool = Field(True, description="Ask the question LLM (off: only questions the source carries).")
    llm_for_gold_docs: bool = Field(False, description="Also ask the LLM about documents that carry gold QA.")
    questions_per_round: int = Field(3, ge=1, le=50)
    rounds: int = Field(2, ge=1, le=2, description="2 adds non-redundant, reversal and multi-hop questions.")
    prompt_version: str = PROMPT_VERSION
    max_new_tokens: int = Field(128, ge=8)
    temperature: float = Field(0.0, ge=0)
    seed: int = 0
    generator: BackendConfig = Field(default_factory=BackendConfig)


@lru_cache(maxsize=16)
def _thread_tokenizer(model_dir: str, thread: int):
    return load_tokenizer(model_dir)


def tokenizer_for(model_dir: str):
    """One tokenizer per thread (see tasks/chunk.py `_tokenizer`): units may run at once in threads."""
    return _thread_tokenizer(model_dir, threading.get_ident())


def synth_key(chunks_key: str, generator_id: str, cfg: SynthesizeConfig) -> str:
    settings = cfg.model_dump(mode="json", exclude={"generator"})
    return content_key("synthesize", SYNTH_VERSION, settings, [chunks_key, generator_id])


def question_row(chunk: dict, kind: str, question: str, answer: str | None, generator: str,
                 version: str) -> dict:
    return {"question_id": sha256_text(f"{chunk['chunk_id']}|{kind}|{question}")[:32], "chunk_id": chunk["chunk_id"],
            "doc_id": chunk["doc_id"], "kind": kind, "question": question, "answer": answer,
            "generator": generator, "prompt_version": version}


def gold_questions(chunks: list[dict], gold: dict[str, list[dict]]) -> list[dict]:
    """Source-carried QA, each placed on the first chunk of its document that contains the answer."""
    by_doc: dict[str, list[dict]] = {}
    for c in chunks:
        by_doc.setdefault(c["doc_id"], []).append(c)
    rows = []
    for doc_id, qas in gold.items():
        doc_chunks = sorted(by_doc.get(doc_id, []), key=lambda c: c["chunk_index"])
        for qa in qas:
            if not doc_chunks:
                continue
            ans = (qa.get("answer") or "").lower()
            home = next((c for c in doc_chunks if ans and ans in c["text"].lower()), doc_chunks[0])
            rows.append(question_row(home, "gold", qa["question"], qa.get("answer"), "source", "gold"))
    return rows


def llm_questions(chunks: list[dict], model_dir: str, cfg: SynthesizeConfig, generator_id: str,
                  progress: bool) -> tuple[list[dict], list[dict]]:
    """Round 1 (plain) then round 2 (new, reversal, multi-hop) questions per chunk; bad replies -> rejects."""
    tok = tokenizer_for(model_dir)
    gen = get_generator(cfg.generator, model_dir)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    rows: list[dict] = []
    rejects: list[dict] = []
    seen: dict[str, list[str]] = {c["chunk_id"]: [] for c in chunks}
    for round_no in range(1, cfg.rounds + 1):
        prompts = [wrap_as_user_turn(tok, render_prompt(round_no, c["text"], cfg.questions_per_round,
                                                        seen[c["chunk_id"]], cfg.prompt_version)) for c in chunks]
        outs = gen.generate(prompts, sampling, progress=progress)
        for c, out in zip(chunks, outs):
            if not out.ok:
                rejects.append({"stage": "synthesize", "source": c["chunk_id"], "item": f"round{round_no}",
                                "reason": "generation_failed", "detail": out.error})
                continue
            parsed = parse_questions(out.text, seen=seen[c["chunk_id"]])
            for reason, text in parsed.rejected:
                rejects.append({"stage": "synthesize", "source": c["chunk_id"], "item": f"round{round_no}",
                                "reason": reason, "detail": f"question LLM wrote: {text!r}"[:500]})
            for q in parsed.questions[: cfg.questions_per_round]:
                rows.append(question_row(c, f"round{round_no}", q, None, generator_id, cfg.prompt_version))
            seen[c["chunk_id"]].extend(parsed.questions)
    return rows, rejects


@task(name="synthesize-unit", task_run_name="synthesize {label}")
def synthesize_unit(store_root: str, chunks_path: str, documents_path: str, model_dir: str,
                    cfg: SynthesizeConfig, generator_id: str, key: str, progress: bool = False,
                    label: str = "") -> dict[str, Any]:
    """Questions for every chunk of one shard."""
    chunks = pq.read_table(chunks_path, columns=["chunk_id", "doc_id", "chunk_index", "text"]).to_pylist()
    docs = pq.read_table(documents_path, columns=["doc_id", "gold_qa"]).to_pylist()
    gold = {d["doc_id"]: d["gold_qa"] for d in docs if d["gold_qa"]}
    rows = gold_questions(chunks, gold)
    rejects: list[dict] = []
    if cfg.llm_questions:
        asked = [c for c in chunks if cfg.llm_for_gold_docs or c["doc_id"] not in gold]
        if asked:
            more, rejects = llm_questions(asked, model_dir, cfg, generator_id, progress)
            rows += more
    entries = Store(store_root).write_unit(
        "synthesize", key, {"questions": to_table("questions", rows), "rejects": to_table("rejects", rejects)})
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {"entries": entries_to_dicts(entries),
            "stats": {"questions": len(rows), "rejects": len(rejects), **{f"kind_{k}": v for k, v in kinds.items()}}}
