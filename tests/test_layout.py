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


# Transformer backbones' names (SD3 / SD3.5, Flux.1, Flux.2, Qwen-Image, ...): their blocks, the
# text stream's projections and norms, rotary embeddings and ids, text masks, guidance and text
# encoder components, denoiser configs. Code that reads one of them knows a backbone: it belongs
# in that backbone's adapter.
TRANSFORMER_NAMES = frozenset({
    "transformer_blocks", "single_transformer_blocks",  # block lists (Flux: single-stream)
    "context_embedder", "add_q_proj", "add_k_proj", "add_v_proj", "to_added_qkv", "to_add_out",
    "norm_added_q", "norm_added_k", "norm1_context", "norm2_context", "ff_context",
    "context_pre_only", "to_qkv_mlp_proj",  # joint attention's text stream; Flux.2's fused one
    "image_rotary_emb", "img_ids", "txt_ids",  # rotary embeddings and the positions they rotate
    "encoder_hidden_states_mask",  # a masked text stream (Qwen-Image)
    "guidance_embeds", "time_cond_proj_dim",  # guidance as an input of the denoiser (Flux, LCM)
    "dual_attention_layers", "pooled_projections",  # SD3.5's image-only attention; SD3's CLIP pool
    "text_encoder_3", "tokenizer_3", "prompt_3",  # SD3's T5
    "skip_layers", "joint_attention_kwargs",  # SD3.5's skip-layer guidance; the joint call's extras
})
# where they may appear: the backbone adapters, the test beds, the shipped models' code
ALLOWED_TRANSFORMER = ("sdlens/engine/arch/", "sdlens/models/", "sdlens/testing.py")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (or other bare string statements)."""
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, str)}


def code_names(source: str, names: frozenset[str]) -> list[tuple[int, str]]:
    """``(line, name)`` for each of ``names`` the code of ``source`` uses: as an attribute
    (``x.name``), a variable, a keyword argument, a parameter, or a word of a string literal
    (f-strings' literal parts included); comments and docstrings do not count."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    words = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names))) + r")\b")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            text = [node.attr]
        elif isinstance(node, ast.Name):
            text = [node.id]
        elif isinstance(node, ast.keyword) and node.arg:
            text = [node.arg]
        elif isinstance(node, ast.arg):
            text = [node.arg]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docs:
            text = words.findall(node.value)
        else:
            continue
        found += [(getattr(node, "lineno", 0), t) for t in text if t in names]
    return sorted(set(found))


def test_the_name_finder_reads_code_not_prose():
    src = '''
def f(pipe, guidance_embeds=None):
    """Reads text_encoder_3."""  # and img_ids
    a = pipe.text_encoder_3
    b = getattr(pipe, "tokenizer_3")
    c = call(txt_ids=1)
    return f"{a}.single_transformer_blocks.{b}", "no single_transformer_blocksX here"
'''
    assert [n for _, n in code_names(src, TRANSFORMER_NAMES)] == [
        "guidance_embeds", "text_encoder_3", "tokenizer_3", "txt_ids", "single_transformer_blocks"]


def test_transformer_names_only_in_the_adapters():
    where = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).as_posix()
        if rel.startswith(ALLOWED_TRANSFORMER):
            continue
        for line, name in code_names(path.read_text(), TRANSFORMER_NAMES):
            where.append(f"{rel}:{line}: {name}")
    assert where == [], "transformer names outside the backbone adapters:\n" + "\n".join(where)


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
