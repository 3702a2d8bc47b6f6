"""The package's shape: imports run one way (no cycles, lazy imports included), every module
stays small, and the README's layout section names exactly the packages that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kimi_trt"
README = PACKAGE.parent / "README.md"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every kimi_trt module `name` imports, at top level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t != "kimi_trt":
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    assert _cycles(_graph()) == []


def test_layers_import_one_way():
    """Lower layers never import higher ones: convert knows no runtime, the runtime knows no
    serving, chat knows neither, and nothing but tests imports the tiny model's package."""
    forbidden = {
        "kimi_trt.convert": ("kimi_trt.runtime", "kimi_trt.serving", "kimi_trt.chat"),
        "kimi_trt.chat": ("kimi_trt.runtime", "kimi_trt.serving", "kimi_trt.convert"),
        "kimi_trt.runtime": ("kimi_trt.serving", "kimi_trt.tinymodel"),
        "kimi_trt.plugins": ("kimi_trt.runtime", "kimi_trt.serving", "kimi_trt.convert"),
        "kimi_trt.serving": ("kimi_trt.tinymodel",),
    }
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in _graph().items()
        for low, high in forbidden.items()
        if mod.startswith(low + ".")
        for dep in deps
        if dep.startswith(high)
    ]
    assert bad == []


def test_modules_stay_small():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_readme_layout_names_every_package():
    """The README's layout section lists each subpackage, and lists none that is gone."""
    text = README.read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"kimi_trt/(\w+)/", section))
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert listed == packages
