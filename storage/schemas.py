"""Explicit Arrow schemas for every table doc2lora writes.

Shards hold no wall-clock timestamps: a shard's bytes depend only on its inputs, its stage config and the
stage's code version, so a rerun reproduces them exactly. Times live in the catalog (manifest, runs).
"""

from __future__ import annotations

import pyarrow as pa

GOLD_QA = pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string())]))

DOCUMENTS = pa.schema(
    [
        ("doc_id", pa.string()),  # sha256 of the normalised text (hex, 32 chars)
        ("source", pa.string()),  # path or URI the document came from
        ("source_kind", pa.string()),  # txt | md | html | jsonl | parquet | csv | synthetic | datasets
        ("locator", pa.string()),  # where inside the source: line number, row index, or ""
        ("title", pa.string()),
        ("text", pa.string()),
        ("n_chars", pa.int64()),
        ("encoding", pa.string()),  # detected encoding of the raw bytes ("utf-8", "cp1252", ...)
        ("gold_qa", GOLD_QA),  # question/answer pairs carried by the source (toy world, datasets)
        ("meta", pa.string()),  # JSON object with source-specific extras
    ]
)

CHUNKS = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("doc_id", pa.string()),
        ("chunk_index", pa.int32()),
        ("n_chunks", pa.int32()),
        ("text", pa.string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("token_start", pa.int64()),  # span in the tokenisation of the whole document
        ("token_end", pa.int64()),
        ("n_tokens", pa.int32()),  # tokens of the chunk body
        ("n_prompt_tokens", pa.int32()),  # tokens once wrapped in the chat template as a user turn
        ("tokenizer", pa.string()),  # fingerprint of the tokenizer used
    ]
)

QUESTIONS = pa.schema(
    [
        ("question_id", pa.string()),
        ("chunk_id", pa.string()),
        ("doc_id", pa.string()),
        ("kind", pa.string()),  # gold | round1 | round2
        ("question", pa.string()),
        ("answer", pa.string()),  # gold answer where the source carries one, else null
        ("generator", pa.string()),
        ("prompt_version", pa.string()),
    ]
)

SAMPLES = pa.schema(
    [
        ("sample_id", pa.string()),
        ("question_id", pa.string()),
        ("chunk_id", pa.string()),
        ("doc_id", pa.string()),
        ("teacher", pa.string()),
        ("answer", pa.string()),
        ("student_ids", pa.list_(pa.int32())),  # chat template with the question only, then the answer
        ("answer_start", pa.int32()),  # index in student_ids of the first answer token
        ("n_answer_tokens", pa.int32()),
        ("topk", pa.int16()),
        ("topk_ids", pa.list_(pa.int32())),  # flattened [n_answer_tokens * topk]
        ("topk_logprobs", pa.list_(pa.float16())),  # flattened [n_answer_tokens * topk]
        ("finished", pa.bool_()),  # false: the answer reached max_new_tokens (kept; null in older shards = true)
    ]
)

EVAL_RESULTS = pa.schema(
    [
        ("run_id", pa.string()),
        ("doc_id", pa.string()),
        ("question_id", pa.string()),
        ("method", pa.string()),  # teacher | no_doc | d2l | cd
        ("prediction", pa.string()),
        ("gold", pa.string()),
        ("exact_match", pa.float64()),
        ("f1", pa.float64()),
        ("agrees_with_teacher", pa.float64()),
        ("kl_to_teacher", pa.float64()),
        ("doc_tokens", pa.int64()),
        ("adapter_seconds", pa.float64()),
        ("meta", pa.string()),
    ]
)

REJECTS = pa.schema(
    [
        ("stage", pa.string()),  # ingest | chunk | synthesize | teacher | ...
        ("source", pa.string()),  # file, URI or upstream id the bad item came from
        ("item", pa.string()),  # where inside it (line, row, question id), or ""
        ("reason", pa.string()),  # short machine-friendly reason: empty | binary | too_large | ...
        ("detail", pa.string()),  # human-readable explanation
    ]
)

TABLES: dict[str, pa.Schema] = {
    "documents": DOCUMENTS,
    "chunks": CHUNKS,
    "questions": QUESTIONS,
    "samples": SAMPLES,
    "eval_results": EVAL_RESULTS,
    "rejects": REJECTS,
}


def empty(table: str) -> pa.Table:
    """An empty table with the named schema."""
    return TABLES[table].empty_table()


def to_table(table: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts) to an Arrow table with the named schema; missing keys become nulls, extra keys fail."""
    schema = TABLES[table]
    extra = {k for r in rows for k in r} - set(schema.names)
    if extra:
        raise ValueError(f"{table}: unknown columns {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)
