"""The package's import graph, read from the source with ast: every import counts, also those under TYPE_CHECKING and
inside functions (a lazy import is still a dependency a maintainer has to follow).

- no cycle among the package's modules;
- no module imports another module's `_private` name;
- `export` imports nothing from `tools`;
- `runtime` imports nothing from `export` or `tools`, nor torch or transformers (the runtime's dependencies are
  onnxruntime, numpy and tokenizers).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("runtime", "export", "tools", "models")   # folder -> specedge.<folder> (pyproject's package-dir)


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package's own name maps to its __init__.py)."""
    out = {}
    for sub in SUBPACKAGES:
        for f in sorted((ROOT / sub).rglob("*.py")):
            parts = ["specedge", *f.relative_to(ROOT).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:   # `from pkg import sub` imports the module pkg.sub when there is one
                sub = f"{mod}.{a.name}"
                out.append((sub, "", node.lineno) if sub in known else (mod, a.name, node.lineno))
    return out


def private_attributes(name: str, path: Path, known: set[str]) -> list[str]:
    """`mod._name` where `mod` is bound to another module of the package (`from . import graphs`, `import x as y`):
    the same reach into a private name as importing it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update({a.asname: a.name for a in node.names if a.asname and a.name in known})
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            bound.update({a.asname or a.name: f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known})
    return [f"{name}:{n.lineno} uses {bound[n.value.id]}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound
            and n.attr.startswith("_") and not n.attr.startswith("__") and bound[n.value.id] != name]


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package modules it imports; and every import (as 'module:line -> target') of a private name."""
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for m, path in mods.items():
        for target, attr, line in imports(m, path, known):
            if target in known and target != m:
                edges[m].add(target)
            if attr.startswith("_") and not attr.startswith("__") and target != m:
                private.append(f"{m}:{line} imports {target}.{attr}")
        private += private_attributes(m, path, known)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def reaching(edges: dict[str, set[str]], src: str, dst: str) -> list[str]:
    """Direct imports from modules under `src` of modules under `dst`, as 'a -> b'."""
    under = lambda m, p: m == f"specedge.{p}" or m.startswith(f"specedge.{p}.")  # noqa: E731
    return sorted(f"{a} -> {b}" for a, bs in edges.items() if under(a, src) for b in bs if under(b, dst))


def test_the_graph_is_read():
    """The reader itself: known edges of each kind are found (function-level, TYPE_CHECKING-free, relative)."""
    edges, _ = graph()
    assert "specedge.runtime.config" in edges["specedge.runtime.engine"]
    assert "specedge.runtime.kv" in edges["specedge.runtime.reference"]
    assert "specedge.runtime.engine" in edges["specedge.runtime"]            # the package's __init__
    assert len(edges) > 30
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_cycles():
    assert cycles(graph()[0]) == []


def test_no_private_names_across_modules():
    assert graph()[1] == []


def test_export_does_not_import_tools():
    assert reaching(graph()[0], "export", "tools") == []


def test_runtime_imports_neither_export_tools_nor_torch():
    edges, _ = graph()
    assert reaching(edges, "runtime", "export") == [] and reaching(edges, "runtime", "tools") == []
    heavy = []
    for m, path in modules().items():
        if m.startswith("specedge.runtime"):
            heavy += [f"{m}:{line} imports {t}" for t, _, line in imports(m, path, set())
                      if t.split(".")[0] in ("torch", "transformers", "onnxruntime_genai")]
    assert heavy == []


def test_the_reader_sees_private_reaches(tmp_path):
    """Both shapes of reaching into another module's private name, also inside a function."""
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n    return a._hidden\n")
    (tmp_path / "c.py").write_text("from .a import _hidden, visible\n")
    known = {"specedge.x.a", "specedge.x.b", "specedge.x.c"}
    assert private_attributes("specedge.x.b", tmp_path / "b.py", known) == ["specedge.x.b:3 uses specedge.x.a._hidden"]
    assert ("specedge.x.a", "_hidden", 1) in imports("specedge.x.c", tmp_path / "c.py", known)
