"""Corpus readers: real files in tmp_path (txt, md, html, jsonl, csv, parquet), encodings, file rejects and
size limits, the toy world, offline datasets. Expanding sources into units: test_corpus_sources.py."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.toy.world import ToyWorldConfig, generate
from storage.corpus import IngestConfig, SourceUnit, doc_id_for, expand_sources, read_unit
from storage.schemas import to_table
from support.corpus_files import CFG, one_doc, read, reasons, write

CZECH = ("P\u0159\u00edli\u0161 \u017elu\u0165ou\u010dk\u00fd k\u016f\u0148 \u00fap\u011bl \u010f\u00e1belsk\u00e9"
         " \u00f3dy")
JAPANESE = "\u65e5\u672c\u8a9e text"


# ---------------------------------------------------------------------------------------- whole files

def test_txt_and_md(tmp_path):
    doc = one_doc(write(tmp_path / "a.txt", "Plain text.\r\nSecond line.   \r\n"))
    assert doc["text"] == "Plain text.\nSecond line." and doc["title"] == "" and doc["locator"] == ""
    assert doc["source_kind"] == "txt" and doc["encoding"] == "utf-8" and doc["gold_qa"] == [] and doc["meta"] == "{}"
    assert doc["n_chars"] == len(doc["text"]) and doc["doc_id"] == doc_id_for(doc["text"])
    assert doc["source"] == str(tmp_path / "a.txt")
    md = "```bash\n# not a heading\n```\n\nIntro.\n\n## The Real Title ##\n\nBody.\n"
    assert one_doc(write(tmp_path / "b.md", md))["title"] == "The Real Title"
    assert one_doc(write(tmp_path / "c.markdown", "Setext Title\n============\n\ntext"))["title"] == "Setext Title"
    assert one_doc(write(tmp_path / "d.md", "---\ntitle: 'From Front Matter'\n---\n# H1\n"))["title"] == \
        "From Front Matter"
    assert one_doc(write(tmp_path / "e.md", "---\n\nno heading here"))["title"] == ""
    assert one_doc(write(tmp_path / "notes.weird", "unknown extension"))["source_kind"] == "txt"


def test_html_to_readable_text(tmp_path):
    html = """<!DOCTYPE html><html><head><title> The  Page </title>
    <style>p { color: red; }</style><script>var x = "<p>not text</p>";</script></head>
    <body><nav>Home</nav><h1>Heading</h1><p>First   paragraph
    spans lines &amp; has <b>bold</b> text.</p><p>Second&nbsp;paragraph.<br>New line.</p>
    <ul><li>one</li><li>two</li></ul><!-- a comment --><noscript>enable js</noscript>
    <pre>code  kept
  indented</pre><table><tr><td>a</td><td>b</td></tr></table></body></html>"""
    doc = one_doc(write(tmp_path / "page.html", html))
    assert doc["title"] == "The Page" and doc["source_kind"] == "html"
    assert doc["text"] == ("Home\n\nHeading\n\nFirst paragraph spans lines & has bold text.\n\n"
                           "Second\u00a0paragraph.\nNew line.\n\n- one\n- two\n\ncode  kept\n  indented\n\na b")
    assert "color" not in doc["text"] and "not text" not in doc["text"] and "comment" not in doc["text"]
    assert one_doc(write(tmp_path / "h1.htm", "<h1>Only  H1</h1><p>x</p>"))["title"] == "Only H1"


# ------------------------------------------------------------------------------------------- encodings

@pytest.mark.parametrize("name, data, encoding, text", [
    ("cp1252", "He said \u201chello\u201d \u2014 it\u2019s 5\u20ac for the caf\u00e9.".encode("cp1252"), "cp1252",
     "He said \u201chello\u201d \u2014 it\u2019s 5\u20ac for the caf\u00e9."),
    ("latin1", "Le caf\u00e9 est tr\u00e8s bon. O\u00f9 est la gare? \u00c7a va, na\u00efve.".encode("latin-1"),
     "cp1252", "Le caf\u00e9 est tr\u00e8s bon. O\u00f9 est la gare? \u00c7a va, na\u00efve."),
    ("latin1_tiny", "caf\u00e9".encode("latin-1"), "cp1252", "caf\u00e9"),
    ("czech", CZECH.encode("cp1250"), "cp1250", CZECH),
    ("utf16le_bom", b"\xff\xfe" + "Gr\u00fc\u00dfe aus K\u00f6ln".encode("utf-16-le"), "utf-16-le",
     "Gr\u00fc\u00dfe aus K\u00f6ln"),
    ("utf16be_bom", b"\xfe\xff" + JAPANESE.encode("utf-16-be"), "utf-16-be", JAPANESE),
    ("utf16le_nobom", "plain ascii in utf-16".encode("utf-16-le"), "utf-16-le", "plain ascii in utf-16"),
    ("utf8_bom", b"\xef\xbb\xbfBOM then text", "utf-8-sig", "BOM then text"),
    ("utf8", "na\u00efve \u2603".encode("utf-8"), "utf-8", "na\u00efve \u2603"),
])
def test_encodings_are_detected(tmp_path, name, data, encoding, text):
    doc = one_doc(write(tmp_path / f"{name}.txt", data))
    assert (doc["encoding"], doc["text"]) == (encoding, text)


def test_html_meta_charset_is_used(tmp_path):
    html = '<html><head><meta charset="windows-1252"><title>T\u00eete</title></head><p>\u201cQuoted\u201d</p></html>'
    doc = one_doc(write(tmp_path / "p.html", html.encode("cp1252")))
    assert (doc["encoding"], doc["title"], doc["text"]) == ("cp1252", "T\u00eete", "\u201cQuoted\u201d")


# ----------------------------------------------------------------------------------------- file rejects

def test_whole_file_rejects(tmp_path):
    rng = random.Random(0)
    cases = {
        "empty.txt": (b"", "empty"),
        "blank.md": (b"  \n\r\n\t \n", "empty"),
        "script_only.html": (b"<script>alert(1)</script><style>p{}</style>", "empty"),
        "image.txt": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary"),
        "nul.txt": (b"text\x00with\x00nul \x01\x02 bytes and more", "binary"),
        "controls.txt": (bytes(rng.randrange(1, 32) for _ in range(200)), "binary"),
        "noise.txt": (bytes(rng.randrange(0x80, 0x100) for _ in range(400)), "undecodable"),
        "bad_bom.txt": (b"\xef\xbb\xbf\xff\xfe\xfd not utf-8 after a utf-8 BOM", "undecodable"),
    }
    for name, (data, reason) in cases.items():
        docs, rejects, stats = read(write(tmp_path / name, data))
        assert docs == [] and reasons(rejects) == [reason], (name, rejects)
        rej = rejects[0]
        assert rej["stage"] == "ingest" and rej["source"] == str(tmp_path / name) and rej["item"] == ""
        assert len(rej["detail"]) > 20 and stats["rejects"] == 1 and stats["docs"] == 0


def test_size_limits(tmp_path):
    big = write(tmp_path / "big.txt", "x" * 200)
    docs, rejects, stats = read(big, IngestConfig(max_bytes=100))
    assert docs == [] and reasons(rejects) == ["too_large"] and "200 bytes" in rejects[0]["detail"]
    assert stats["bytes"] == 200
    docs, rejects, _ = read(big, IngestConfig(max_chars=150))
    assert docs == [] and reasons(rejects) == ["too_large"] and "max_chars=150" in rejects[0]["detail"]
    docs, rejects, _ = read(write(tmp_path / "short.txt", "tiny"), IngestConfig(min_chars=10))
    assert docs == [] and reasons(rejects) == ["too_short"]
    docs, rejects, _ = read(write(tmp_path / "rows.jsonl", '{"text": "ok"}\n{"text": "way too long"}\n'),
                            IngestConfig(max_chars=5))
    assert [d["text"] for d in docs] == ["ok"] and [(r["item"], r["reason"]) for r in rejects] == [("2", "too_large")]


def test_read_unit_never_raises(tmp_path):
    gone = SourceUnit(str(tmp_path / "gone.txt"), "txt", "0" * 64)
    assert reasons(read_unit(gone, CFG)[1]) == ["not_found"]
    assert reasons(read_unit(SourceUnit("x", "pdf", "0"), CFG)[1]) == ["bad_spec"]
    folder = SourceUnit(str(tmp_path), "txt", "0")  # a folder where a file was expected
    assert reasons(read_unit(folder, CFG)[1]) == ["unreadable_file"]
    broken = SourceUnit("synthetic://facts?n=2&entities=999", "synthetic", "0")
    assert reasons(read_unit(broken, CFG)[1]) == ["read_error"]


# ------------------------------------------------------------------------------------------------ jsonl

def test_jsonl_rows_columns_and_bad_lines(tmp_path):
    lines = [
        json.dumps({"text": "First doc.", "title": "One", "q": "What is first?", "a": "First doc", "url": "u1"}),
        "",
        "{not json",
        json.dumps({"text": "Second doc.", "q": ["Q1?", "Q2?"], "a": ["A1", "A2"], "score": 0.5, "tags": [1]}),
        json.dumps([1, 2]),
        json.dumps({"body": "no text column"}),
        json.dumps({"text": None}),
        json.dumps({"text": 42}),
        json.dumps("a bare string is a document"),
        json.dumps({"text": "line\u2028separator inside a string"}),
    ]
    cfg = IngestConfig(title_column="title", question_column="q", answer_column="a")
    docs, rejects, stats = read(write(tmp_path / "d.jsonl", "\n".join(lines) + "\n"), cfg)
    assert [d["locator"] for d in docs] == ["1", "4", "9", "10"]
    assert docs[0]["title"] == "One" and docs[0]["gold_qa"] == [{"question": "What is first?", "answer": "First doc"}]
    assert json.loads(docs[0]["meta"]) == {"url": "u1"}
    assert docs[1]["gold_qa"] == [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    assert json.loads(docs[1]["meta"]) == {"score": 0.5} and docs[1]["title"] == ""
    assert docs[2]["text"] == "a bare string is a document" and docs[3]["text"] == "line\nseparator inside a string"
    assert [(r["item"], r["reason"]) for r in rejects] == [
        ("3", "malformed_jsonl"), ("5", "malformed_jsonl"), ("7", "empty"), ("8", "not_text"), ("6", "missing_column")]
    assert "Line 3 is not valid JSON" in rejects[0]["detail"] and "'body'" in rejects[4]["detail"]
    assert stats["docs"] == 4 and stats["rejects"] == 5 and all(d["source_kind"] == "jsonl" for d in docs)


def test_jsonl_wrong_text_column_is_one_reject(tmp_path):
    path = write(tmp_path / "d.jsonl", "".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(50)))
    docs, rejects, _ = read(path)
    assert docs == [] and [(r["item"], r["reason"]) for r in rejects] == [("", "missing_column")]
    docs, rejects, _ = read(path, IngestConfig(text_column="body"))
    assert len(docs) == 50 and rejects == []


def test_duplicates_within_a_unit_are_dropped_and_counted(tmp_path):
    rows = [{"text": "Same text.", "q": "Q1?", "a": "A1"}, {"text": "Other."}, {"text": "Same text.  \n", "q": "Q2?",
            "a": "A2"}, {"text": "Same text.", "q": "Q1?", "a": "A1"}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    docs, rejects, stats = read(path, IngestConfig(question_column="q", answer_column="a"))
    assert [d["locator"] for d in docs] == ["1", "2"] and rejects == []
    assert stats["duplicates"] == 2 and stats["docs"] == 2 and stats["items"] == 4
    assert docs[0]["gold_qa"] == [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]


# -------------------------------------------------------------------------------------------------- csv

def test_csv_rows_encoding_and_missing_column(tmp_path):
    csv_text = ('title,text,q,a\r\nOne,"Multi-line\r\ncaf\u00e9 \u201ctext\u201d",Where?,Here\r\n'
                'Two,,,\r\nThree,third,,\r\n')
    cfg = IngestConfig(title_column="title", question_column="q", answer_column="a")
    docs, rejects, _ = read(write(tmp_path / "t.csv", csv_text.encode("cp1252")), cfg)
    assert [(d["locator"], d["title"], d["text"]) for d in docs] == [
        ("0", "One", "Multi-line\ncaf\u00e9 \u201ctext\u201d"), ("2", "Three", "third")]
    assert docs[0]["encoding"] == "cp1252" and docs[0]["gold_qa"] == [{"question": "Where?", "answer": "Here"}]
    assert docs[1]["gold_qa"] == [] and [(r["item"], r["reason"]) for r in rejects] == [("1", "empty")]
    docs, rejects, _ = read(write(tmp_path / "u.csv", "body,x\nhello,1\n"))
    assert docs == [] and reasons(rejects) == ["missing_column"] and "'body'" in rejects[0]["detail"]
    docs, rejects, _ = read(write(tmp_path / "e.csv", ""))
    assert docs == [] and reasons(rejects) == ["empty"]


def test_csv_long_fields(tmp_path):
    long_text = "word " * 40_000  # 200k characters: over the csv module's default field limit
    docs, rejects, _ = read(write(tmp_path / "long.csv", f'text\n"{long_text}"\n'))
    assert rejects == [] and docs[0]["n_chars"] == len(long_text.strip())


# ---------------------------------------------------------------------------------------------- parquet

def test_parquet_rows(tmp_path):
    table = pa.table({
        "text": ["Alpha doc.", "", None, "Beta doc.", "Alpha doc."],
        "question": [["Q?"], [], None, ["B1?", "B2?"], None],
        "answer": [["A"], [], None, ["x", "y"], None],
        "n": [1, 2, 3, 4, 5],
    })
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=2)
    docs, rejects, stats = read(path, IngestConfig(question_column="question", answer_column="answer"))
    assert [(d["locator"], d["text"]) for d in docs] == [("0", "Alpha doc."), ("3", "Beta doc.")]
    assert docs[0]["gold_qa"] == [{"question": "Q?", "answer": "A"}] and json.loads(docs[1]["meta"]) == {"n": 4}
    assert docs[1]["gold_qa"] == [{"question": "B1?", "answer": "x"}, {"question": "B2?", "answer": "y"}]
    assert [(r["item"], r["reason"]) for r in rejects] == [("1", "empty"), ("2", "empty")]
    assert stats["duplicates"] == 1 and docs[0]["encoding"] == "utf-8" and docs[0]["source_kind"] == "parquet"


def test_parquet_binary_text_column_is_decoded(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"plain", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("cp1252"),
                                               b"\x89PNG\r\n\x1a\nxx"], pa.binary())}), path)
    docs, rejects, _ = read(path)
    assert [(d["text"], d["encoding"]) for d in docs] == [("plain", "utf-8"),
                                                         ("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e", "cp1252")]
    assert [(r["item"], r["reason"]) for r in rejects] == [("2", "binary")]


def test_parquet_corrupt_and_missing_column(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"body": ["x"]}), good)
    docs, rejects, _ = read(good)
    assert docs == [] and reasons(rejects) == ["missing_column"]
    data = good.read_bytes()
    for name, bad in [("garbage.parquet", b"this is not parquet at all"),
                      ("truncated.parquet", data[: len(data) // 2]),
                      ("scrambled.parquet", data[:4] + bytes(len(data) - 8) + data[-4:])]:
        docs, rejects, _ = read(write(tmp_path / name, bad))
        assert docs == [] and reasons(rejects) == ["unreadable_parquet"], name


# -------------------------------------------------------------------------------------------- synthetic

def test_synthetic_documents_carry_gold_qa():
    units, _ = expand_sources(["synthetic://facts?n=6&seed=5&entities=3&relations=2&pool=16"], CFG)
    docs, rejects, stats = read_unit(units[0], CFG)
    expected = generate(6, seed=5, cfg=ToyWorldConfig(pool=16, entities_per_doc=3, relations_per_entity=2))
    assert rejects == [] and stats["docs"] == 6
    assert [d["text"] for d in docs] == [e.text for e in expected]
    assert [d["gold_qa"] for d in docs] == [e.qa for e in expected]
    assert [d["locator"] for d in docs] == [str(i) for i in range(6)]
    assert json.loads(docs[0]["meta"])["facts"] == [list(f) for f in expected[0].facts]
    assert all(d["source_kind"] == "synthetic" and d["source"] == units[0].source for d in docs)


# ---------------------------------------------------------------------------------- determinism / schema

def test_deterministic_and_schema_conformant(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "one"}\nbroken\n{"text": "two", "extra": "e"}\n')
    write(tmp_path / "b.html", "<title>B</title><p>bee</p>")
    write(tmp_path / "c.txt", b"\x00\x01binary")
    specs = [str(tmp_path), "synthetic://facts?n=3&seed=1", str(tmp_path / "missing")]
    first = expand_sources(specs, CFG)
    assert expand_sources(specs, CFG) == first
    for unit in first[0]:
        docs, rejects, stats = read_unit(unit, CFG)
        assert read_unit(unit, CFG) == (docs, rejects, stats)
        assert to_table("documents", docs).num_rows == len(docs)
        assert to_table("rejects", rejects).num_rows == len(rejects)
        json.dumps(stats)
    assert to_table("rejects", first[1]).num_rows == 1


# --------------------------------------------------------------------------------------------- datasets

def test_datasets_offline_local_files(tmp_path, monkeypatch):
    rows = [{"context": "Paris is in France.", "question": "Where is Paris?",
             "answers": {"text": ["France"], "answer_start": [12]}},
            {"context": "Paris is in France.", "question": "What is in France?",
             "answers": {"text": ["Paris"], "answer_start": [0]}},
            {"context": "", "question": "none", "answers": {"text": [], "answer_start": []}},
            {"context": "Rome is in Italy.", "question": "Where is Rome?",
             "answers": {"text": ["Italy"], "answer_start": [11]}}]
    write(tmp_path / "data" / "train.jsonl", "\n".join(json.dumps(r) for r in rows))
    monkeypatch.chdir(tmp_path)
    cfg = IngestConfig(text_column="context", question_column="question", answer_column="answers",
                       datasets_cache_dir=str(tmp_path / "hf-cache"))
    units, rejects = expand_sources(["datasets://json?data_files=data/train.jsonl"], cfg)
    assert rejects == [] and units[0].kind == "datasets"
    assert units[0].source == f"datasets://json?data_files={tmp_path}/data/train.jsonl&split=train"
    docs, rejects, stats = read_unit(units[0], cfg)
    assert [(d["locator"], d["text"]) for d in docs] == [("0", "Paris is in France."), ("3", "Rome is in Italy.")]
    assert docs[0]["gold_qa"] == [{"question": "Where is Paris?", "answer": "France"},
                                  {"question": "What is in France?", "answer": "Paris"}]
    assert stats["duplicates"] == 1 and [(r["item"], r["reason"]) for r in rejects] == [("2", "empty")]
    assert to_table("documents", docs).num_rows == 2
    # the fingerprint follows the local file bytes
    write(tmp_path / "data" / "train.jsonl", json.dumps(rows[0]))
    assert expand_sources(["datasets://json?data_files=data/train.jsonl"], cfg)[0][0].fingerprint != \
        units[0].fingerprint
    # a column that is not there, and a builder that cannot load
    docs, rejects, _ = read_unit(units[0], IngestConfig(datasets_cache_dir=cfg.datasets_cache_dir))
    assert docs == [] and reasons(rejects) == ["missing_column"]
    bad, _ = expand_sources([f"datasets://{tmp_path / 'data'}?split=nosuchsplit"], cfg)
    docs, rejects, _ = read_unit(bad[0], cfg)
    assert docs == [] and reasons(rejects) == ["unreadable_dataset"]
