"""Corpus sources: text normalisation and doc ids, expanding specs (folders, globs, synthetic://, datasets://)
into units, what is skipped and why, the ingest config's validation; special files are never opened."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from storage.corpus import IngestConfig, doc_id_for, expand_sources, normalise_text
from support.corpus_files import CFG, reasons, write


# ------------------------------------------------------------------------------------ normalise / doc_id

def test_normalise_text_rules():
    raw = "\ufeff  Cafe\u0301 au lait  \r\nline two\t\r\rthree\n\n\n\n\nfour \u2028five  \n\n"
    out = normalise_text(raw)
    assert out == "Caf\u00e9 au lait\nline two\n\nthree\n\nfour\nfive"
    assert normalise_text(out) == out  # idempotent
    assert normalise_text(" \n\t \r\n ") == ""


def test_doc_id_is_hash_of_normalised_text():
    text = "Hello world.\n\nSecond paragraph."
    assert doc_id_for(text) == hashlib.sha256(text.encode()).hexdigest()[:32]
    assert doc_id_for("Hello world.  \r\n\r\n\r\n\r\nSecond paragraph.\n") == doc_id_for(text)
    assert len(doc_id_for("x")) == 32


# --------------------------------------------------------------------------------------------- expand

def test_expand_folder_recursive_skips_hidden_and_unsupported(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a.md", "# A")
    write(tmp_path / "sub" / "deep" / "c.html", "<p>c</p>")
    write(tmp_path / "sub" / "d.jsonl", '{"text": "d"}\n')
    write(tmp_path / "sub" / "e.CSV", "text\ne\n")
    write(tmp_path / ".hidden.txt", "secret")
    write(tmp_path / ".git" / "config.txt", "nope")
    write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n")
    write(tmp_path / "notes.log", "log")
    stats: dict = {}
    units, rejects = expand_sources([str(tmp_path)], CFG, stats=stats)
    assert rejects == []
    assert [Path(u.source).relative_to(tmp_path).as_posix() for u in units] == [
        "a.md", "b.txt", "sub/d.jsonl", "sub/deep/c.html", "sub/e.CSV"]
    assert [u.kind for u in units] == ["md", "txt", "jsonl", "html", "csv"]
    assert all(os.path.isabs(u.source) for u in units)
    assert units[1].fingerprint == hashlib.sha256(b"bee").hexdigest()
    skipped = stats.pop("skipped")
    assert stats == {"units": 5, "rejects": 0, "skipped_hidden": 2, "skipped_extension": 2, "skipped_compressed": 0,
                     "dangling_link": 0, "link_loop": 0, "skipped_linked_folder": 0, "skipped_not_regular": 0}
    assert sorted((Path(r["source"]).name, r["reason"]) for r in skipped) == [
        (".git", "skipped_hidden"), (".hidden.txt", "skipped_hidden"), ("image.png", "skipped_extension"),
        ("notes.log", "skipped_extension")]


def test_every_skipped_file_is_listed_with_its_reason(tmp_path):
    write(tmp_path / "good.txt", "good")
    write(tmp_path / "packed.txt.gz", b"\x1f\x8b\x08\x00")
    write(tmp_path / "other" / "x.txt", "elsewhere")
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    os.symlink(tmp_path / "loop-b.txt", tmp_path / "loop-a.txt")
    os.symlink(tmp_path / "loop-a.txt", tmp_path / "loop-b.txt")
    os.symlink(tmp_path, tmp_path / "self")  # a folder link back to the root
    os.symlink(tmp_path / "other", tmp_path / "elsewhere")
    stats: dict = {}
    units, rejects = expand_sources([str(tmp_path)], CFG, stats=stats)
    assert rejects == [] and sorted(Path(u.source).name for u in units) == ["good.txt", "x.txt"]
    got = sorted((Path(r["source"]).name, r["reason"]) for r in stats["skipped"])
    assert got == [("dangling.txt", "dangling_link"), ("elsewhere", "skipped_linked_folder"),
                   ("loop-a.txt", "link_loop"), ("loop-b.txt", "link_loop"), ("packed.txt.gz", "skipped_compressed"),
                   ("self", "link_loop")]
    assert (stats["dangling_link"], stats["link_loop"], stats["skipped_compressed"]) == (1, 3, 1)
    assert all(r["stage"] == "ingest" and r["detail"] for r in stats["skipped"])


def test_unknown_scheme_and_missing_source_are_errors_unless_allowed(tmp_path):
    from storage.corpus import SourceNotFoundError, check_sources_found

    for spec in ("ftp://example.com/x.txt", "s3://bucket/key.txt", str(tmp_path / "nope.txt")):
        units, rejects = expand_sources([spec], CFG)
        assert units == [] and reasons(rejects) == ["unknown_scheme" if "://" in spec else "not_found"]
        with pytest.raises(SourceNotFoundError) as err:
            check_sources_found(rejects, CFG)
        line = str(err.value)
        assert "\n" not in line and spec in line and "synthetic://" in line and "datasets://" in line
        assert "--allow-missing" in line
        check_sources_found(rejects, CFG.model_copy(update={"allow_missing": True}))  # no error


def test_expand_globs_explicit_files_and_dedup(tmp_path, monkeypatch):
    write(tmp_path / "corpus" / "x.md", "x")
    write(tmp_path / "corpus" / "deep" / "y.md", "y")
    write(tmp_path / "corpus" / "z.txt", "z")
    write(tmp_path / "corpus" / "run.log", "log line")
    monkeypatch.chdir(tmp_path)
    units, rejects = expand_sources(["corpus/**/*.md"], CFG)
    assert rejects == [] and [Path(u.source).name for u in units] == ["y.md", "x.md"]
    units, _ = expand_sources(["corpus/*"], CFG)  # no literal extension: filtered like a folder
    assert sorted(Path(u.source).name for u in units) == ["x.md", "y.md", "z.txt"]
    units, _ = expand_sources(["corpus/*.log"], CFG)  # literal extension: taken as named, read as text
    assert [(Path(u.source).name, u.kind) for u in units] == [("run.log", "txt")]
    units, _ = expand_sources(["corpus/run.log", "corpus", str(tmp_path / "corpus" / "x.md")], CFG)
    assert [Path(u.source).name for u in units] == ["y.md", "run.log", "x.md", "z.txt"]  # each source once
    assert units == sorted(units, key=lambda u: u.source)


def test_expand_not_found_and_bad_specs(tmp_path):
    (tmp_path / "empty").mkdir()
    write(tmp_path / "only" / "a.log", "x")
    specs = [str(tmp_path / "missing.txt"), str(tmp_path / "nothing" / "*.md"), str(tmp_path / "empty"),
             str(tmp_path / "only"), "synthetic://facts?n=zero", "synthetic://people?n=3",
             "synthetic://facts?n=2&colour=1", "synthetic://facts?n=2&entities=99&pool=8",
             "datasets://json?data_files=" + str(tmp_path / "nope.jsonl"), "datasets://json?bogus=1"]
    units, rejects = expand_sources(specs, CFG)
    assert units == []
    assert reasons(rejects) == ["not_found"] * 4 + ["bad_spec"] * 4 + ["not_found", "bad_spec"]
    assert [r["source"] for r in rejects] == specs
    assert all(r["stage"] == "ingest" and r["item"] == "" and r["detail"].endswith(".") for r in rejects)


def test_synthetic_spec_is_canonical():
    units, rejects = expand_sources(["synthetic://facts?seed=3&n=5", "synthetic://facts?n=5&seed=3&pool=32"], CFG)
    assert rejects == [] and len(units) == 1
    unit = units[0]
    assert unit.source == "synthetic://facts?entities=4&n=5&name_seed=1234&pool=32&relations=2&seed=3"
    assert unit.kind == "synthetic" and unit.fingerprint == hashlib.sha256(unit.source.encode()).hexdigest()


def test_config_validation():
    assert IngestConfig(extensions=["TXT", ".Md"]).extensions == [".txt", ".md"]
    with pytest.raises(ValidationError):
        IngestConfig(max_bytes=0)
    with pytest.raises(ValidationError):
        IngestConfig(text_colum="typo")
    assert "datasets_cache_dir" not in IngestConfig(datasets_cache_dir="/tmp/x").model_dump()



# ------------------------------------------------------------------------------------------ special files

def test_special_files_are_not_read(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    units, rejects = expand_sources([str(fifo), str(tmp_path)], CFG)  # would block if opened
    assert units == [] and reasons(rejects) == ["unreadable_file", "not_found"]
