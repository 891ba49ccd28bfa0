"""Every fenced code block of README.md and docs/*.md runs, as written, in a scratch folder.

- bash blocks: each command (continuation lines joined, comments dropped) runs in a temporary working
  folder that holds a small store (`./store`, built with the toy model: questions, teacher samples, a unit
  that produced 0 samples, a 4-step hypernetwork named `mine`), a copy of `corpus/` and a `my_doc.md`.
  `d2l ...` runs in-process (CliRunner), `python ...` as a subprocess; both must exit 0.
- python blocks run as a script in that folder; sql blocks go statement by statement through `d2l sql`.
- Blocks that are not code (a folder tree, the layout, a mermaid picture) are listed as such.
- SKIP names each command that cannot run here, and why (hours of CPU, a GPU, a cluster, the network).

Nothing is written outside the temporary folder: the repository stays clean (checked at the end).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from support.env import REPO, subprocess_env
from flows.cli import app
from storage.catalog import Catalog
from storage.sql import run_query

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_CODE = {"", "text", "mermaid"}  # folder trees, the layout, a diagram
SOURCES = [f"synthetic://facts?n=2&seed={s}" for s in range(3)]

# command prefix -> why it does not run in this test
SKIP = {
    "make run": "the whole default job: SmolLM2 through every stage, ~7 min on 2 cores",
    "make test": "the test suite itself",
    "d2l train --set train.name=mine --set train.optim.total_steps=2000":
        "2,000 steps take more than a day on a CPU (README says so); the fixture trains `mine` for 4 steps",
    "d2l evaluate --config configs/default.yaml": "SmolLM2 with a 300-step CD baseline per document: tens of minutes",
    "d2l bench toy": "the full toy benchmark, ~15 min (the smoke size runs in tests/test_evaluate.py)",
    "d2l run": "SmolLM2 through every stage on the sample corpus: ~7 min (make run's job)",
    "d2l chunk --base-model /models/Qwen3-0.6B": "needs a Qwen3-0.6B folder at /models",
    "d2l models --prepare": "converts SmolLM2 into the store (the smollm2_dir fixture tests the same conversion)",
    "d2l teacher --set runner.gpus_per_model_task=1": "vLLM on 4 GPUs",
    "d2l teacher --set teacher.generator.backend=vllm": "vLLM on 4 GPUs",
    "d2l teacher --set teacher.generator.backend=openai": "a fleet of vLLM servers at gpu1/gpu2",
    "duckdb -readonly": "the DuckDB CLI is interactive (and not a dependency)",
    "prefect": "a long-running Prefect server, worker and deployments (tests/test_deployments.py runs them)",
    "export PREFECT_API_URL=http://127.0.0.1:4200/api": "points later commands at that server",
    "HF_HUB_OFFLINE=1 prefect worker": "a long-running worker",
    "PREFECT_API_URL=http://prefect-host:4200/api": "a Dask/Ray cluster and a Prefect server on other machines",
    "pip install": "network installs of optional extras",
    "dask": "a Dask cluster on several machines",
    "ray start": "a Ray cluster on several machines",
    "torchrun": "data-parallel training (tests/test_ddp.py runs torchrun with 2 ranks)",
    "accelerate launch": "8 GPUs",
    "python benchmarks/toy_world.py": "the toy benchmark (~9 min; --smoke runs in tests/test_evaluate.py)",
    "OMP_NUM_THREADS=1 python benchmarks/toy_world.py": "an ablation run of the toy benchmark (minutes)",
    "export DO_NOT_TRACK=1": "sets the telemetry environment of the commands that follow",
    "d2l serve": "a long-running server (tests/test_serve.py runs it and talks to it over real HTTP)",
    "curl": "requests to a running `d2l serve` (tests/test_serve.py sends the same requests)",
}

# python blocks that need something running, by their first line -> why they do not run here
SKIP_PYTHON = {
    "from openai import OpenAI": "a client of a running `d2l serve` (tests/test_serve.py uses the openai client)",
}


def blocks() -> list[tuple[str, str, str]]:
    """(where, language, body) of every fenced block; `where` is file:line."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            line = text[: m.start()].count("\n") + 1
            out.append((f"{path.relative_to(REPO)}:{line}", m.group(1), m.group(2)))
    return out


