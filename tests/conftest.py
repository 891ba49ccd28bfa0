"""Test setup: offline, a scratch Prefect home, one Prefect server for the whole session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="d2l-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PREFECT_HOME"] = str(_SCRATCH / "prefect-home")
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server for the session; yields its API URL (subprocesses get it through the env)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer with a chat template, trained on the sample corpus and toy text."""
    from model.tiny_tokenizer import build_bpe_tokenizer
    from model.toy_world import generate

    texts = [p.read_text() for p in (REPO / "corpus" / "sample").rglob("*") if p.is_file()]
    texts += [d.text for d in generate(50, seed=7)]
    return build_bpe_tokenizer(texts, tmp_path_factory.mktemp("tiny-tok"), vocab_size=400)


def subprocess_env(api_url: str | None = None) -> dict[str, str]:
    """The environment for a `d2l` subprocess, pointed at the session's Prefect server."""
    env = dict(os.environ)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, request) -> Path:
    """The built-in SmolLM2 converted once per session (or reused from $D2L_MODEL_CACHE)."""
    import time

    from model.base_models import read_marker, resolve_base_model

    env = os.environ.get("D2L_MODEL_CACHE")
    cache = Path(env) if env else tmp_path_factory.mktemp("models")
    t0 = time.perf_counter()
    folder = resolve_base_model("smollm2-135m-instruct", cache)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    build = (read_marker(folder) or {}).get("build_seconds")
    line = (
        f"[doc2lora] smollm2-135m-instruct: resolved in {seconds:.1f} s (conversion took {build} s when built; "
        f"folder {size / 1e6:.0f} MB at {folder})"
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            reporter.write_line(line)
    else:  # pragma: no cover
        print(line)
    return folder


