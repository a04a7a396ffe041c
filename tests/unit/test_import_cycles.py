"""No import circles in `pipeline` and `jobs`: a module's imports, read with `ast` (at module level
and inside functions, but not under `if TYPE_CHECKING:`), never lead back to it. A circle makes
the import order matter and hides which module owns what; a late import inside a function only
hides it from Python, so those count too."""

from __future__ import annotations

import ast
import os

from helpers import ROOT

PACKAGES = ("pipeline", "jobs")


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of PACKAGES."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The dotted names `tree` imports, TYPE_CHECKING blocks left out; `from a import b` gives
    `a.b` (a submodule, when it is one) and `a`."""
    names: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
        todo.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES it imports. Importing `a.b.c` runs `a` and `a.b` too."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for name in _imported(tree, module, path.endswith("__init__.py")):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target != module and not module.startswith(target + "."):
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_checker_sees_a_circle_and_a_late_import():
    a = ast.parse("import x.b\n")
    b = ast.parse("def f():\n    from x import a\n")
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from x import a\n")
    assert _imported(a, "x.a", False) == {"x.b"}
    assert {"x", "x.a"} <= _imported(b, "x.b", False)
    assert "x.a" not in _imported(guarded, "x.b", False)
    assert find_cycle({"x.a": {"x.b"}, "x.b": {"x.a"}}) == ["x.a", "x.b", "x.a"]
    assert find_cycle({"x.a": {"x.b"}, "x.b": set()}) is None


def test_pipeline_and_jobs_have_no_import_circle():
    graph = import_graph()
    assert "pipeline.run" in graph and "jobs.render" in graph  # the walk found the packages
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_training_job_imports_no_toy():
    """The toy (catalog, VAE fit, synthetic eval, ablation runs) drives the training job as a user
    does; the job itself never reaches into it, directly or through another module."""
    graph = import_graph()
    assert "pipeline.toy.catalog" in graph and "pipeline.train.loop" in graph
    for module in (m for m in graph if m == "pipeline.train" or m.startswith("pipeline.train.")):
        seen, todo = set(), [module]
        while todo:
            current = todo.pop()
            for target in graph.get(current, ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        toy = sorted(m for m in seen if m == "pipeline.toy" or m.startswith("pipeline.toy."))
        assert not toy, f"{module} imports {toy}"
