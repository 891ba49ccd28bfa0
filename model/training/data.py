"""Training data for the hypernetwork: rows, length-bucketed deterministic batches, held-out split, chunk draws.

Rows
----
One row per teacher sample: the ``samples`` columns (storage/schemas.py SAMPLES: ``doc_id``,
``student_ids``, ``answer_start``, ``n_answer_tokens``, ``topk``, ``topk_ids`` and ``topk_logprobs``
flattened ``[n_answer_tokens * topk]``; ``sample_id`` / ``chunk_id`` when known) plus the context the
teacher saw, either

- ``context_ids``: the token ids of the chunk's text WITHOUT the chat-template affixes (preferred: exactly
  the tokens, no re-tokenisation), or
- ``context_text``: the chunk's text, tokenised here once (special-token strings as plain text, as
  ``model/text/chunking.py`` does).

The loop wraps every piece in the user-turn affixes itself (``chat_affixes``), so a context can be split
into pieces that each get the affixes again, as at use time (``model/hypernet/internalize.py``).

Determinism
-----------
The data order is a pure function of ``(seed, epoch, micro-batch index)``: epoch ``e``'s batches come from
``numpy.random.default_rng([seed, stream, e])``, the chunk counts of micro-batch ``m`` from
``default_rng([seed, stream, m])``. There is no hidden sampler state: the generator's "state" is the
step counter saved in the checkpoint, so a resumed run sees exactly the batches an uninterrupted run sees.

Rows of one micro-batch that share a context (the same ``chunk_id``, else the same context tokens) share
one generated adapter (encoded once); the chunk count is drawn per context.

Context groups (``TrainConfig.context_groups``): consecutive contexts of a micro-batch are merged into one
adapter, as the chunks of a document several times the trained length are at use time, and every row of
the group is scored with it; two contexts that are asked the same question (the same prompt tokens) are
never put in one group, since one adapter cannot give both their answers. The group size of micro-batch
``m`` comes from ``default_rng([seed, stream, m])`` too.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.training.loss import collate_samples

STREAM_TRAIN, STREAM_CHUNKS, STREAM_EVAL, STREAM_GROUPS = 1, 2, 3, 4
HELD_OUT_SALT = "doc2lora-heldout-v1"


# ----------------------------------------------------------------------------------------------- tokens
def plain_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added; special-token strings are ordinary text."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The user-turn prefix and suffix (with the generation prompt) that wrap every context piece."""
    from model.text.chunking import chat_affixes

    prefix, suffix = chat_affixes(tokenizer)
    return list(prefix), list(suffix)


def pad_id_of(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid or 0)


def context_ids_of(row: Mapping[str, Any], tokenizer=None) -> list[int]:
    """The unwrapped context tokens of a row (``context_ids``, else ``context_text`` tokenised)."""
    ids = row.get("context_ids")
    if ids is not None:
        return [int(t) for t in ids]
    text = row.get("context_text")
    if text is None:
        raise ValueError(f"row {row.get('sample_id')!r} has neither context_ids nor context_text")
    if tokenizer is None:
        raise ValueError("context_text needs a tokenizer")
    return plain_tokens(tokenizer, text)


def validate_row(row: Mapping[str, Any]) -> None:
    """Raise ValueError when a row cannot be trained on (checked once, before training starts)."""
    sid = row.get("sample_id")
    n, k = int(row["n_answer_tokens"]), int(row["topk"])
    start, length = int(row["answer_start"]), len(row["student_ids"])
    if n < 1 or k < 1:
        raise ValueError(f"row {sid!r}: n_answer_tokens={n}, topk={k}")
    if start < 1 or start + n > length:
        raise ValueError(f"row {sid!r}: answer span [{start}, {start + n}) outside 1..{length}")
    if len(row["topk_ids"]) != n * k or len(row["topk_logprobs"]) != n * k:
        raise ValueError(f"row {sid!r}: top-k lists are not n_answer_tokens * topk = {n * k} long")


