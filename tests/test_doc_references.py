"""Every repository path that the docs and the code's docstrings and comments name exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from support.env import REPO

TOP = ("flows", "tasks", "model", "storage", "tests", "benchmarks", "docs", "scripts", "configs", "corpus", ".ci")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*\w\.(?:py|md|yaml|yml|txt|sh|jinja|json))" % "|".join(re.escape(t) for t in TOP))


def referenced_paths(text: str) -> set[str]:
    """Repository-relative file paths mentioned in `text` (globs and placeholders such as NAME are not paths)."""
    return {m for m in PATH.findall(text)
            if not any(c in m for c in "*<>{}") and not re.search(r"(^|/)[A-Z_]{3,}(\.|/|$)", m)}


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml", "Makefile"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return [REPO / f for f in out if not f.startswith("tests/")]  # tests name paths in their own scratch trees


def test_every_named_path_exists():
    missing = sorted(f"{f.relative_to(REPO)}: {ref}" for f in tracked_files() if f.is_file()
                     for ref in referenced_paths(f.read_text(errors="replace")) if not (REPO / ref).exists())
    assert not missing, "paths named but not in the repository:\n" + "\n".join(missing)


def test_the_checker_finds_a_missing_path():
    refs = referenced_paths("see model/hypernet/network.py and model/nowhere.py, not model/*.py, docs/<x>.md "
                            "or benchmarks/NAME.py")
    assert refs == {"model/hypernet/network.py", "model/nowhere.py"}
    assert [r for r in refs if not (REPO / r).exists()] == ["model/nowhere.py"]
