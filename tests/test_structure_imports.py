"""No import circle among the project's modules, function-local imports included.

A function-local import hides a circle from Python (the import runs after both modules are loaded),
not from a reader: the two modules still cannot be understood, tested or moved apart. So the graph
here is read from the source (AST, nothing imported) and counts every ``import`` statement, at module
level or inside a function.

:func:`import_edges` is that graph, one :class:`Edge` per statement and imported module; rules about
which package may import which can be checked on the same edges.
"""

import ast
import os
from typing import Dict, List, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("core", "model_parallel", "data", "loss", "training", "launch", "eval", "benchmarks")


class Edge(NamedTuple):
    importer: str
    """The importing module's dotted name (a package is its ``__init__``)."""
    imported: str
    """The project module it imports: the deepest one the statement names."""
    path: str
    """The importer's file, relative to the root."""
    line: int
    local: bool
    """The import runs inside a function (or a class body), not when the module loads."""


def project_modules(root: str = ROOT, packages=PACKAGES) -> Dict[str, str]:
    """``{dotted module name: file path}`` of every ``.py`` file under ``packages`` (those with or
    without an ``__init__.py``)."""
    modules = {}
    for package in packages:
        for directory, _, files in os.walk(os.path.join(root, package)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve(node, importer: str, is_package: bool, modules) -> List[str]:
    """The project modules an ``Import`` / ``ImportFrom`` node loads (empty for third-party ones)."""
    def deepest(dotted: str):
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    if isinstance(node, ast.Import):
        found = [deepest(alias.name) for alias in node.names]
        return [name for name in found if name]
    base = node.module or ""
    if node.level:  # relative: from the importer's package, up level - 1
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    # ``from pkg import mod`` loads the submodule; ``from mod import name`` loads mod.
    found = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else deepest(base) for alias in node.names}
    return sorted(name for name in found if name)


def _statements(tree):
    """``(node, local)`` for every import statement; ``local`` when it sits in a function or class."""
    stack = [(child, False) for child in ast.iter_child_nodes(tree)]
    while stack:
        node, local = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, local
        nested = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
        stack.extend((child, nested) for child in ast.iter_child_nodes(node))


def import_edges(root: str = ROOT, packages=PACKAGES) -> List[Edge]:
    """Every import of one project module by another, module-level and function-local, sorted."""
    modules = project_modules(root, packages)
    edges = []
    for importer, path in modules.items():
        tree = ast.parse(open(path).read(), filename=path)
        is_package = os.path.basename(path) == "__init__.py"
        for node, local in _statements(tree):
            for imported in _resolve(node, importer, is_package, modules):
                if imported != importer:
                    edges.append(Edge(importer, imported, os.path.relpath(path, root), node.lineno, local))
    return sorted(edges)


def _components(graph: Dict[str, set]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _cycle_through(start: str, members: set, graph) -> List[str]:
    """A shortest circle ``start -> ... -> start`` inside one component (breadth first)."""
    previous, frontier = {}, [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & members):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no circle")


def import_cycles(edges: List[Edge]) -> List[List[str]]:
    """One circle per strongly connected component of the graph, as ``[a, b, ..., a]``."""
    graph = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
        graph.setdefault(edge.imported, set())
    return [_cycle_through(component[0], set(component), graph) for component in _components(graph)]


def _describe(cycle: List[str], edges: List[Edge]) -> str:
    where = {}
    for edge in edges:
        where.setdefault((edge.importer, edge.imported), edge)
    steps = []
    for importer, imported in zip(cycle, cycle[1:]):
        edge = where[(importer, imported)]
        steps.append(f"{importer} -> {imported} ({edge.path}:{edge.line}{', in a function' if edge.local else ''})")
    return "; ".join(steps)


def test_no_import_circle_among_the_project_modules():
    edges = import_edges()
    circles = [_describe(cycle, edges) for cycle in import_cycles(edges)]
    assert not circles, "import circles:\n" + "\n".join(circles)


def _write(root, files: Dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_circle_hidden_in_a_function_is_found_and_named(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg import b\n",
        "pkg/b.py": "from . import c\n\ndef f():\n    from pkg.a import thing\n",
        "pkg/c.py": "import pkg.b as b\n",  # a second, module-level circle with b
        "pkg/d.py": "from pkg.a import thing\nfrom pkg import missing\n",  # on no circle
    })
    edges = import_edges(str(tmp_path), ("pkg",))
    assert ("pkg.b", "pkg.a", True) in {(e.importer, e.imported, e.local) for e in edges}
    assert ("pkg.d", "pkg", False) in {(e.importer, e.imported, e.local) for e in edges}
    assert import_cycles(edges) == [["pkg.a", "pkg.b", "pkg.a"]]  # one component: a, b and c
    message = _describe(import_cycles(edges)[0], edges)
    assert message == "pkg.a -> pkg.b (pkg/a.py:2); pkg.b -> pkg.a (pkg/b.py:4, in a function)"


def test_a_graph_without_circles_passes(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "from pkg.a import x\n", "pkg/a.py": "def f():\n    from pkg import b\n",
                      "pkg/b.py": "import json\n"})
    edges = import_edges(str(tmp_path), ("pkg",))
    assert [(e.importer, e.imported) for e in edges] == [("pkg", "pkg.a"), ("pkg.a", "pkg.b")]
    assert import_cycles(edges) == []


