"""The one builder of a distillation sample: the columns of a `samples` row that training reads.

A sample is the student's input (the chat template with the question only, then the teacher's answer) and,
for every answer token, the teacher's top-k token ids and log-probs (with the document in its prompt),
flattened ``[n_answer_tokens * k]``. Log-probs are rounded through float16, as the Parquet shards store
them, so that rows built in memory (the toy benchmark, tests) equal rows read back from a store.
``finished`` is False when the answer reached the token limit: its tokens are still valid targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["sample_row"]


def sample_row(*, sample_id: str, doc_id: str, chunk_id: str, student_prefix: Sequence[int],
               answer_ids: Sequence[int], topk_ids: Any, topk_logprobs: Any, k: int, finished: bool = True,
               **extra: Any) -> dict[str, Any]:
    """A `samples` row: the ids, the distillation columns, and `extra` columns as given (question_id, ...)."""
    answer = [int(t) for t in answer_ids]
    ids = np.asarray(topk_ids, dtype=np.int64).reshape(len(answer), k)
    lps = np.asarray(topk_logprobs, dtype=np.float32).reshape(len(answer), k)
    row = {"sample_id": sample_id, "doc_id": doc_id, "chunk_id": chunk_id,
           "student_ids": [int(t) for t in student_prefix] + answer, "answer_start": len(student_prefix),
           "n_answer_tokens": len(answer), "topk": int(k), "topk_ids": ids.ravel().tolist(),
           "topk_logprobs": lps.astype(np.float16).astype(np.float32).ravel().tolist(), "finished": bool(finished)}
    row.update(extra)
    return row