# ----------------------------------------------------------------------------------------------- split
def held_out_score(doc_id: Any, salt: str = HELD_OUT_SALT) -> float:
    """A stable number in [0, 1) for a document (sha256 of salt + doc_id); not Python's salted hash()."""
    h = hashlib.sha256(f"{salt}\x00{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def is_held_out(doc_id: Any, fraction: float, salt: str = HELD_OUT_SALT) -> bool:
    return held_out_score(doc_id, salt) < fraction


def split_held_out(
    rows: Sequence[Mapping[str, Any]], fraction: float = 0.1, salt: str = HELD_OUT_SALT
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(train, held_out) by document: all rows of a doc_id go to the same side, stably across runs and
    corpus growth (a document's side depends only on its id)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    train, held = [], []
    for r in rows:
        (held if is_held_out(r["doc_id"], fraction, salt) else train).append(r)
    return train, held


# ----------------------------------------------------------------------------------------------- order
def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    bucket_by_length: bool = True,
    bucket_batches: int = 16,
    drop_last: bool = False,
    stream: int = STREAM_TRAIN,
    groups: Sequence[Any] | None = None,
    rows_per_context: int = 1,
) -> list[list[int]]:
    """Row indices of each batch of one epoch: a pure function of the arguments.

    ``rows_per_context`` > 1 (with ``groups``, each row's context key): a batch holds ``rows_per_context``
    rows of each of ``batch_size / rows_per_context`` contexts, which are encoded once (``grouped_batches``).

    Shuffle the rows; cut the permutation into windows of ``batch_size * bucket_batches`` rows; sort each
    window by length (stable) and cut it into batches; shuffle the batches. Similar lengths share a batch
    (little padding) while every epoch still mixes the data.
    """
    n = len(lengths)
    if n == 0:
        return []
    rng = np.random.default_rng([int(seed), int(stream), int(epoch)])
    if rows_per_context > 1 and groups is not None:
        return grouped_batches(groups, batch_size, rows_per_context, rng, drop_last)
    perm = rng.permutation(n)
    lens = np.asarray(lengths)
    batches: list[list[int]] = []
    window = batch_size * max(1, bucket_batches) if bucket_by_length else n
    for w in range(0, n, window):
        part = perm[w : w + window]
        if bucket_by_length:
            part = part[np.argsort(lens[part], kind="stable")]
        batches += [part[i : i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    if drop_last and len(batches[-1]) < batch_size and len(batches) > 1:
        # the partial batch is the last of the last window; drop it
        batches = [b for b in batches if len(b) == batch_size]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def grouped_batches(groups: Sequence[Any], batch_size: int, rows_per_context: int, rng, drop_last: bool = False
                    ) -> list[list[int]]:
    """Batches of whole units: each unit is up to `rows_per_context` shuffled rows of one context; units
    are shuffled and packed into batches of `batch_size` rows (no length bucketing)."""
    by_ctx: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by_ctx.setdefault(g, []).append(i)
    units = []
    for rows in by_ctx.values():
        rows = [rows[j] for j in rng.permutation(len(rows))]
        units += [rows[j : j + rows_per_context] for j in range(0, len(rows), rows_per_context)]
    batches: list[list[int]] = [[]]
    for u in rng.permutation(len(units)):
        if len(batches[-1]) + len(units[u]) > batch_size and batches[-1]:
            batches.append([])
        batches[-1] += units[u]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class DataOrder:
    """Micro-batch ``m`` (0-based, over all epochs) -> (epoch, row indices). Stateless apart from caches.

    With whole-context units of unequal size (``rows_per_context`` over contexts with different question
    counts), the number of batches can differ from epoch to epoch: the epochs' batch counts are kept, so
    ``m`` always maps to the same batch however the run got there (a resumed run included)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, bucket_by_length: bool = True,
                 bucket_batches: int = 16, drop_last: bool = False, groups: Sequence[Any] | None = None,
                 rows_per_context: int = 1):
        self.lengths = list(lengths)
        self.kw = dict(batch_size=batch_size, seed=seed, bucket_by_length=bucket_by_length,
                       bucket_batches=bucket_batches, drop_last=drop_last, groups=groups,
                       rows_per_context=rows_per_context)
        first = epoch_batches(self.lengths, epoch=0, **self.kw)
        self.batches_per_epoch = len(first)  # epoch 0's; later epochs may differ by a batch or two
        if self.batches_per_epoch == 0:
            raise ValueError("no training rows")
        self._cache: tuple[int, list[list[int]]] = (0, first)
        self._starts = [0, len(first)]  # _starts[e] = first micro-batch of epoch e (known so far)

    def _locate(self, m: int) -> tuple[int, int]:
        m = int(m)
        while self._starts[-1] <= m:
            epoch = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._batches(epoch)))
        epoch = bisect.bisect_right(self._starts, m) - 1
        return epoch, m - self._starts[epoch]

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._cache[0] != epoch:
            self._cache = (epoch, epoch_batches(self.lengths, epoch=epoch, **self.kw))
        return self._cache[1]

    def epoch_of(self, m: int) -> int:
        return self._locate(m)[0]

    def __call__(self, m: int) -> tuple[int, list[int]]:
        epoch, i = self._locate(m)
        return epoch, self._batches(epoch)[i]


def eval_batches(lengths: Sequence[int], batch_size: int, seed: int, max_batches: int = 0) -> list[list[int]]:
    """The held-out batches evaluated every time: fixed (its own stream), length-bucketed; the first
    `max_batches` of them (0: all)."""
    batches = epoch_batches(lengths, batch_size, seed, 0, True, 16, False, stream=STREAM_EVAL)
    return batches if max_batches <= 0 else batches[:max_batches]


# ----------------------------------------------------------------------------------------------- chunks
def even_sizes(total: int, n: int) -> list[int]:
    base, extra = divmod(total, n)
    return [base + 1 if i < extra else base for i in range(n)]


def split_context(ids: Sequence[int], n: int, min_piece_tokens: int = 1) -> list[list[int]]:
    """`ids` in n (or fewer, so that every piece has >= min_piece_tokens) consecutive near-equal pieces."""
    ids = list(ids)
    n = max(1, min(int(n), len(ids) // max(1, min_piece_tokens)))
    out, start = [], 0
    for size in even_sizes(len(ids), n):
        out.append(ids[start : start + size])
        start += size
    return out


def draw_chunk_counts(seed: int, m: int, n_groups: int, counts: Sequence[int], probs: Sequence[float]) -> list[int]:
    """The chunk count of each context of micro-batch `m`: a pure function of (seed, m)."""
    if len(counts) == 1:
        return [int(counts[0])] * n_groups
    rng = np.random.default_rng([int(seed), STREAM_CHUNKS, int(m)])
    return [int(c) for c in rng.choice(np.asarray(counts), size=n_groups, p=np.asarray(probs))]


def draw_group_size(seed: int, m: int, sizes: Sequence[int], probs: Sequence[float]) -> int:
    """The context-group size of micro-batch `m`: a pure function of (seed, m)."""
    if len(sizes) == 1:
        return int(sizes[0])
    rng = np.random.default_rng([int(seed), STREAM_GROUPS, int(m)])
    return int(rng.choice(np.asarray(sizes), p=np.asarray(probs)))


def group_contexts(tb: "TrainBatch", size: int) -> "TrainBatch":
    """`tb` with runs of up to `size` consecutive contexts merged into one adapter each (their pieces stay, in
    order); a context asked a question that the open group was already asked starts a new group."""
    if size <= 1 or len(tb.chunks_per_context) <= 1:
        return tb
    ids, starts = tb.batch["student_ids"], tb.batch["answer_start"]
    row_ctx = tb.row_context.tolist()
    asked: list[set] = [set() for _ in tb.chunks_per_context]
    for i, c in enumerate(row_ctx):
        asked[c].add(tuple(ids[i, : int(starts[i])].tolist()))
    group_of, per, open_asked, open_n = [], [], set(), 0
    for c, n in enumerate(tb.chunks_per_context):
        if not per or open_n >= size or asked[c] & open_asked:
            per.append(0)
            open_asked, open_n = set(), 0
        per[-1] += n
        open_asked |= asked[c]
        open_n += 1
        group_of.append(len(per) - 1)
    row_group = torch.tensor([group_of[c] for c in row_ctx], dtype=torch.long)
    return TrainBatch(tb.batch, tb.chunks, per, row_group, tb.epoch)


def context_key(row: Mapping[str, Any], ctx: Sequence[int]) -> Any:
    cid = row.get("chunk_id")
    return ("chunk", cid) if cid is not None else ("ids", tuple(ctx))


@dataclass
class TrainBatch:
    batch: dict[str, Any]  # collate_samples(...) of the rows
    chunks: list[list[int]]  # wrapped pieces, context after context
    chunks_per_context: list[int]  # pieces of each context (sums to len(chunks))
    row_context: torch.Tensor  # [B] index of each row's context (its adapter row)
    epoch: int = 0

    @property
    def n_samples(self) -> int:
        return int(self.batch["student_ids"].shape[0])


def build_batch(
    rows: Sequence[Mapping[str, Any]],
    contexts: Sequence[Sequence[int]],
    prefix: Sequence[int],
    suffix: Sequence[int],
    pad_id: int,
    counts: Callable[[int], list[int]] | None = None,
    min_piece_tokens: int = 1,
    epoch: int = 0,
) -> TrainBatch:
    """Collate rows; group them by context; split each context into its drawn number of pieces and wrap
    each piece as a user turn. `counts(n_contexts)` gives the piece counts (default: 1 each)."""
    keys: list[Any] = []
    ctx_of_group: list[Sequence[int]] = []
    row_context = []
    for r, ctx in zip(rows, contexts):
        key = context_key(r, ctx)
        if key not in keys:
            keys.append(key)
            ctx_of_group.append(ctx)
        row_context.append(keys.index(key))
    ns = counts(len(keys)) if counts is not None else [1] * len(keys)
    chunks, per = [], []
    for ctx, n in zip(ctx_of_group, ns):
        pieces = split_context(ctx, n, min_piece_tokens)
        chunks += [list(prefix) + p + list(suffix) for p in pieces]
        per.append(len(pieces))
    return TrainBatch(collate_samples(rows, pad_id), chunks, per, torch.tensor(row_context, dtype=torch.long), epoch)


# ----------------------------------------------------------------------------------------------- teacher


__all__ = [
    "DataOrder", "TrainBatch", "affixes", "build_batch", "context_ids_of", "draw_chunk_counts", "draw_group_size",
    "group_contexts",
    "epoch_batches", "eval_batches", "held_out_score", "is_held_out", "pad_id_of", "plain_tokens",
    "split_context", "split_held_out", "validate_row",
]
