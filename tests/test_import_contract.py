"""The import contract, checked over the source with `ast` (no imports are executed).

- layers: flows -> tasks -> (model, storage); model may use storage; storage uses neither model nor torch;
  model and storage never import prefect; tasks never import flows;
- no module imports a private name (``_x``) from another module;
- no import cycles between the project's modules (imports anywhere in a module count, lazy ones included).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "model", "storage")
# package -> the project packages it may import (itself always allowed)
ALLOWED = {
    "flows": {"tasks"},
    "tasks": {"model", "storage"},
    "model": {"storage"},
    "storage": set(),
}
# package -> third-party top-level modules it must never import
FORBIDDEN = {
    "model": {"prefect", "prefect_dask", "prefect_ray"},
    "storage": {"prefect", "prefect_dask", "prefect_ray", "torch", "transformers", "peft"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


def project_modules(root: Path) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            mods[module_name(path, root)] = path
    return mods


def resolve(name: str, names: list[str], mods: dict[str, Path]) -> list[str]:
    """The project modules an import statement depends on (a `from pkg import mod` names a module too)."""
    out = []
    if name in mods:
        out.append(name)
    for n in names:
        if f"{name}.{n}" in mods:
            out.append(f"{name}.{n}")
    if not out:
        head = name
        while head and head not in mods:
            head = head.rpartition(".")[0]
        if head:
            out.append(head)
    return out


def violations(root: Path) -> list[str]:
    mods = project_modules(root)
    bad: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for me, path in mods.items():
        layer = me.split(".")[0]
        for name, names, line in imports_of(path, root):
            top = name.split(".")[0]
            where = f"{path.relative_to(root)}:{line}"
            if top in FORBIDDEN.get(layer, ()):
                bad.append(f"{where}: {layer} imports {top}")
            if top in PACKAGES and top != layer and top not in ALLOWED[layer]:
                bad.append(f"{where}: {layer} imports {name} ({layer} -> {top} is not an allowed arrow)")
            targets = resolve(name, names, mods)
            for n in names:
                if n.startswith("_") and not n.startswith("__") and f"{name}.{n}" not in mods and targets:
                    bad.append(f"{where}: imports the private name {n} from {name}")
            for t in targets:
                if t != me and not me.startswith(t + ".") and not (t + ".").startswith(me + "."):
                    graph[me].add(t)
    bad += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_contract_holds():
    bad = violations(ROOT)
    assert not bad, "import contract violated:\n" + "\n".join(bad)


@pytest.mark.parametrize("planted, expected", [
    ("storage/leak.py", "storage imports torch"),
    ("model/leak.py", "model imports prefect"),
    ("tasks/leak.py", "not an allowed arrow"),
    ("model/priv.py", "private name"),
    ("storage/cyc_a.py", "import cycle"),
])
def test_a_planted_violation_is_caught(tmp_path, planted, expected):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "model" / "clean.py").write_text("from storage.hashing import x\n_hidden = 1\n")
    (tmp_path / "storage" / "hashing.py").write_text("x = 1\n")
    body = {
        "storage/leak.py": "import torch\n",
        "model/leak.py": "from prefect import task\n",
        "tasks/leak.py": "def f():\n    from flows.config import PipelineConfig\n",
        "model/priv.py": "from model.clean import _hidden\n",
        "storage/cyc_a.py": "from storage import cyc_b\n",
    }[planted]
    (tmp_path / planted).write_text(body)
    (tmp_path / "storage" / "cyc_b.py").write_text("def g():\n    from storage.cyc_a import y\n")
    found = violations(tmp_path)
    assert any(expected in v for v in found), found
    (tmp_path / planted).unlink()
    assert not any(expected in v for v in violations(tmp_path)), violations(tmp_path)
