"""The package's shape: no import cycles between sdlens's modules, and backbone names only where
the backbone's adapter lives.

Every import counts — module-level, inside functions, and ``importlib.import_module("...")`` with a
literal name — except those under ``if TYPE_CHECKING:`` (never run).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest


PKG = Path(__file__).resolve().parents[1] / "sdlens"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The sdlens modules that the module ``name`` (at ``path``) imports, anywhere in it."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def target(mod: str, attr: str | None = None) -> None:
        if attr is not None and f"{mod}.{attr}" in known:
            out.add(f"{mod}.{attr}")  # `from pkg import submodule`
        elif mod in known:
            out.add(mod)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                target(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                target(mod, a.name)
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if fname == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                target(str(node.args[0].value))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(path, name, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_parser_sees_function_level_and_import_module(tmp_path):
    graph = import_graph()
    # views/plot reaches analysis inside functions too: those edges are in the graph
    assert "sdlens.engine.session" in graph["sdlens"]
    assert any(m.startswith("sdlens.analysis") for m in graph["sdlens.views.plot"])


def test_no_import_cycles():
    # the front door (sdlens/__init__) imports everything by design; nothing inside imports it
    graph = import_graph()
    front = {n for n, deps in graph.items() if "sdlens" in deps and n != "sdlens"}
    assert not front, f"modules that import the front door `sdlens`: {sorted(front)}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _private_imports() -> list[str]:
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdlens"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{name}: from {node.module} import {a.name}")
    return bad


def test_no_imports_of_private_names():
    assert _private_imports() == []


UNET_NAMES = re.compile(r"\b(attn2|down_blocks|up_blocks|mid_block)\b")
# the backbone adapters (the UNet's; PixArt / Sana name their cross-attention attn2, SD3.5 its
# image-only attn2), the shipped model
ALLOWED_UNET = ("sdlens/engine/arch/", "sdlens/models/")


def test_unet_names_only_in_the_unet_adapter():
    where = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).as_posix()
        if rel.startswith(ALLOWED_UNET):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if UNET_NAMES.search(line):
                where.append(f"{rel}:{i}: {line.strip()}")
    assert where == [], "UNet names outside the UNet adapter:\n" + "\n".join(where)


def test_alphas_cumprod_only_in_the_schedule_table():
    where = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).as_posix()
        if rel in ("sdlens/engine/schedules.py",) or rel.startswith("sdlens/models/"):
            continue
        if "alphas_cumprod" in path.read_text():
            where.append(rel)
    assert where == []


@pytest.mark.parametrize("base", ["sdlens.engine.arch", "sdlens.analysis.tokens"])
def test_the_bottom_layer_imports_nothing_else_from_sdlens(base):
    # the backbone naming and the Word model are read by every package (the Trace included), so
    # they must not reach up into any of them
    graph = import_graph()
    mods = [m for m in graph if m == base or m.startswith(base + ".")]
    assert mods
    up = {m: sorted(d for d in graph[m] if not (d == base or d.startswith(base + ".")))
          for m in mods}
    assert {m: d for m, d in up.items() if d} == {}
