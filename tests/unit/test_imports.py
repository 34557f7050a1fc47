"""The shape of the package: no import cycle, the stages apart, nothing synthetic at run time.

Every ``import`` and ``from ... import`` of every module counts, wherever it stands: at the
top, inside a function, under ``if TYPE_CHECKING``. A deferred import hides a cycle from the
interpreter, not from a reader, so it is a cycle here too. ``from ketanode.x import y``
is an import of the module ``ketanode.x.y`` when ``y`` is a submodule, else of ``ketanode.x``.

The rules of the layout (docs/architecture.md) are data, below: data flows one way through
the database (receive -> db -> process -> db -> send), the stages never import each other,
and only the node's wiring and the command line know them all.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import ketanode

PACKAGE = "ketanode"
ROOT = Path(ketanode.__file__).resolve().parent

# --- the rules ----------------------------------------------------------------------------
# A module's *part* is its first name under ketanode: the subpackage (``process`` for
# ketanode.process.emit) or the top-level module (``node``, ``config``).

#: The stages of the data flow. A stage never imports another stage.
STAGES = frozenset({"receive", "process", "send"})

#: Parts that import no stage at all: what the stages are built from.
STAGE_FREE = frozenset({"report", "imaging", "model", "dicom", "db", "admin", "synthetic"})

#: The only parts that may import more than one stage: the node's wiring (it starts them
#: all), the command line (one command per stage and more) and the dashboard.
KNOW_SEVERAL_STAGES = frozenset({"node", "cli", "web"})

#: The only modules outside ``synthetic/`` that may import it, and why. Nothing on the
#: runtime path does (test_serving_modules_load_nothing_synthetic checks it at run time).
SYNTHETIC_USERS = {
    "ketanode.cli.demo": "`ketanode demo` writes a phantom series and sends it to the node",
    "ketanode.cli.model": "`ketanode model demo-train` runs the demonstration model's recipe",
}

#: The node's serving and processing modules: imported in a fresh interpreter, they load
#: nothing from ``synthetic/``. Names ending in ``.*`` stand for every module of a package.
RUNTIME_MODULES = (
    "ketanode.node",
    "ketanode.process.worker",
    "ketanode.process.pipeline",
    "ketanode.process.predict",
    "ketanode.process.emit",
    "ketanode.receive.*",
    "ketanode.send.*",
    "ketanode.web.server",
    "ketanode.cli.main",
)


# --- the import graph ---------------------------------------------------------------------


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root``: dotted name -> file."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(
    name: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]
) -> list[str]:
    """The package's modules one import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        if node.level:  # relative: from the module's package, up level - 1
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        targets = [
            f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names
        ]
    out = []
    for target in targets:
        while target not in known and "." in target:  # import a.b.c: the module a.b
            target = target.rsplit(".", 1)[0]
        if target in known and target != name:
            out.append(target)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its text."""
    mods = modules(root, package)
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = {
            target
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for target in _imported(name, path, node, known)
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one
    module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_a_cycle(graph, c) for c in components]


def _a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first)."""
    first = min(component)
    parents: dict[str, str] = {}
    queue = [first]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == first:
                path = [v]
                while path[-1] != first:
                    path.append(parents[path[-1]])
                return [*reversed(path), first]
            if w not in parents:
                parents[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle in {component}")


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


# --- the tests ------------------------------------------------------------------------------

GRAPH = import_graph(ROOT, PACKAGE)


def test_the_walker_sees_deferred_and_type_checking_imports(tmp_path: Path) -> None:
    """A cycle hidden in a function and one under TYPE_CHECKING are both found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.d import D\n"
    )
    (pkg / "sub" / "d.py").write_text("from .. import c\nimport pkg.a\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.sub.d"} and graph["pkg.sub.d"] == {"pkg.c", "pkg.a"}
    found = sorted(cycles(graph))
    assert found == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.sub.d", "pkg.c"]]


def test_no_import_cycle() -> None:
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_rules_name_real_parts() -> None:
    parts = {part(m) for m in GRAPH}
    for rule in (STAGES, STAGE_FREE, KNOW_SEVERAL_STAGES):
        assert rule <= parts, rule - parts
    assert set(SYNTHETIC_USERS) <= set(GRAPH)
    for pattern in RUNTIME_MODULES:
        assert pattern.removesuffix(".*") in GRAPH, pattern


def test_the_stages_stay_apart() -> None:
    broken = []
    for module, imports in sorted(GRAPH.items()):
        own = part(module)
        stages = {part(m) for m in imports} & STAGES
        if own in STAGES and stages - {own}:
            broken.append(f"stage {own}: {module} imports {sorted(stages - {own})}")
        if own in STAGE_FREE and stages:
            broken.append(f"{own} imports no stage: {module} imports {sorted(stages)}")
        if len(stages | ({own} & STAGES)) > 1 and own not in KNOW_SEVERAL_STAGES:
            broken.append(f"only {sorted(KNOW_SEVERAL_STAGES)} know several stages: {module}")
    assert not broken, "\n".join(broken)


def test_synthetic_is_off_the_runtime_path() -> None:
    users = sorted(
        f"{module} imports {sorted(m for m in imports if part(m) == 'synthetic')}"
        for module, imports in GRAPH.items()
        if part(module) != "synthetic"
        and module not in SYNTHETIC_USERS
        and any(part(m) == "synthetic" for m in imports)
    )
    assert not users, "\n".join(users)


def _runtime_modules() -> list[str]:
    out = []
    for pattern in RUNTIME_MODULES:
        if pattern.endswith(".*"):
            prefix = pattern[:-1]
            out += sorted(m for m in GRAPH if m.startswith(prefix))
        else:
            out.append(pattern)
    return out


def test_serving_modules_load_nothing_synthetic() -> None:
    """In a fresh interpreter, the node's serving and processing modules load no module of
    ``synthetic/`` (by name or by file)."""
    names = _runtime_modules()
    synthetic_dir = str(ROOT / "synthetic")
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(\n"
        "    name for name, mod in list(sys.modules.items())\n"
        f"    if name.startswith('ketanode.synthetic')\n"
        f"    or str(getattr(mod, '__file__', None) or '').startswith({synthetic_dir!r})\n"
        ")\n"
        "print(json.dumps({'loaded': loaded, 'n': len(sys.modules)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], result["loaded"]
    assert len(names) > 10 and result["n"] > 100  # the modules were imported
