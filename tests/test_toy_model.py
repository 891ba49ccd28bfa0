"""The `toy` built-in base model: tokenizer, chat template, training, saved folder, exact match."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from model.toy.model import REPORT_FILE, ToyTrainConfig, is_complete
from model.toy.build import build_toy_model, build_toy_model_folder, evaluate_toy_model, register
from model.text.turns import teacher_prompt
from model.toy.tokenizer import ASSISTANT, BLANK_LINE, build_toy_tokenizer
from model.toy.world import RELATIONS, ToyWorldConfig, entity_names, generate, vocabulary

# Small enough to train in ~10 s on one core: 8 entity names, 2 entities x 2 relations a document, d=64.
SMOKE_WORLD = ToyWorldConfig(pool=8, entities_per_doc=2)
SMOKE = ToyTrainConfig(
    world=SMOKE_WORLD,
    hidden_size=64,
    intermediate_size=128,
    steps=150,
    warmup_steps=20,
    lr=2e-3,
    eval_docs=50,
    threads=1,
    progress=False,
)


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "toy-smoke"
    report = build_toy_model(out, SMOKE)
    return out, report


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    build_toy_tokenizer(out, ToyWorldConfig())
    return AutoTokenizer.from_pretrained(str(out))


# --- tokenizer and prompt format ---------------------------------------------------------------------------


def test_toy_prompt_format():
    assert teacher_prompt("the color of zorb is teal .", "what is the color of zorb ?") == (
        "the color of zorb is teal .\n\nwhat is the color of zorb ?"
    )
    assert teacher_prompt(None, " what is the color of zorb ? ") == "what is the color of zorb ?"
    assert teacher_prompt("", "q ?") == "q ?"


def test_every_world_word_is_one_token(tokenizer):
    for word in vocabulary(ToyWorldConfig()):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, word
    for name in entity_names(32):
        assert len(tokenizer.tokenize(f"the color of {name} is teal .")) == 7


def test_round_trip_and_unknown_words(tokenizer):
    doc = generate(3, seed=5)[1]
    for text in [doc.text, doc.qa[0]["question"], " ".join(RELATIONS["food"])]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # punctuation is split off and the text is lower-cased; unknown words map to <unk>
    ids = tokenizer("The color of Zorb.", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["the", "color", "of", "<unk>", "."]
    prompt = teacher_prompt(doc.text, doc.qa[0]["question"])
    tokens = tokenizer.tokenize(prompt)
    assert tokens.count(BLANK_LINE) == 1 and tokens[-1] == "?"


def test_chat_template(tokenizer):
    msgs = [{"role": "user", "content": teacher_prompt("the color of zorb is teal .", "what is the color of zorb ?")}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith(tokenizer.bos_token) and text.endswith(ASSISTANT)
    enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)
    ids = enc["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.convert_tokens_to_ids(ASSISTANT)
    # tokenizing the rendered text gives the same ids (the tokenizer adds no special tokens itself)
    assert tokenizer(text)["input_ids"] == ids
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "teal"}], tokenize=False)
    assert full == text + " teal " + tokenizer.eos_token
    no_prompt = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert not no_prompt.endswith(ASSISTANT)
    system = tokenizer.apply_chat_template([{"role": "system", "content": "be brief ."}] + msgs, tokenize=False)
    assert "<|system|>" in system
    with pytest.raises(Exception):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_shared_relations_documents_and_the_benchmark_mix_flag(tmp_path):
    """shared_relations: every entity of a document has the same relations (so the relation alone never picks
    the answer); off, relations differ between entities; the benchmark's --train-mix 4x1s asks for it, and a
    toy model folder's fingerprint is unchanged by the option left off."""
    from model.toy.bench import parse_args

    shared = generate(50, seed=3, cfg=ToyWorldConfig(entities_per_doc=4, relations_per_entity=1, shared_relations=True))
    for doc in shared:
        assert len({r for _, r, _ in doc.facts}) == 1 and len({e for e, _, _ in doc.facts}) == 4
    plain = generate(50, seed=3, cfg=ToyWorldConfig(entities_per_doc=4, relations_per_entity=1))
    assert any(len({r for _, r, _ in doc.facts}) > 1 for doc in plain)
    _, prof = parse_args(["--train-mix", "4x1s", "2x2"])
    assert prof.train_mix == ((4, 1, 1), (2, 2))
    assert parse_args(["--train-mix", "none"])[1].train_mix == ()
    assert "shared_relations" not in ToyTrainConfig().to_dict()["world"]


# --- smoke training ----------------------------------------------------------------------------------------


def test_smoke_folder_loads_with_auto_classes(smoke_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = smoke_model
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert type(model).__name__ == "Lfm2ForCausalLM" == report["architecture"]
    assert model.config.vocab_size == len(tok)
    assert model.config.layer_types == ["conv", "full_attention"]
    msgs = [{"role": "user", "content": "what is the color of zorb ?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out_ids = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out_ids.shape[1] > enc["input_ids"].shape[1]
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["eval"] == report["eval"] and saved["config"]["world"]["pool"] == 8
    assert is_complete(out) and is_complete(out, SMOKE) and not is_complete(out, ToyTrainConfig())


def test_smoke_training_learns_from_the_document(smoke_model):
    _, report = smoke_model
    assert report["final_loss"] < 0.5 * report["first_loss"]
    em_doc = report["eval"]["exact_match_with_doc"]
    em_nodoc = report["eval"]["exact_match_without_doc"]
    assert em_doc >= em_nodoc + 0.3, report["eval"]
    assert em_nodoc <= 0.3, report["eval"]


def test_evaluate_from_disk_matches_report(smoke_model):
    out, report = smoke_model
    em = evaluate_toy_model(out, SMOKE.eval_docs, seed=SMOKE.eval_seed, with_doc=True)
    assert em == pytest.approx(report["eval"]["exact_match_with_doc"], abs=1e-4)


def test_build_is_deterministic_in_its_weights(tmp_path):
    from model.toy.model import make_model

    tok = build_toy_tokenizer(None, SMOKE_WORLD)
    a, b = make_model(SMOKE, tok), make_model(SMOKE, tok)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_existing_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "toy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_toy_model(out, SMOKE)
    assert (out / "keep.txt").read_text() == "x"


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import model.toy.build as tm

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(tm, "train_toy_model", boom)
    with pytest.raises(RuntimeError):
        build_toy_model(tmp_path / "toy", SMOKE)
    assert list(tmp_path.iterdir()) == []


def test_register():
    registry: dict = {}
    register(registry)
    assert registry == {"toy": build_toy_model_folder}


# --- the full target ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_toy_model_reaches_target(tmp_path):
    out = tmp_path / "toy"
    build_toy_model_folder(out)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["eval"]["exact_match_with_doc"] >= 0.95, report["eval"]
    assert report["eval"]["exact_match_without_doc"] <= 0.2, report["eval"]
    # a second call finds the finished folder and does nothing
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    build_toy_model_folder(out)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    # held-out documents of another seed, through the saved folder
    assert evaluate_toy_model(out, 50, seed=99, with_doc=True) >= 0.95
    assert evaluate_toy_model(out, 50, seed=99, with_doc=False) <= 0.25
