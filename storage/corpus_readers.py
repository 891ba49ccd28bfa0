"""Readers for each source kind. Each fills a `Sink` with DOCUMENTS rows and REJECTS rows and never raises
for bad input; `storage.corpus.read_unit` dispatches to them."""

from __future__ import annotations

import contextlib
import csv
import datetime
import decimal
import hashlib
import io
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, unquote

from storage.corpus_text import Decoded, decode_bytes, html_declared_charset, html_to_text, markdown_title, \
    normalise_text

from storage.sources import IngestConfig, SourceUnit
from storage.synthetic import world_named

_ITEM_WORD = {"jsonl": "line", "csv": "row", "parquet": "row", "datasets": "row", "synthetic": "document"}
_META_STR_MAX = 1000


def split_uri(uri: str) -> tuple[str, list[tuple[str, str]]]:
    """'scheme://PATH?k=v&...' -> (unquoted PATH, [(k, v), ...]) with repeated keys kept in order."""
    rest = uri.split("://", 1)[1]
    path, _, query = rest.partition("?")
    return unquote(path), parse_qsl(query, keep_blank_values=True)


class Sink:
    """Collects one unit's documents (deduplicated by doc_id), rejects and stats."""

    def __init__(self, unit: SourceUnit, cfg: IngestConfig) -> None:
        self.unit, self.cfg = unit, cfg
        self.docs: list[dict] = []
        self.rejects: list[dict] = []
        self.stats: dict[str, Any] = {"items": 0, "bytes": 0, "chars": 0, "duplicates": 0}
        self.encodings: Counter[str] = Counter()
        self._by_id: dict[str, dict] = {}

    def label(self, item: str) -> str:
        """Human name of an item inside the source: 'line 3', 'row 0', 'the file'."""
        return f"{_ITEM_WORD.get(self.unit.kind, 'item')} {item}" if item != "" else "the file"

    def reject(self, item: Any, reason: str, detail: str) -> None:
        """Record one bad item."""
        self.rejects.append({"stage": "ingest", "source": self.unit.source, "item": str(item), "reason": reason,
                             "detail": detail})

    def document(self, locator: str, text: str, *, title: str = "", encoding: str = "",
                 gold_qa: list[dict] | None = None, meta: dict | None = None) -> None:
        """Normalise, check the size limits and keep one document unless it duplicates an earlier one."""
        self.stats["items"] += 1
        text = normalise_text(text)
        where = self.label(locator)
        if not text:
            return self.reject(locator, "empty", f"{where.capitalize()} has no text once whitespace is normalised.")
        if len(text) > self.cfg.max_chars:
            return self.reject(locator, "too_large", f"{where.capitalize()} has {len(text):,} characters, over "
                               f"max_chars={self.cfg.max_chars:,}.")
        if len(text) < self.cfg.min_chars:
            return self.reject(locator, "too_short", f"{where.capitalize()} has {len(text):,} characters, under "
                               f"min_chars={self.cfg.min_chars:,}.")
        doc_id = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]  # == doc_id_for(text): already normalised
        qa = list(gold_qa or [])
        if doc_id in self._by_id:
            self.stats["duplicates"] += 1
            kept = self._by_id[doc_id]["gold_qa"]
            kept.extend(p for p in qa if p not in kept)
            return None
        row = {"doc_id": doc_id, "source": self.unit.source, "source_kind": self.unit.kind, "locator": locator,
               "title": title or "", "text": text, "n_chars": len(text), "encoding": encoding,
               "gold_qa": _unique(qa), "meta": json.dumps(meta or {}, sort_keys=True, ensure_ascii=False)}
        self._by_id[doc_id] = row
        self.docs.append(row)
        self.stats["chars"] += len(text)
        self.encodings[encoding] += 1
        return None

    def result(self) -> tuple[list[dict], list[dict], dict]:
        """(documents, rejects, stats)."""
        reasons = Counter(r["reason"] for r in self.rejects)
        stats = dict(self.stats, docs=len(self.docs), documents=len(self.docs), rejects=len(self.rejects),
                     reasons=dict(sorted(reasons.items())), encodings=dict(sorted(self.encodings.items())))
        return self.docs, self.rejects, stats


def _unique(pairs: list[dict]) -> list[dict]:
    """Drop repeated question/answer pairs, keeping the first of each."""
    out: list[dict] = []
    for p in pairs:
        if p not in out:
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------- file helpers

def _file_bytes(sink: Sink, size_only: bool = False) -> bytes | None:
    """The unit's file bytes after the existence and max_bytes checks (b'' when size_only), or None."""
    path = sink.unit.source
    try:
        size = os.stat(path).st_size
        if size > sink.cfg.max_bytes:
            sink.stats["bytes"] = size
            sink.reject("", "too_large", f"The file has {size:,} bytes, over max_bytes={sink.cfg.max_bytes:,}.")
            return None
        data = b"" if size_only else Path(path).read_bytes()
    except FileNotFoundError:
        sink.reject("", "not_found", f"{path} does not exist (any more).")
        return None
    except OSError as exc:
        sink.reject("", "unreadable_file", f"{path} could not be read: {exc.strerror or exc}.")
        return None
    sink.stats["bytes"] = size if size_only else len(data)
    return data


