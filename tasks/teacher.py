"""Teacher: one task per `questions` shard -> a `samples` shard of answers with their top-k log-probs.

The base model answers each question with the chunk in its prompt (greedy). For every answer token the
top-k token ids and log-probs are kept, with the student's input: the chat template with the question only,
then the answer. Answers that hit the token limit before finishing are kept with ``finished = false`` (their
tokens are valid distillation targets; training can leave them out, ``TrainConfig.use_unfinished``) and counted.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from model.text.chunking import wrap_as_user_turn
from model.generation import SamplingConfig
from model.text.turns import teacher_prompt
from model.samples import sample_row
from storage.hashing import content_key, sha256_text
from storage.schemas import to_table
from storage.store import Store
from tasks.common import entries_to_dicts
from tasks.generation import BackendConfig, get_generator
from tasks.synthesize import tokenizer_for

TEACHER_VERSION = "2"  # 2: unfinished answers are kept (finished=false), no longer rejected


class TeacherConfig(BaseModel):
    """Teacher answer settings (all part of the stage's content key)."""

    model_config = ConfigDict(extra="forbid")

    topk: int = Field(16, ge=1, le=64, description="Top log-probs kept per answer token (vLLM serves <= 20).")
    max_new_tokens: int = Field(96, ge=1, description="Longer answers are cut here and kept with finished=false.")
    generator: BackendConfig = Field(default_factory=BackendConfig)


def teacher_key(questions_key: str, chunks_key: str, teacher_id: str, cfg: TeacherConfig) -> str:
    settings = cfg.model_dump(mode="json", exclude={"generator"})
    return content_key("teacher", TEACHER_VERSION, settings, [questions_key, chunks_key, teacher_id])


def teacher_sample(q: dict, teacher_id: str, student_prefix: list[int], out: Any, k: int) -> dict:
    """One `samples` row from a generation (finished, or cut at max_new_tokens: `finished` says which)."""
    return sample_row(sample_id=sha256_text(f"{q['question_id']}|{teacher_id}")[:32], doc_id=q["doc_id"],
                      chunk_id=q["chunk_id"], student_prefix=student_prefix, answer_ids=out.token_ids,
                      topk_ids=out.topk_ids, topk_logprobs=out.topk_logprobs, k=k, finished=bool(out.finished),
                      question_id=q["question_id"], teacher=teacher_id, answer=out.text)


@task(name="teacher-unit", task_run_name="teacher {label}")
def teacher_unit(store_root: str, questions_path: str, chunks_path: str, model_dir: str, cfg: TeacherConfig,
                 teacher_id: str, key: str, progress: bool = False, label: str = "") -> dict[str, Any]:
    """Answer every question of one shard with its chunk in the prompt; keep the top-k of each answer token."""
    questions = pq.read_table(questions_path).to_pylist()
    chunk_text = dict(zip(*pq.read_table(chunks_path, columns=["chunk_id", "text"]).to_pydict().values()))
    tok = tokenizer_for(model_dir)
    rows: list[dict] = []
    rejects: list[dict] = []
    if questions:
        gen = get_generator(cfg.generator, model_dir)
        prompts = [wrap_as_user_turn(tok, teacher_prompt(chunk_text[q["chunk_id"]], q["question"]))
                   for q in questions]
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, topk_logprobs=cfg.topk)
        for q, out in zip(questions, gen.generate(prompts, sampling, progress=progress)):
            if not out.ok:
                reason, detail = "generation_failed", out.error
            elif not out.token_ids or out.topk_ids is None:
                reason, detail = "empty_answer", "the teacher produced no tokens"
            else:
                rows.append(teacher_sample(q, teacher_id, wrap_as_user_turn(tok, q["question"]), out, cfg.topk))
                continue
            rejects.append({"stage": "teacher", "source": q["chunk_id"], "item": q["question_id"],
                            "reason": reason, "detail": detail})
    entries = Store(store_root).write_unit(
        "teacher", key, {"samples": to_table("samples", rows), "rejects": to_table("rejects", rejects)})
    n_tokens = sum(r["n_answer_tokens"] for r in rows)
    return {"entries": entries_to_dicts(entries),
            "stats": {"questions": len(questions), "samples": len(rows), "answer_tokens": n_tokens,
                      "unfinished": sum(not r["finished"] for r in rows), "rejects": len(rejects)}}
