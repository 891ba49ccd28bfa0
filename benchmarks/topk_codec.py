"""Compact storage of a teacher's top-k log-probabilities in Parquet.

One answer of ``n`` tokens has ``ids[n, k]`` and ``logprobs[n, k]`` (each row sorted by log-prob,
descending). :func:`encode_topk` turns them into two flat arrays (``n * k`` values, row-major) ready for
Parquet list columns whose Arrow types :class:`TopKFormat` defines; :func:`decode_topk` turns them back.

Ids take the narrowest unsigned type the vocabulary needs: ``uint8`` (vocab <= 256), ``uint16``
(<= 65,536), else ``uint32``. (On disk Parquet stores 8/16-bit integers in its INT32 physical type, so the
width mostly saves memory after reading; the file size comes from the encoding + zstd. Measure with
``benchmarks/teacher_cache_bytes.py``.)

Log-prob precisions (``precision=``), with the stated error of the stored value:

============  =========================  ============================================================
name          stored as                  error
============  =========================  ============================================================
``float32``   float32                    none (for tests and comparisons)
``float16``   float16                    relative, in log space: 2^-11 (the reference layout's choice)
``q16``       uint16, -logprob / 2^-10   |d logprob| <= 2^-11 nats  ->  |dp| / p <= 4.9e-4;
              nats, clamp 65535 (64      delta-coded along k (see below)
              nats)
``q8``        uint8, -logprob / 2^-4     |d logprob| <= 2^-5 nats   ->  |dp| / p <= 3.2%;
              nats, clamp 255 (~15.9     log-probs below -15.9 (p < 1.2e-7) are stored as -15.9;
              nats)                      delta-coded along k
============  =========================  ============================================================

The errors are stated in log space (= relative error in probability) on purpose: the distillation loss
``-sum_k p_T(k) log q_S(k)`` multiplies each teacher probability by ``|log q_S(k)|``, which is largest
for the tail entries, so a uniform *absolute* error in p (e.g. 8-bit linear probabilities: |dp| <= 1/510,
but every p < 0.002 collapses to one value) costs more loss accuracy than its small number suggests.

Delta coding (``q16``, ``q8``): a row's codes are non-decreasing (log-probs sorted descending), so the
row is stored as its first code followed by the differences between neighbours; these are small
numbers that zstd compresses well. It is exact: decoding takes a cumulative sum.

Capture and training configurations must agree (DistillKit's warning): :meth:`TopKFormat.metadata`
gives the format as Parquet schema metadata to write beside the data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

PRECISIONS = ("float32", "float16", "q16", "q8")
METADATA_KEY = b"doc2lora.topk"

_Q_STEP = {"q16": 2.0**-10, "q8": 2.0**-4}
_Q_DTYPE = {"q16": np.uint16, "q8": np.uint8}
_F16_MIN = float(np.finfo(np.float16).min)


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every id of a vocabulary."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit 32-bit ids")


def logprob_dtype(precision: str) -> np.dtype:
    _check_precision(precision)
    return np.dtype(
        {"float32": np.float32, "float16": np.float16, "q16": np.uint16, "q8": np.uint8}[precision]
    )


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")


def error_bound(precision: str) -> dict[str, float]:
    """The stated worst-case error of a precision: ``logprob_abs`` (nats, for log-probs above the clamp),
    ``prob_rel`` (|dp| / p), ``prob_abs`` (|dp|). Infinite where a precision does not bound that error."""
    _check_precision(precision)
    if precision == "float32":
        return {"logprob_abs": 0.0, "prob_rel": 0.0, "prob_abs": 0.0}
    if precision == "float16":  # half ulp relative; a log-prob of -x has |d| <= x * 2^-11
        # |d logprob| <= |logprob| * 2^-11, so |dp| <= p * |log p| * 2^-11 <= e^-1 * 2^-11
        return {"logprob_abs": math.inf, "prob_rel": math.inf, "prob_abs": math.exp(-1) * 2.0**-11}
    half = _Q_STEP[precision] / 2  # q16, q8 (above the clamp)
    return {"logprob_abs": half, "prob_rel": math.expm1(half), "prob_abs": math.expm1(half)}


@dataclass(frozen=True)
class TopKFormat:
    """How a teacher cache stores top-k: vocabulary size (-> id type), k and log-prob precision."""

    vocab_size: int
    k: int
    precision: str = "float16"

    def __post_init__(self) -> None:
        id_dtype(self.vocab_size)
        _check_precision(self.precision)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    @property
    def id_dtype(self) -> np.dtype:
        return id_dtype(self.vocab_size)

    @property
    def logprob_dtype(self) -> np.dtype:
        return logprob_dtype(self.precision)

    @property
    def id_type(self) -> pa.DataType:
        return pa.from_numpy_dtype(self.id_dtype)

    @property
    def logprob_type(self) -> pa.DataType:
        return pa.from_numpy_dtype(self.logprob_dtype)

    def fields(self, prefix: str = "topk_") -> list[pa.Field]:
        """Two list columns, flattened ``[n_tokens * k]`` (row-major)."""
        return [
            pa.field(f"{prefix}ids", pa.list_(self.id_type)),
            pa.field(f"{prefix}logprobs", pa.list_(self.logprob_type)),
        ]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "vocab_size": self.vocab_size,
            "k": self.k,
            "precision": self.precision,
            "id_type": str(self.id_dtype),
            "logprob_type": str(self.logprob_dtype),
            "layout": "row-major [n_tokens * k], rows sorted by logprob descending",
        }
        if self.precision in _Q_STEP:
            d.update(step_nats=_Q_STEP[self.precision], clamp_code=int(np.iinfo(self.logprob_dtype).max), delta_coded=True)
        return d

    def metadata(self) -> dict[bytes, bytes]:
        """Parquet/Arrow schema metadata describing this format."""
        return {METADATA_KEY: json.dumps(self.to_dict(), sort_keys=True).encode()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> TopKFormat:
        if not metadata or METADATA_KEY not in metadata:
            raise KeyError("no doc2lora.topk entry in the schema metadata")
        d = json.loads(metadata[METADATA_KEY])
        return cls(vocab_size=int(d["vocab_size"]), k=int(d["k"]), precision=str(d["precision"]))

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        return encode_topk(ids, logprobs, self.vocab_size, self.precision)

    def decode(self, ids_values: Any, logprob_values: Any) -> tuple[np.ndarray, np.ndarray]:
        return decode_topk(ids_values, logprob_values, self.k, self.precision)


# ------------------------------------------------------------------------------------------------------


def _sort_rows(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by log-prob, descending (stable); a no-op on already sorted rows."""
    if logprobs.shape[1] > 1 and np.any(np.diff(logprobs, axis=1) > 0):
        order = np.argsort(-logprobs, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        logprobs = np.take_along_axis(logprobs, order, axis=1)
    return ids, logprobs


def encode_topk(
    ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, precision: str = "float16"
) -> dict[str, np.ndarray]:
    """``ids[n, k]``, ``logprobs[n, k]`` -> ``{"topk_ids": flat, "topk_logprobs": flat, "topk": k}``.

    The flat arrays (``n * k`` values, row-major) have the dtypes of :class:`TopKFormat`; put them in the
    list columns of :meth:`TopKFormat.fields`. Rows are sorted by log-prob (descending) first if needed.
    Log-probs are clamped to <= 0; NaN is an error; -inf is stored as the precision's floor.
    """
    _check_precision(precision)
    ids = np.asarray(ids)
    lp = np.asarray(logprobs, dtype=np.float64)
    if ids.ndim != 2 or lp.shape != ids.shape:
        raise ValueError(f"ids and logprobs must both be [n, k]; got {ids.shape} and {lp.shape}")
    n, k = ids.shape
    if k < 1:
        raise ValueError("k must be >= 1")
    if n and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids outside [0, {vocab_size})")
    if np.isnan(lp).any():
        raise ValueError("NaN log-prob")
    ids, lp = _sort_rows(ids, np.minimum(lp, 0.0))

    if precision == "float32":
        values = np.maximum(lp, float(np.finfo(np.float32).min)).astype(np.float32)
    elif precision == "float16":
        values = np.maximum(lp, _F16_MIN).astype(np.float16)
    else:  # q16, q8
        dtype = _Q_DTYPE[precision]
        top = np.iinfo(dtype).max
        codes = np.clip(np.rint(-lp / _Q_STEP[precision]), 0, top).astype(np.int64)
        codes = np.maximum.accumulate(codes, axis=1)  # non-decreasing (guards float ties after rounding)
        deltas = codes.copy()
        deltas[:, 1:] = np.diff(codes, axis=1)
        values = deltas.astype(dtype)
    return {
        "topk_ids": ids.astype(id_dtype(vocab_size)).reshape(-1),
        "topk_logprobs": values.reshape(-1),
        "topk": np.int16(k),
    }


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_numpy(zero_copy_only=False)
    if isinstance(values, pa.Scalar):  # a list scalar
        return values.values.to_numpy(zero_copy_only=False) if values.values is not None else np.zeros(0)
    return np.asarray(values)


def decode_topk(ids_values: Any, logprob_values: Any, k: int, precision: str = "float16") -> tuple[np.ndarray, np.ndarray]:
    """Flat stored values (numpy, lists, or Arrow arrays / list scalars) -> ``ids[n, k]`` int32 and
    ``logprobs[n, k]`` float32."""
    _check_precision(precision)
    raw_ids = _to_numpy(ids_values)
    raw_lp = _to_numpy(logprob_values)
    if raw_ids.size != raw_lp.size or raw_ids.size % k:
        raise ValueError(f"{raw_ids.size} ids and {raw_lp.size} log-probs do not make rows of k={k}")
    ids = raw_ids.astype(np.int64).reshape(-1, k).astype(np.int32)
    if precision in ("float32", "float16"):
        lp = raw_lp.astype(np.float32).reshape(-1, k)
    else:  # q16, q8
        codes = np.cumsum(raw_lp.astype(np.int64).reshape(-1, k), axis=1)
        lp = (-codes * _Q_STEP[precision]).astype(np.float32)
    return ids, lp


def topk_table(items: list[tuple[np.ndarray, np.ndarray]], fmt: TopKFormat, prefix: str = "topk_") -> pa.Table:
    """Many answers' ``(ids[n, k], logprobs[n, k])`` -> an Arrow table with the two list columns (and the
    format in its schema metadata)."""
    enc = [encode_topk(i, lp, fmt.vocab_size, fmt.precision) for i, lp in items]
    f_ids, f_lp = fmt.fields(prefix)
    ids_col = pa.array([e["topk_ids"] for e in enc], type=f_ids.type)
    lp_col = pa.array([e["topk_logprobs"] for e in enc], type=f_lp.type)
    schema = pa.schema([f_ids, f_lp], metadata=fmt.metadata())
    return pa.Table.from_arrays([ids_col, lp_col], schema=schema)


def measured_error(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, precision: str) -> dict[str, float]:
    """Round-trip ``(ids, logprobs)`` and measure the error: max |d logprob| and max |dp| / p (for q16 and
    q8: over the entries above the clamp), max |dp| (all entries), and whether the ids came back unchanged."""
    enc = encode_topk(ids, logprobs, vocab_size, precision)
    dec_ids, dec_lp = decode_topk(enc["topk_ids"], enc["topk_logprobs"], ids.shape[1], precision)
    src_ids, src_lp = _sort_rows(np.asarray(ids), np.minimum(np.asarray(logprobs, dtype=np.float64), 0.0))
    p, q = np.exp(src_lp), np.exp(dec_lp.astype(np.float64))
    d_lp = np.abs(dec_lp - src_lp)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(p > 0, np.abs(q - p) / p, 0.0)
    if precision in _Q_STEP:  # the log-space bounds hold above the clamp
        above = src_lp > -float(np.iinfo(_Q_DTYPE[precision]).max) * _Q_STEP[precision]
        d_lp, rel = d_lp[above], rel[above]
    return {
        "max_abs_logprob": float(d_lp.max()) if d_lp.size else 0.0,
        "max_abs_prob": float(np.abs(q - p).max()) if p.size else 0.0,
        "max_rel_prob": float(rel.max()) if rel.size else 0.0,
        "ids_equal": bool(np.array_equal(dec_ids, src_ids)),
    }