def _decoded(sink: Sink, data: bytes, declared: str | None = None) -> Decoded | None:
    """Decode file bytes, turning binary or undecodable input into a file-level reject."""
    dec = decode_bytes(data, declared)
    if dec.text is None:
        sink.reject("", dec.reason, f"The file {dec.detail}.")
        return None
    return dec


# ---------------------------------------------------------------------------------------------- whole files

def read_whole_file(sink: Sink) -> None:
    """txt / md / html: the whole file is one document."""
    data = _file_bytes(sink)
    if data is None:
        return
    kind = sink.unit.kind
    dec = _decoded(sink, data, html_declared_charset(data) if kind == "html" else None)
    if dec is None:
        return
    text, title = dec.text or "", ""
    if kind == "html":
        text, title = html_to_text(text)
    elif kind == "md":
        title = markdown_title(normalise_text(text))
    sink.document("", text, title=title, encoding=dec.encoding)


# ----------------------------------------------------------------------------------------- tabular records

def _as_text(value: Any) -> tuple[str | None, str | None, str, str]:
    """(text, encoding or None to inherit the file's, reason, detail) for one text cell."""
    if value is None:
        return "", None, "", ""
    if isinstance(value, str):
        return value, None, "", ""
    if isinstance(value, (bytes, bytearray)):
        dec = decode_bytes(bytes(value))
        return dec.text, dec.encoding, dec.reason, f"holds bytes, and the value {dec.detail}"
    return None, None, "not_text", f"holds a {type(value).__name__}, not a string"


def _answer(a: Any) -> str | None:
    """One gold answer from a string, a list of answers (first) or a SQuAD-style {'text': [...]} dict."""
    if isinstance(a, dict):
        a = a.get("text")
    if isinstance(a, (list, tuple)):
        a = a[0] if a else None
    return None if a is None else str(a).strip()


def gold_pairs(q: Any, a: Any) -> list[dict]:
    """Gold QA pairs from a question cell and an answer cell (scalars, or parallel lists)."""
    if isinstance(q, (list, tuple)):
        answers = a if isinstance(a, (list, tuple)) and len(a) == len(q) else [a] * len(q)
        return [p for qq, aa in zip(q, answers) for p in gold_pairs(qq, aa)]
    if q is None or not str(q).strip():
        return []
    return [{"question": str(q).strip(), "answer": _answer(a)}]


