"""Token-aware chunking, chat affixes and tokenizer fingerprints, with a tiny BPE and SmolLM2's tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from model.toy import world as toy_world
from model.text.chunking import (
    ChunkConfig,
    chat_affixes,
    chunk_document,
    make_chunk_id,
    plan_windows,
    tokenizer_fingerprint,
    wrap_as_user_turn,
)
from benchmarks.tiny_tokenizer import build_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _corpus() -> list[str]:
    docs = [d.text for d in toy_world.generate(60, seed=7)]
    return docs + ["Plain English prose, with punctuation; numbers 12345 and a few more words."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_bpe_tokenizer(_corpus(), tmp_path_factory.mktemp("tiny") / "tok", vocab_size=512)


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def smol_tok(request):
    """SmolLM2's tokenizer, without converting the model: from a converted folder in $D2L_MODEL_CACHE if
    there is one, else read from the packaged GGUF (~5 s) and kept in pytest's cache for later runs (~1 s)."""
    import transformers
    from transformers import AutoTokenizer

    from model import base_models as bm

    env = os.environ.get("D2L_MODEL_CACHE")
    if env and bm.read_marker(Path(env) / bm.SMOLLM2_NAME):
        return bm.load_tokenizer(Path(env) / bm.SMOLLM2_NAME)
    gguf = bm.smollm2_gguf_path()
    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    stat = gguf.stat()
    folder = Path(cache.mkdir("doc2lora-smollm2-tokenizer")) / f"{stat.st_size}-{stat.st_mtime_ns}-{transformers.__version__}"
    if not (folder / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        os.replace(tmp, folder) if not folder.exists() else None
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(params=["tiny", "smollm2"])
def tok(request):
    return request.getfixturevalue("tiny_tok" if request.param == "tiny" else "smol_tok")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _check_rows(rows: list[dict], text: str, tokenizer, cfg: ChunkConfig, exact_spans: bool = True) -> None:
    """The chunking contract."""
    doc_ids = _ids(tokenizer, text)
    prefix, suffix = chat_affixes(tokenizer)
    n_affix = len(prefix) + len(suffix)
    assert rows, "no chunks"
    assert [r["chunk_index"] for r in rows] == list(range(len(rows)))
    assert {r["n_chunks"] for r in rows} == {len(rows)}
    assert len({r["chunk_id"] for r in rows}) == len(rows)
    assert rows[0]["token_start"] == 0 and rows[-1]["token_end"] == len(doc_ids)
    assert rows[0]["char_start"] == 0 and rows[-1]["char_end"] == len(text)
    for a, b in zip(rows, rows[1:]):
        if cfg.overlap_tokens == 0:  # an exact partition of tokens and characters
            assert b["token_start"] == a["token_end"]
            assert b["char_start"] == a["char_end"]
        else:  # contiguous, overlapping
            assert a["token_start"] < b["token_start"] <= a["token_end"]
            assert a["char_start"] < b["char_start"] <= a["char_end"]
    if cfg.overlap_tokens == 0:
        assert "".join(r["text"] for r in rows) == text
    for r in rows:
        assert r["text"] == text[r["char_start"] : r["char_end"]]
        assert r["n_tokens"] == r["token_end"] - r["token_start"] > 0
        assert r["n_prompt_tokens"] <= cfg.max_tokens
        assert r["n_prompt_tokens"] == len(wrap_as_user_turn(tokenizer, r["text"]))
        if exact_spans:  # the chunk text re-tokenises to exactly its span of the whole document
            assert _ids(tokenizer, r["text"]) == doc_ids[r["token_start"] : r["token_end"]]
            assert r["n_prompt_tokens"] == r["n_tokens"] + n_affix


# --------------------------------------------------------------------------------------------------------
# tiny tokenizer


def test_tiny_tokenizer_specials_and_chat_template(tiny_tok, tiny_dir):
    assert (tiny_dir / "tokenizer.json").is_file() and (tiny_dir / "chat_template.jinja").is_file()
    assert tiny_tok.is_fast
    assert (tiny_tok.pad_token, tiny_tok.bos_token, tiny_tok.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert (tiny_tok.pad_token_id, tiny_tok.bos_token_id, tiny_tok.eos_token_id) == (0, 1, 2)
    assert len(tiny_tok) <= 512
    chat = [{"role": "user", "content": "what is the color of zorb ?"}, {"role": "assistant", "content": "teal"}]
    text = tiny_tok.apply_chat_template(chat, tokenize=False)
    assert text == "<|bos|><|user|>what is the color of zorb ?<|eos|><|assistant|>teal<|eos|>"
    prompt = tiny_tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|eos|><|assistant|>")
    ids = tiny_tok.apply_chat_template(chat[:1], add_generation_prompt=True)["input_ids"]
    assert ids[0] == tiny_tok.bos_token_id and ids[-1] == tiny_tok.convert_tokens_to_ids("<|assistant|>")
    # byte-level: anything encodes and decodes losslessly
    odd = "Ünïcödé ✓ 😀 中文 tabs\tand\nnewlines"
    assert tiny_tok.decode(tiny_tok(odd, add_special_tokens=False)["input_ids"]) == odd


def test_tiny_tokenizer_training_is_deterministic(tmp_path, tiny_tok):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(build_bpe_tokenizer(_corpus(), tmp_path / "again", vocab_size=512)))
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tiny_tok)


