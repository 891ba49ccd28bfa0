"""What a user sees when something is wrong, and the small noises of the command line.

Error paths run `d2l` as a subprocess, as a user does: one line with the real cause on stderr, a non-zero
exit, no traceback unless `--debug`."""

from __future__ import annotations

import logging
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from support.env import REPO, subprocess_env
from flows.cli import app
from flows.cli_errors import read_document
from model.bars import bars_enabled, progress_bar
from model.training.config import TrainConfig


def d2l(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = subprocess_env(None)
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_missing_base_model_folder_is_one_line(tmp_path):
    proc = d2l("run", "--store", str(tmp_path / "store"), "--base-model", str(tmp_path / "no-such-model"),
               cwd=tmp_path)
    assert proc.returncode == 2
    assert lines(proc.stderr) == [f"error: base model folder '{tmp_path / 'no-such-model'}' does not exist "
                                  "(built-in models: smollm2-135m-instruct, toy)"], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_every_source_missing_is_one_line_before_any_work(tmp_path):
    proc = d2l("run", "--store", str(tmp_path / "store"), "--source", "gone/a.md", "--source", "gone/*.txt",
               cwd=tmp_path)
    assert proc.returncode == 2
    assert lines(proc.stderr) == [f"error: none of the 2 source(s) exists: gone/a.md, gone/*.txt (cwd {tmp_path})"]
    assert not (tmp_path / "store" / "shards").exists()  # nothing ran


def test_debug_shows_the_traceback(tmp_path):
    proc = d2l("--debug", "run", "--store", str(tmp_path / "store"), "--base-model", str(tmp_path / "nope"),
               cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "does not exist" in proc.stderr


def test_failure_inside_a_flow_ends_in_one_error_line(prefect_server, tmp_path, tiny_tokenizer_dir):
    """`d2l train` on a store without teacher samples: the real cause, one line, exit 1."""
    res = CliRunner().invoke(app, ["train", "--store", str(tmp_path / "store"), "--base-model",
                                   str(tiny_tokenizer_dir), "--no-progress"])
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No teacher samples" in errors[0], res.output


def test_internalize_takes_a_long_text_argument(tmp_path):
    text = "the color of zorb is teal . " * 400  # longer than any file name may be
    assert read_document(text) == text
    doc = tmp_path / "doc.md"
    doc.write_text("from a file")
    assert read_document(str(doc)) == "from a file"
    assert read_document("no such file, just a sentence.") == "no such file, just a sentence."


def test_warmup_longer_than_the_run_is_clamped_with_a_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="model.training.config"):
        cfg = TrainConfig(total_steps=2, warmup_steps=100)
    assert cfg.warmup_steps == 2
    assert "warmup_steps=100 is more than total_steps=2" in caplog.text
    with pytest.raises(ValueError):
        TrainConfig(total_steps=2, warmup_steps=-1)


def test_sql_help_lists_every_view_and_table(tmp_path):
    from storage.catalog import Catalog
    from storage.schemas import TABLES
    from storage.sql import run_query

    cat = Catalog(tmp_path / "store")
    cat.refresh_views()
    names = {n for (n,) in run_query(cat, "SELECT table_name FROM information_schema.tables")[1]}
    names |= set(TABLES) | {"train_metrics"}  # train_metrics appears once a training ran
    res = CliRunner().invoke(app, ["sql", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    missing = [n for n in sorted(names) if n not in res.output]
    assert not missing, res.output


def test_progress_bars_only_on_a_terminal():
    assert not bars_enabled(True)  # pytest captures stderr: not a terminal
    assert progress_bar(range(3), progress=True).disable
    code = "from model.bars import bars_enabled; import sys; sys.stdout.write(str(bars_enabled(True)))"
    env = subprocess_env(None)
    env.pop("TQDM_DISABLE", None)
    master, slave = pty.openpty()
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, stderr=slave, capture_output=False,
                             stdout=subprocess.PIPE, text=True, timeout=60).stdout
    finally:
        os.close(slave)
        os.close(master)
    assert out == "True"
    piped = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert piped.stdout == "False"


def test_hugging_face_loading_bars_stay_out_of_logs(toy_model_dir):
    """Loading a model through the project (stderr piped, as in a log file or a Prefect worker) prints no
    "Loading weights" bar; on a terminal it would."""
    code = ("import model, sys; from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({str(toy_model_dir)!r})")
    env = subprocess_env(None)
    env.pop("TQDM_DISABLE", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    piped = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "Loading weights" not in piped.stderr, piped.stderr[-2000:]
    bare = subprocess.run([sys.executable, "-c", code.replace("import model, sys; ", "")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "Loading weights" in bare.stderr  # transformers alone draws it: the test can fail


def test_adapters_folder_is_git_ignored():
    proc = subprocess.run(["git", "check-ignore", "-q", "adapters/my_doc/adapter_model.safetensors"], cwd=REPO)
    assert proc.returncode == 0


def test_vllm_setup_sends_pip_output_to_a_log():
    script = (REPO / "scripts" / "vllm_cpu_setup.sh").read_text()
    pip_lines = [line.strip() for line in script.splitlines()
                 if "pip install" in line or "pip uninstall" in line]
    assert pip_lines and all(line.startswith("quiet ") for line in pip_lines), pip_lines


def test_vllm_setup_reuse_prints_two_lines(tmp_path):
    from conftest import vllm_venv

    if not (vllm_venv() / "bin" / "python").exists() or shutil.which("bash") is None:
        pytest.skip("no vLLM venv (make vllm-setup)")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "vllm_cpu_setup.sh"), str(vllm_venv())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(lines(proc.stdout)) == 1 and len(lines(proc.stderr)) <= 2, (proc.stdout, proc.stderr)
