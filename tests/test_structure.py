"""The package's structure: data flows one way, so no module imports one that imports it back
(lazy imports inside functions included; ``if TYPE_CHECKING:`` imports are for annotations only)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imgsent"


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for n in ast.walk(node)
        }
        deps = set()
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.ImportFrom) or node.level != 1:
                continue
            deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        graph[path.stem] = deps
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v] & graph.keys():
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_circle():
    graph = _imports()
    assert {"engine", "ortengine", "backbones", "sources", "inputs"} <= graph.keys()
    assert _circles(graph) == []


def test_the_circle_finder_finds_one():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_a_warm_score_path_is_torch_free_at_import():
    """The modules a score without torch imports never import torch at their top."""
    modules = ("ortengine", "bundles", "decodepool", "scoring", "extraction", "lanes", "batches", "decode")
    for name in (*modules, "cards", "shipped", "specs"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert not names & {"torch", "torchvision", "timm"}, name


def test_every_environment_variable_is_in_one_table_and_reaches_ray_workers(monkeypatch):
    import re

    from imgsent.options import ENV

    used = set()
    for path in PACKAGE.glob("*.py"):
        used |= set(re.findall(r"IMGSENT_[A-Z_]*[A-Z]", path.read_text()))
    assert used - set(ENV) == set()
    for name in ENV:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("IMGSENT_SOMETHING_ELSE", "1")
    from imgsent.distributed import forwarded_env

    forwarded = forwarded_env()
    assert {k for k, (_what, workers) in ENV.items() if workers} <= set(forwarded)
    assert "IMGSENT_SOMETHING_ELSE" not in forwarded and "IMGSENT_DEBUG" not in forwarded


def test_the_reference_lists_every_environment_variable():
    from imgsent.options import ENV

    reference = (PACKAGE / "REFERENCE.md").read_text()
    assert [name for name in ENV if f"| `{name}` |" not in reference] == []


def test_a_model_card_loads_no_torch():
    """Issue 34: ``imgsent models`` stays fast: its card reads the bundle and the weights' places
    without importing torch, torchvision or timm."""
    code = (
        "import sys; from imgsent.cli import main; sys.argv = ['imgsent', 'models']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "backbone weights a score would use now:" in r.stdout and r.stdout.strip().endswith("[]"), r.stdout
