"""Size limits of the product code: no module over 400 lines, no function over 80 lines.

A module may exceed a limit only with a line in its docstring that starts ``Size exception:`` and says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

from support.env import REPO

PACKAGES = ("flows", "tasks", "model", "storage")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def oversized(root: Path) -> list[str]:
    """Modules and functions over the limits, unless their module's docstring names an exception."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            src = path.read_text()
            tree = ast.parse(src)
            doc = ast.get_docstring(tree) or ""
            if "Size exception:" in doc:
                continue
            rel = path.relative_to(root)
            if len(src.splitlines()) > MAX_MODULE_LINES:
                found.append(f"{rel}: {len(src.splitlines())} lines")
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        found.append(f"{rel}:{node.lineno} {node.name}(): {n} lines")
    return found


def test_no_module_or_function_over_the_limits():
    found = oversized(REPO)
    assert not found, "over the size limits (split them, or give a 'Size exception:' line):\n" + "\n".join(found)


def test_the_check_sees_a_long_function_and_honours_an_exception(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    (tmp_path / "model" / "long.py").write_text(f'"""A module."""\n\n\ndef f():\n{body}\n')
    assert [f.split(":")[0] for f in oversized(tmp_path)] == ["model/long.py"]
    (tmp_path / "model" / "long.py").write_text(f'"""A module.\n\nSize exception: a test.\n"""\n\n\ndef f():\n{body}\n')
    assert oversized(tmp_path) == []