# --------------------------------------------------------------------------------------------------------
# affixes and wrapping


def test_affixes_match_the_chat_template(tok):
    prefix, suffix = chat_affixes(tok)
    assert prefix and suffix
    doc = "the color of zorb is teal . the food of mek is figs ."
    wrapped = wrap_as_user_turn(tok, doc)
    assert wrapped == prefix + _ids(tok, doc) + suffix
    assert wrapped == list(tok.apply_chat_template([{"role": "user", "content": doc}], add_generation_prompt=True)["input_ids"])
    # without the generation prompt the suffix is shorter
    p2, s2 = chat_affixes(tok, add_generation_prompt=False)
    assert p2 == prefix and len(s2) < len(suffix)


def test_special_token_strings_in_a_document_stay_text(tok):
    doc = f"a document quoting {tok.eos_token} and {tok.bos_token} literally"
    prefix, suffix = chat_affixes(tok)
    body = wrap_as_user_turn(tok, doc)[len(prefix) : -len(suffix)]
    assert tok.eos_token_id not in body and tok.bos_token_id not in body
    rows = chunk_document("d", doc, tok, ChunkConfig(max_tokens=1000))
    assert len(rows) == 1 and rows[0]["text"] == doc
    # and the per-call option did not stick: specials still parse in affixes
    assert tok.eos_token_id in tok(tok.eos_token, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------------
# chunking


def test_short_document_is_one_chunk(tok):
    doc = toy_world.generate(1, seed=1)[0].text
    cfg = ChunkConfig(max_tokens=512)
    rows = chunk_document("doc-1", doc, tok, cfg)
    assert len(rows) == 1
    (row,) = rows
    assert row["text"] == doc and row["n_chunks"] == 1 and row["doc_id"] == "doc-1"
    assert row["tokenizer"] == tokenizer_fingerprint(tok)
    assert row["chunk_id"] == make_chunk_id("doc-1", 0, row["tokenizer"], cfg)
    _check_rows(rows, doc, tok, cfg)


@pytest.mark.parametrize("max_tokens", [48, 64, 100, 257])
def test_long_document_equal_chunks(tok, max_tokens):
    doc = " ".join(d.text for d in toy_world.generate(12, seed=3))
    cfg = ChunkConfig(max_tokens=max_tokens)
    prefix, suffix = chat_affixes(tok)
    budget = max_tokens - len(prefix) - len(suffix)
    n_tokens = len(_ids(tok, doc))
    rows = chunk_document("doc-long", doc, tok, cfg)
    assert len(rows) == math.ceil(n_tokens / budget) > 1
    sizes = [r["n_tokens"] for r in rows]
    assert max(sizes) - min(sizes) <= 1  # split as evenly as possible (ASCII text: every cut is clean)
    _check_rows(rows, doc, tok, cfg)


def test_overlap(tok):
    doc = " ".join(d.text for d in toy_world.generate(12, seed=4))
    prefix, suffix = chat_affixes(tok)
    cfg = ChunkConfig(max_tokens=len(prefix) + len(suffix) + 40, overlap_tokens=8)
    n_tokens = len(_ids(tok, doc))
    rows = chunk_document("doc-ov", doc, tok, cfg)
    assert len(rows) == math.ceil((n_tokens - 8) / (40 - 8))
    for a, b in zip(rows, rows[1:]):
        assert a["token_end"] - b["token_start"] == 8
    _check_rows(rows, doc, tok, cfg)
    no_overlap = chunk_document("doc-ov", doc, tok, ChunkConfig(max_tokens=cfg.max_tokens))
    assert rows[0]["chunk_id"] != no_overlap[0]["chunk_id"]  # overlap is part of the chunk's identity


def test_unicode_documents_cut_on_character_boundaries(tok):
    rng = random.Random(0)
    pieces = ["😀", "中文字符", "émoji", "naïve", "\n\n", "  ", "the color of zorb is teal .", "✓", "𝔘𝔫𝔦"]
    doc = "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(400))
    prefix, suffix = chat_affixes(tok)
    for body in (6, 9, 31):
        cfg = ChunkConfig(max_tokens=len(prefix) + len(suffix) + body)
        rows = chunk_document("doc-u", doc, tok, cfg)
        _check_rows(rows, doc, tok, cfg, exact_spans=False)
        assert all("\ufffd" not in tok.decode(_ids(tok, r["text"])) for r in rows)


def test_random_documents_tiny(tiny_tok):
    """Property check over random texts, budgets and overlaps."""
    rng = random.Random(42)
    words = toy_world.vocabulary() + ["Zorb's", "ÆØÅ", "😀", "\n", "x" * 30, "1234567"]
    prefix, suffix = chat_affixes(tiny_tok)
    n_affix = len(prefix) + len(suffix)
    for case in range(60):
        doc = " ".join(rng.choice(words) for _ in range(rng.randint(1, 300)))
        body = rng.randint(4, 80)  # a character takes up to 4 byte-level tokens
        cfg = ChunkConfig(max_tokens=n_affix + body, overlap_tokens=rng.choice([0, 0, min(3, body - 1)]))
        rows = chunk_document(f"doc-{case}", doc, tiny_tok, cfg)
        _check_rows(rows, doc, tiny_tok, cfg, exact_spans=False)


def test_chunking_is_deterministic_and_ids_depend_on_config(tok):
    doc = " ".join(d.text for d in toy_world.generate(6, seed=5))
    cfg = ChunkConfig(max_tokens=80)
    a = chunk_document("doc-d", doc, tok, cfg)
    b = chunk_document("doc-d", doc, tok, cfg)
    assert a == b
    c = chunk_document("doc-d", doc, tok, ChunkConfig(max_tokens=81))
    assert a[0]["chunk_id"] != c[0]["chunk_id"]
    d = chunk_document("doc-other", doc, tok, cfg)
    assert a[0]["chunk_id"] != d[0]["chunk_id"]
    assert all(len(r["chunk_id"]) == 32 for r in a)


def test_rows_fit_the_chunks_schema(tiny_tok):
    from storage import schemas

    doc = " ".join(d.text for d in toy_world.generate(4, seed=6))
    rows = chunk_document("doc-s", doc, tiny_tok, ChunkConfig(max_tokens=40))
    table = schemas.to_table("chunks", rows)
    assert table.num_rows == len(rows) and table.schema == schemas.CHUNKS


def test_errors(tok):
    prefix, suffix = chat_affixes(tok)
    n_affix = len(prefix) + len(suffix)
    with pytest.raises(ValueError, match="affixes"):
        chunk_document("d", "some text", tok, ChunkConfig(max_tokens=n_affix))
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk_document("d", "some text", tok, ChunkConfig(max_tokens=n_affix + 4, overlap_tokens=4))
    if tok.convert_ids_to_tokens(_ids(tok, "😀")) and len(_ids(tok, "😀")) > 1:  # bytes of one character
        with pytest.raises(ValueError, match="larger max_tokens"):
            chunk_document("d", "😀" * 5, tok, ChunkConfig(max_tokens=n_affix + 1))
    with pytest.raises(ValueError, match="no tokens"):
        chunk_document("d", "", tok, ChunkConfig())
    with pytest.raises(ValueError):
        ChunkConfig(max_tokens=0)
    with pytest.raises(ValueError):
        ChunkConfig(overlap_tokens=-1)


def test_plan_windows():
    assert plan_windows(10, 10) == [(0, 10)]
    assert plan_windows(11, 10) == [(0, 6), (6, 11)]
    assert plan_windows(30, 10) == [(0, 10), (10, 20), (20, 30)]
    assert plan_windows(31, 10) == [(0, 8), (8, 16), (16, 24), (24, 31)]
    windows = plan_windows(100, 20, overlap=5)
    assert all(e - s <= 20 for s, e in windows)
    assert all(a[1] - b[0] == 5 for a, b in zip(windows, windows[1:]))
    assert windows[0][0] == 0 and windows[-1][1] == 100


# --------------------------------------------------------------------------------------------------------
# fingerprints


def test_fingerprint_is_content_based(tok, tiny_tok, smol_tok, tiny_dir):
    from transformers import AutoTokenizer

    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 16 and set(fp) <= set("0123456789abcdef")
    assert tokenizer_fingerprint(tok) == fp
    assert tokenizer_fingerprint(tiny_tok) != tokenizer_fingerprint(smol_tok)
    # a fresh load of the same files gives the same fingerprint
    fresh = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert tokenizer_fingerprint(fresh) == tokenizer_fingerprint(tiny_tok)
    # runtime settings do not count; the chat template does
    fresh.padding_side = "left"
    assert tokenizer_fingerprint(fresh) == tokenizer_fingerprint(tiny_tok)
    fresh.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenizer_fingerprint(fresh) != tokenizer_fingerprint(tiny_tok)


def test_fingerprint_is_stable_across_processes(tiny_dir, tiny_tok):
    code = (
        "import sys; from transformers import AutoTokenizer; from model.text.chunking import tokenizer_fingerprint; "
        "print(tokenizer_fingerprint(AutoTokenizer.from_pretrained(sys.argv[1])))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_dir)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == tokenizer_fingerprint(tiny_tok)


def test_smollm2_tokenizer_fingerprint_and_affixes(smol_tok):
    """SmolLM2's default system prompt is part of the prefix; the generation prompt ends the suffix."""
    prefix, suffix = chat_affixes(smol_tok)
    assert smol_tok.decode(prefix).endswith("<|im_start|>user\n")
    assert "You are a helpful AI assistant named SmolLM" in smol_tok.decode(prefix)
    assert smol_tok.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer_fingerprint(smol_tok) == tokenizer_fingerprint(smol_tok)
