"""The compact top-k codec: id widths, log-prob precisions (stated error bounds hold), Parquet round trip."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.topk_codec import (
    PRECISIONS,
    TopKFormat,
    decode_topk,
    encode_topk,
    error_bound,
    id_dtype,
    measured_error,
    topk_table,
)


def _teacher_like(n: int, k: int, vocab: int, seed: int = 0, sharp: float = 3.0):
    """Sorted top-k of softmax(logits) over a vocabulary: low entropy when ``sharp`` is large."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, vocab)) * sharp
    logits[np.arange(n), rng.integers(0, vocab, n)] += sharp * 3  # a clear winner on most steps
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    ids = np.argsort(-logp, axis=1)[:, :k]
    return ids.astype(np.int32), np.take_along_axis(logp, ids, axis=1).astype(np.float32)


@pytest.mark.parametrize(
    "vocab, dtype",
    [(1, np.uint8), (256, np.uint8), (257, np.uint16), (49152, np.uint16), (65536, np.uint16), (65537, np.uint32), (151936, np.uint32)],
)
def test_id_width(vocab, dtype):
    assert id_dtype(vocab) == np.dtype(dtype)
    assert TopKFormat(vocab, 16).id_type == pa.from_numpy_dtype(np.dtype(dtype))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_round_trip_within_stated_error(precision):
    ids, lp = _teacher_like(300, 16, 2000, seed=1)
    lp[0, -1] = -40.0  # far tail: below q8's clamp
    enc = encode_topk(ids, lp, vocab_size=2000, precision=precision)
    assert enc["topk_ids"].dtype == np.uint16 and enc["topk_ids"].shape == (300 * 16,)
    assert enc["topk_logprobs"].shape == (300 * 16,) and int(enc["topk"]) == 16
    dec_ids, dec_lp = decode_topk(enc["topk_ids"], enc["topk_logprobs"], 16, precision)
    assert dec_ids.dtype == np.int32 and dec_lp.dtype == np.float32
    assert np.array_equal(dec_ids, ids)
    assert np.all(np.diff(dec_lp, axis=1) <= 0)  # still sorted
    err = measured_error(ids, lp, 2000, precision)
    bound = error_bound(precision)
    assert err["ids_equal"]
    assert err["max_abs_prob"] <= bound["prob_abs"] * (1 + 1e-6) + 1e-9, (err, bound)
    if math.isfinite(bound["logprob_abs"]):
        assert err["max_abs_logprob"] <= bound["logprob_abs"] + 1e-6
        assert err["max_rel_prob"] <= bound["prob_rel"] * (1 + 1e-6) + 1e-12
    if precision == "q8":
        assert dec_lp[0, -1] == pytest.approx(-255 / 16)  # clamped
    print(f"\n{precision}: {err}")


def test_unsorted_rows_are_sorted_and_edge_values():
    ids = np.array([[5, 9, 7]], dtype=np.int64)
    lp = np.array([[-2.0, -0.1, -np.inf]])
    for precision in PRECISIONS:
        enc = encode_topk(ids, lp, 10, precision)
        d_ids, d_lp = decode_topk(enc["topk_ids"], enc["topk_logprobs"], 3, precision)
        assert d_ids.tolist() == [[9, 5, 7]] and np.isfinite(d_lp).all() and d_lp[0, 0] <= 0
    enc = encode_topk(np.array([[1]]), np.array([[1e-6]]), 10, "float16")  # slightly positive: clamped to 0
    assert decode_topk(enc["topk_ids"], enc["topk_logprobs"], 1, "float16")[1][0, 0] == 0.0
    with pytest.raises(ValueError):
        encode_topk(np.array([[10]]), np.array([[-1.0]]), 10)  # id outside the vocabulary
    with pytest.raises(ValueError):
        encode_topk(np.array([[1]]), np.array([[np.nan]]), 10)
    with pytest.raises(ValueError):
        encode_topk(np.array([1, 2]), np.array([-1.0, -2.0]), 10)  # not [n, k]
    with pytest.raises(ValueError):
        TopKFormat(10, 4, "int4")
    e = encode_topk(np.zeros((0, 4), dtype=np.int32), np.zeros((0, 4), dtype=np.float32), 10, "q8")  # empty answer
    assert decode_topk(e["topk_ids"], e["topk_logprobs"], 4, "q8")[0].shape == (0, 4)


@pytest.mark.parametrize("precision", ["float16", "q16", "q8"])
def test_parquet_round_trip_with_metadata(precision):
    fmt = TopKFormat(vocab_size=49152, k=16, precision=precision)
    answers = [_teacher_like(n, 16, 49152 // 8, seed=n) for n in (1, 7, 30)]
    answers = [(i * 8, lp) for i, lp in answers]  # ids across the whole vocabulary
    table = topk_table(answers, fmt)
    assert table.schema.field("topk_ids").type == pa.list_(pa.uint16())
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    fmt2 = TopKFormat.from_metadata(back.schema.metadata)
    assert fmt2 == fmt
    for row, (ids, lp) in enumerate(answers):
        d_ids, d_lp = fmt2.decode(back["topk_ids"][row], back["topk_logprobs"][row])
        assert np.array_equal(d_ids, ids)
        assert np.abs(np.exp(d_lp) - np.exp(lp)).max() <= error_bound(precision)["prob_abs"] + 1e-6


def test_compact_layouts_are_smaller_than_the_reference():
    """zstd Parquet bytes per token on low-entropy teacher-like data: q8 and q16 below int32 + fp16."""
    answers = [_teacher_like(n, 16, 4000, seed=n, sharp=4.0) for n in range(40, 80)]
    n_tokens = sum(len(i) for i, _ in answers)

    def nbytes(table: pa.Table) -> int:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.tell()

    ref = pa.table({
        "topk_ids": pa.array([i.reshape(-1) for i, _ in answers], pa.list_(pa.int32())),
        "topk_logprobs": pa.array([lp.reshape(-1).astype(np.float16) for _, lp in answers], pa.list_(pa.float16())),
    })
    sizes = {p: nbytes(topk_table(answers, TopKFormat(4000, 16, p))) / n_tokens for p in ("float16", "q16", "q8")}
    ref_size = nbytes(ref) / n_tokens
    print(f"\nbytes/token: reference {ref_size:.1f}, " + ", ".join(f"{p} {s:.1f}" for p, s in sizes.items()))
    assert sizes["q8"] < 0.8 * ref_size and sizes["q16"] < ref_size
    assert sizes["float16"] <= ref_size * 1.02