# --- the import rules ARCHITECTURE.md states ------------------------------------------------------------------

ARCHITECTURE = os.path.join(ROOT, "ARCHITECTURE.md")


def import_rules(text: str) -> Dict[str, List[str]]:
    """``{room: [what it may import]}`` from the rows of ARCHITECTURE.md's table whose first cell is a
    backquoted room (``| `room` | holds | `a`, `b` |``; ``nothing`` for none)."""
    rules = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].endswith("`"):
            rules[cells[0].strip("`")] = [name.strip(" `") for name in cells[2].split(",") if "`" in name]
    return rules


def room_of(module: str, rooms) -> str:
    """The longest room name that is ``module`` or prefixes it (None: no room holds it)."""
    found = [room for room in rooms if module == room or module.startswith(room + ".")]
    return max(found, key=len) if found else None


def _covers(name: str, module: str, rules) -> bool:
    """A row's ``name`` (a room or a module) allows ``module``: itself or a submodule of it, but not
    one in a room nested deeper than ``name`` (``model_parallel`` does not open ``model_parallel.testing``)."""
    inside = module == name or module.startswith(name + ".")
    return inside and len(room_of(module, rules)) <= len(name)


def rule_breaks(edges: List[Edge], rules: Dict[str, List[str]]) -> List[str]:
    """Every import that its importer's room does not allow: its own room always, else a room or
    module named in its row (with that name's submodules outside deeper rooms)."""
    breaks = []
    for edge in edges:
        importer, imported = room_of(edge.importer, rules), room_of(edge.imported, rules)
        if importer is None:
            breaks.append(f"{edge.path}:{edge.line}: {edge.importer} is in no room of ARCHITECTURE.md")
            continue
        allowed = imported == importer or any(_covers(name, edge.imported, rules) for name in rules[importer])
        if not allowed:
            breaks.append(f"{edge.path}:{edge.line}: {edge.importer} ({importer}) imports {edge.imported}"
                          f"{', in a function' if edge.local else ''}; {importer} may import "
                          f"{', '.join(rules[importer]) or 'nothing'}")
    return breaks


def test_every_import_keeps_the_rules_architecture_md_states():
    rules = import_rules(open(ARCHITECTURE).read())
    assert set(PACKAGES) <= set(rules), f"ARCHITECTURE.md has no row for {sorted(set(PACKAGES) - set(rules))}"
    breaks = rule_breaks(import_edges(), rules)
    assert not breaks, "imports against ARCHITECTURE.md:\n" + "\n".join(breaks)


def test_the_rules_catch_an_upward_and_a_sideways_import(tmp_path):
    """The checker itself: a row's room covers its submodules, a named module does not open its
    whole room, a sub-room is not its parent's, and ``nothing`` allows nothing."""
    rules = import_rules("| room | holds | may import |\n| --- | --- | --- |\n| `low` | x | nothing |\n"
                         "| `low.tools` | y | `low` |\n| `mid` | z | `low.api` |\n| `top` | w | `low`, `mid` |\n")
    assert rules == {"low": [], "low.tools": ["low"], "mid": ["low.api"], "top": ["low", "mid"]}
    _write(tmp_path, {
        "low/__init__.py": "", "low/api.py": "", "low/core.py": "from low import api\n",
        "low/tools/__init__.py": "from low import api\n",
        "mid/__init__.py": "from low.api import f\n\ndef g():\n    from low import core\n",  # core: not named
        "top/__init__.py": "import mid\nfrom low.tools import t\n",  # low.tools: a room of its own
        "low/up.py": "import top\n",
    })
    breaks = rule_breaks(import_edges(str(tmp_path), ("low", "mid", "top")), rules)
    assert breaks == [
        "low/up.py:1: low.up (low) imports top; low may import nothing",
        "mid/__init__.py:4: mid (mid) imports low.core, in a function; mid may import low.api",
        "top/__init__.py:2: top (top) imports low.tools; top may import low, mid",
    ]
