"""The pipeline config: defaults, YAML, overrides, and clear errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from support.env import REPO
from flows.cli import app
from flows.config import PipelineConfig, load_config, parse_override


def test_defaults_yaml_and_overrides(tmp_path):
    assert PipelineConfig().base_model == "smollm2-135m-instruct"
    cfg = load_config(REPO / "configs" / "default.yaml", ["chunk.max_tokens=99", "sources=[a, b]"])
    assert cfg.chunk.max_tokens == 99 and cfg.sources == ["a", "b"]
    assert cfg.ingest.text_column == "text"


def test_override_syntax_and_unknown_keys_fail_clearly(tmp_path):
    assert parse_override("ingest.max_bytes=10") == ("ingest.max_bytes", 10)
    with pytest.raises(ValueError, match="key=value"):
        parse_override("chunk.max_tokens")
    with pytest.raises(ValidationError, match="bogus"):
        load_config(None, ["bogus=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)


def test_cli_help_teaches_and_bad_config_exits_2():
    runner = CliRunner()
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("run", "ingest", "chunk", "index", "sql", "models"):
        assert cmd in res.output
    res = runner.invoke(app, ["run", "--set", "lock_timeout=-5"])
    assert res.exit_code == 2 and "Invalid configuration" in res.output
