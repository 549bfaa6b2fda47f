"""Layers that only point down: the proof behind the README's "Code map".

The import graph of shrink's modules is read from the source with `ast`: every `import`
and `from ... import` anywhere in a module (inside functions too, where shrink imports
its heavy dependencies), relative imports resolved. A module importing its own parent
package is not an edge (Python imports the parent first anyway). The graph must have
no cycle, and every edge must point to the same layer or a lower one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "shrink"

# Top to bottom, as the README's code map states them. A name is a module or package
# under shrink/ ("export" holds every shrink.export module); "__init__" is shrink itself.
# A module may import from its own layer (no cycle) or from any layer below it.
LAYERS = [
    ("cli", "__main__"),
    ("demo", "check", "report"),
    ("distill",),
    ("export", "targets"),
    ("measure", "label"),
    ("evaluate",),
    ("quantize", "runtime"),
    ("tasks", "prefix", "kv_cache", "logits", "teacher_gguf", "artifact", "hf", "tables", "console", "quiet", "errors",
     "toml_files", "manifest", "atomic", "gguf_owner", "chat", "metrics", "__init__"),
]
BASE = "base"  # the last layer's name in the README line


def code_map_line() -> str:
    """The one-line layering, as the README's code map writes it (__main__ and __init__,
    which only start the CLI or hold the version, left out)."""
    *upper, base = [[name for name in layer if not name.startswith("__")] for layer in LAYERS]
    return " -> ".join([" | ".join(layer) for layer in upper] + [f"{BASE} ({', '.join(base)})"])


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]  # `from pkg import module`
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[mod] |= {n for n in names if n in mods and n != mod and not mod.startswith(n + ".")}
    return graph


def layer_of(mod: str) -> int | None:
    rel = mod.removeprefix("shrink").removeprefix(".") or "__init__"
    for index, layer in enumerate(LAYERS):
        if any(rel == name or rel.startswith(name + ".") for name in layer):
            return index
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "shrink.runtime.torch_runtime" in graph["shrink.runtime"]  # open_runtime imports it where used
    assert "shrink.distill.layers" in graph["shrink.distill.width"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer():
    assert [m for m in sorted(modules()) if layer_of(m) is None] == []


def test_imports_point_down():
    graph = import_graph()
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m in sorted(graph) for t in sorted(graph[m]) if layer_of(t) < layer_of(m)]
    assert upward == []


def test_readme_states_these_layers():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Code map\n", 1)[1].split("\n## ", 1)[0]
    assert code_map_line() in section
    assert "tests/test_layers.py" in section
    listed = [name for layer in LAYERS for name in layer if not name.startswith("__")]
    missing = [n for n in listed if f"  {n}.py " not in section and f"  {n}/ " not in section]
    assert missing == []  # each module or package has its line in the listing