def bash_commands(body: str) -> list[list[str]]:
    """Commands of a bash block as argv lists: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [words for words in (shlex.split(line, comments=True) for line in joined.splitlines()) if words]


def skip_reason(argv: list[str]) -> str | None:
    cmd = " ".join(argv)
    for prefix, why in SKIP.items():
        if cmd == prefix.rstrip() or cmd.startswith(prefix.rstrip() + " "):
            return why
    return None


def sql_statements(body: str) -> list[str]:
    """The statements of a sql block, each without its leading comment lines (its label)."""
    out = []
    for stmt in re.split(r";\s*$", body, flags=re.M):
        lines = stmt.strip().splitlines()
        while lines and lines[0].lstrip().startswith("--"):
            lines.pop(0)
        if "\n".join(lines).strip():
            out.append("\n".join(lines))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, prefect_server, toy_model_dir):
    """A scratch folder with ./store (toy data, a 0-row samples shard, the hypernetwork `mine`), corpus/, my_doc.md."""
    from flows.config import load_config
    from flows.pipeline import pipeline_flow

    work = tmp_path_factory.mktemp("docs-snippets")
    shutil.copytree(REPO / "corpus", work / "corpus")
    plain = work / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("the lantern of the harbour is kept by a quiet man who sings at dusk .")
    (work / "my_doc.md").write_text("the color of zorb is teal . the size of blick is small .")
    sets = [f"store={work / 'store'}", f"base_model={toy_model_dir}", "progress=false",
            "stages=[synthesize,teacher]", "synthesize.questions_per_round=2", "synthesize.max_new_tokens=12",
            "teacher.topk=8", "teacher.max_new_tokens=6"]
    cfg = load_config(None, sets).model_copy(update={"sources": SOURCES + [str(plain)]})
    pipeline_flow(cfg)
    hyper = "{target_modules: [w2], rank: 2, latent_dim: 16, latent_count: 2, depth: 1, heads: 1}"
    res = CliRunner().invoke(app, ["train", "--store", str(work / "store"), "--base-model", str(toy_model_dir),
                                   "--no-progress", "--set", "train.name=mine", "--set", f"train.hyper={hyper}",
                                   "--set", "train.optim={total_steps: 4, warmup_steps: 1, batch_size: 2, "
                                   "eval_every: 0, checkpoint_every: 0}"])
    assert res.exit_code == 0, res.output
    return work


def run_d2l(argv: list[str], work: Path, monkeypatch) -> None:
    monkeypatch.chdir(work)
    res = CliRunner().invoke(app, argv[1:])
    assert res.exit_code == 0, f"{argv}\n{res.output}\n{res.exception!r}"


def run_python(args: list[str], work: Path) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=work, env=subprocess_env(None), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def python_skip_reason(body: str) -> str | None:
    return SKIP_PYTHON.get(body.strip().splitlines()[0].strip()) if body.strip() else None


def test_every_block_is_code_we_run_or_listed():
    langs = {lang for _, lang, _ in blocks()}
    assert langs <= NOT_CODE | {"bash", "python", "sql"}, langs
    used = set()
    used_python = {python_skip_reason(body) for _, lang, body in blocks() if lang == "python"} - {None}
    assert used_python == set(SKIP_PYTHON.values()), f"stale SKIP_PYTHON entries: {set(SKIP_PYTHON.values()) - used_python}"
    for where, lang, body in blocks():
        for argv in bash_commands(body) if lang == "bash" else []:
            why = skip_reason(argv)
            if why:
                used.add(why)
            else:
                assert argv[0] in ("d2l", "python"), f"{where}: no way to run {argv!r}: add it to SKIP"
    assert set(SKIP.values()) == used, f"stale SKIP entries: {set(SKIP.values()) - used}"


def test_zero_row_unit_is_in_the_store(workdir):
    """The store the snippets run on has a teacher unit that produced no samples (the `datasets` case)."""
    rows = run_query(Catalog(workdir / "store"), "SELECT rows FROM manifest WHERE table_name = 'samples'")[1]
    assert any(r == 0 for (r,) in rows) and any(r > 0 for (r,) in rows), rows


@pytest.mark.parametrize("where,lang,body", [b for b in blocks() if b[1] in ("bash", "python", "sql")],
                         ids=[b[0] for b in blocks() if b[1] in ("bash", "python", "sql")])
def test_snippet_runs(where, lang, body, workdir, monkeypatch):
    ran = 0
    if lang == "python":
        if python_skip_reason(body):
            pytest.skip(f"{where}: {python_skip_reason(body)}")
        run_python(["-c", body], workdir)
        ran += 1
    elif lang == "sql":
        for stmt in sql_statements(body):
            run_d2l(["d2l", "sql", stmt], workdir, monkeypatch)
            ran += 1
    else:
        for argv in bash_commands(body):
            if skip_reason(argv):
                continue
            if argv[0] == "d2l":
                run_d2l(argv, workdir, monkeypatch)
            else:
                run_python(argv[1:], workdir)
            ran += 1
    if not ran:
        pytest.skip(f"{where}: every command is in SKIP")


def test_repository_stays_clean():
    """No snippet wrote into the repository (an earlier version left result.parquet files behind)."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                            capture_output=True, text=True).stdout
    assert not [line for line in status.splitlines() if line.endswith((".parquet", ".csv"))], status


def test_internalize_chunks_at_the_trained_length_and_ask_is_quiet(workdir, monkeypatch, tmp_path):
    """`d2l internalize` with no --chunk-max-tokens chunks at the length saved with the hypernetwork and
    says so; a long text argument is the document, not a file name; `d2l ask` prints no FutureWarning."""
    import json

    saved = json.loads((workdir / "store" / "hypernets" / "mine" / "base_model.json").read_text())
    assert saved["chunk_tokens"] > 0
    text = "the color of zorb is teal . the size of blick is small . " * 150  # ~1,900 words: several chunks
    monkeypatch.chdir(workdir)
    res = CliRunner().invoke(app, ["internalize", text, "--checkpoint", "store/hypernets/mine",
                                   "--out", str(tmp_path / "long")])
    assert res.exit_code == 0, res.output
    first = res.output[res.output.index("chunking:"):].splitlines()[0]  # after the loader's bar, if any
    assert first.endswith(f"chunks of at most {saved['chunk_tokens']} tokens; the chunk length the "
                          "hypernetwork was trained on)"), res.output
    assert int(first.split()[1]) > 1, first
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "ask", "--adapter", str(tmp_path / "long"),
                           "what is the color of zorb ?", "--max-new-tokens", "4"], cwd=workdir,
                          env=subprocess_env(None), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FutureWarning" not in proc.stderr, proc.stderr[-2000:]
