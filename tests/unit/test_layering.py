"""The layout's rules, checked on the source: no import cycles in gfdit/ and gfcoll/, no private
name of one module used by another, and a planning core that imports no torch.

How the import graph is built (tests/unit/test_layering.py, `import_graph`): every module of the two
packages is parsed with ast; an edge A -> B for each `import B`, `from B import x` and `from . import
b` in A, at any depth (module level and inside functions, both: a lazy import that closes a cycle
is still a layering cycle), except under `if TYPE_CHECKING:`. `from P import m` where m is a
submodule is an edge to P.m only; a package's own `__init__` importing its submodules does not make
the submodules depend on the package. `from . import x` always names a submodule (gfcoll._gfcoll, a
compiled extension, is a leaf)."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("gfdit", "gfcoll")


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                path = os.path.join(d, f)
                if f.endswith(".py"):
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[name.removesuffix(".__init__")] = path
            for ext in glob.glob(os.path.join(d, "*.so")):  # compiled extensions: leaves
                rel = os.path.relpath(d, ROOT).replace(os.sep, ".")
                out[f"{rel}.{os.path.basename(ext).split('.')[0]}"] = ext
    return out


def _imports(tree: ast.AST):
    """Import nodes at any depth, skipping `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        if not path.endswith(".py"):
            continue
        is_pkg = path.endswith("__init__.py")
        for node in _imports(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
                continue
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in mods:
                    graph[name].add(sub)
                elif target in mods and node.module is not None:  # `from . import x`: a submodule
                    graph[name].add(target)
        graph[name].discard(name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_the_checker_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 60 and "gfdit.runtime.engine" in graph["gfdit.runtime"]  # the graph is real
    assert find_cycles(graph) == []


def _private_defs(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, methods, module variables, and
    attributes it assigns on self."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                out.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
    return {n for n in out if n.startswith("_") and not n.startswith("__")}


def test_no_private_names_across_modules():
    """`from m import _x`, `module._x`, and `obj._x` where only another module defines `_x`."""
    mods = {n: p for n, p in _modules().items() if p.endswith(".py")}
    trees = {n: ast.parse(open(p).read(), p) for n, p in mods.items()}
    defs = {n: _private_defs(t) for n, t in trees.items()}
    defined_anywhere: dict[str, set[str]] = {}
    for n, names in defs.items():
        for x in names:
            defined_anywhere.setdefault(x, set()).add(n)
    bad = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                bad += [
                    f"{name}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            if (
                not isinstance(node, ast.Attribute)
                or not node.attr.startswith("_")
                or node.attr.startswith("__")
            ):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            owners = defined_anywhere.get(node.attr, set())
            if owners and name not in owners:
                bad.append(f"{name}: .{node.attr} (defined in {sorted(owners)})")
    assert bad == [], "\n".join(bad)


def test_the_planning_core_imports_no_torch():
    core = "gfdit.request gfdit.tasks gfdit.layout gfdit.cost gfdit.policy gfdit.scheduler gfdit.sim gfdit.simexec gfdit.tune gfdit.models.presets"
    code = f"import sys\nfor m in {core.split()!r}: __import__(m)\nprint(sorted(m for m in ('torch', 'zmq', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out