def _meta_value(v: Any) -> Any:
    """A JSON-friendly scalar for meta, or ... (Ellipsis) to leave the column out."""
    if v is None or isinstance(v, (bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else ...
    if isinstance(v, str):
        return v if len(v) <= _META_STR_MAX else ...
    if isinstance(v, (datetime.date, datetime.time, decimal.Decimal)):
        return str(v)
    return ...


def _record(sink: Sink, locator: str, rec: dict, encoding: str) -> None:
    """One row with the text column present -> a document or a reject."""
    cfg = sink.cfg
    text, enc, reason, detail = _as_text(rec[cfg.text_column])
    if text is None:
        return sink.reject(locator, reason, f"{sink.label(locator).capitalize()}: column {cfg.text_column!r} {detail}.")
    title = rec.get(cfg.title_column) if cfg.title_column else None
    qa = gold_pairs(rec.get(cfg.question_column), rec.get(cfg.answer_column)) if cfg.question_column else []
    used = {cfg.text_column, cfg.title_column, cfg.question_column, cfg.answer_column}
    meta = {k: m for k, v in rec.items() if isinstance(k, str) and k not in used and (m := _meta_value(v)) is not ...}
    title_text = " ".join(str(title).split())[:500] if title is not None else ""
    sink.document(locator, text, title=title_text, encoding=enc or encoding, gold_qa=qa, meta=meta)
    return None


def _missing_column(sink: Sink, item: str, columns: list[str]) -> None:
    """Reject for a text column that is not there, listing the columns that are."""
    shown = ", ".join(repr(c) for c in columns[:20]) + (" ..." if len(columns) > 20 else "")
    where = sink.label(item).capitalize()
    sink.reject(item, "missing_column", f"{where} has no column {sink.cfg.text_column!r} (set text_column); "
                f"it has: {shown or 'no columns'}.")


def _records(sink: Sink, rows: Iterator[tuple[str, Any]], encoding: str) -> None:
    """Feed (locator, record) pairs; rows without the text column are rejected, once if none has it."""
    missing: list[tuple[str, list[str]]] = []
    found = False
    for locator, rec in rows:
        if sink.cfg.text_column in rec:
            found = True
            _record(sink, locator, rec, encoding)
        else:
            missing.append((locator, [str(k) for k in rec]))
    for locator, columns in [("", missing[0][1])] if missing and not found else missing:
        _missing_column(sink, locator, columns)


def read_jsonl(sink: Sink) -> None:
    """JSON lines: one document per object; bad lines are rejected, the others still read."""
    data = _file_bytes(sink)
    dec = _decoded(sink, data) if data is not None else None
    if dec is None:
        return
    _records(sink, _jsonl_rows(sink, dec.text or ""), dec.encoding)


def _jsonl_rows(sink: Sink, text: str) -> Iterator[tuple[str, dict]]:
    """(line number, object) for each good line; bad lines go to rejects. Bare JSON strings are texts."""
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit in strings
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            msg = getattr(exc, "msg", str(exc))
            col = getattr(exc, "colno", None)
            sink.reject(lineno, "malformed_jsonl",
                        f"Line {lineno} is not valid JSON ({msg}{f' at column {col}' if col else ''}).")
            continue
        if isinstance(value, str):
            value = {sink.cfg.text_column: value}
        if not isinstance(value, dict):
            sink.reject(lineno, "malformed_jsonl", f"Line {lineno} is a JSON {type(value).__name__}, not an object.")
            continue
        yield str(lineno), value


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Raise the csv module's field size limit for a block (documents can be long), then restore it."""
    old = csv.field_size_limit()
    csv.field_size_limit(min(max(old, limit), sys.maxsize // 2))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_csv(sink: Sink) -> None:
    """CSV with a header row: one document per row."""
    data = _file_bytes(sink)
    dec = _decoded(sink, data) if data is not None else None
    if dec is None:
        return
    with _csv_field_limit(4 * sink.cfg.max_chars + 1):
        reader = csv.DictReader(io.StringIO(dec.text or "", newline=""))
        try:
            header = reader.fieldnames
        except csv.Error as exc:
            return sink.reject("", "malformed_csv", f"The CSV header could not be parsed: {exc}.")
        if not header:
            return sink.reject("", "empty", "The CSV file has no header row and no data.")
        if sink.cfg.text_column not in header:
            return _missing_column(sink, "", list(header))
        index = 0
        try:
            for index, row in enumerate(reader):
                _record(sink, str(index), row, dec.encoding)
        except csv.Error as exc:
            sink.reject(index, "malformed_csv", f"The CSV could not be parsed at data row {index}: {exc}.")
    return None


def read_parquet(sink: Sink) -> None:
    """Parquet: one document per row; a corrupt file or page is rejected, rows read before it are kept."""
    import pyarrow.parquet as pq

    if _file_bytes(sink, size_only=True) is None:
        return
    try:
        pf = pq.ParquetFile(sink.unit.source)
        names = pf.schema_arrow.names
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for corrupt files
        return sink.reject("", "unreadable_parquet", f"The file is not a readable Parquet file: {exc}.")
    if sink.cfg.text_column not in names:
        return _missing_column(sink, "", list(names))
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                _record(sink, str(index), rec, "utf-8")
                index += 1
    except Exception as exc:  # noqa: BLE001
        sink.reject(index, "unreadable_parquet", f"The Parquet file could not be read from row {index} on: {exc}.")
    return None


# ------------------------------------------------------------------------------------ synthetic / datasets

def read_synthetic(sink: Sink) -> None:
    """synthetic://WORLD?...: a registered world's documents with their gold QA and metadata."""
    name, pairs = split_uri(sink.unit.source)
    world = world_named(name)
    if world is None:
        return sink.reject("", "bad_spec", f"Unknown synthetic world {name!r} (not registered in this process).")
    params = {**world.defaults, **{k: int(v) for k, v in pairs}}
    for i, doc in enumerate(world.documents(params)):
        sink.document(str(i), doc.text, gold_qa=doc.gold_qa, meta=doc.meta)
    return None


def read_datasets(sink: Sink) -> None:
    """datasets://PATH?...: rows of `datasets.load_dataset(...)`, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    path, pairs = split_uri(sink.unit.source)
    kwargs: dict[str, Any] = {}
    for k, v in pairs:
        if k == "data_files":
            kwargs.setdefault("data_files", []).append(v)
        else:
            kwargs[k] = v
    try:
        import datasets

        ds = datasets.load_dataset(path, cache_dir=sink.cfg.datasets_cache_dir, **kwargs)
        names = list(ds.column_names or [])
    except Exception as exc:  # noqa: BLE001 - load_dataset raises many types
        return sink.reject("", "unreadable_dataset", f"datasets.load_dataset failed: {type(exc).__name__}: {exc}")
    if sink.cfg.text_column not in names:
        return _missing_column(sink, "", names)
    _records(sink, _dataset_rows(ds), "utf-8")
    return None


def _dataset_rows(ds: Any) -> Iterator[tuple[str, dict]]:
    """(row index, record) for every row of a Dataset, read in batches."""
    index = 0
    for batch in ds.iter(batch_size=1000):
        cols = list(batch)
        for j in range(len(batch[cols[0]]) if cols else 0):
            yield str(index), {c: batch[c][j] for c in cols}
            index += 1


READERS = {
    "txt": read_whole_file, "md": read_whole_file, "html": read_whole_file, "jsonl": read_jsonl,
    "csv": read_csv, "parquet": read_parquet, "synthetic": read_synthetic, "datasets": read_datasets,
}
