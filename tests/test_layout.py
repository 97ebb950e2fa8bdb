"""The package's architecture, checked from the source: sub-packages by concern, imports only downward, no cycle."""

import ast
import graphlib
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Lowest first: a module may import the shared leaves, its own package and the packages before it -- never after.
LAYERS = ["data", "modeling", "decisions", "rundir", "reporting", "distributed", "training", "serving", "inference"]
LEAVES = {"newstune", "newstune.config", "newstune.errors", "newstune.paths", "newstune.tables"}


def import_graph() -> dict[str, set[str]]:
    """newstune module -> the newstune modules it imports anywhere in the file (function-level imports too)."""
    files = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (SRC / "newstune").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        graph[name] = {module for module in found if module in files} - {name}
    return graph


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_top_level_holds_sub_packages_the_cli_and_a_few_leaves():
    top = {p.stem for p in (SRC / "newstune").glob("*.py")}
    assert top == {"__init__", "cli"} | {leaf.split(".")[-1] for leaf in LEAVES - {"newstune"}}
    assert {p.name for p in (SRC / "newstune").iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS)


@pytest.mark.parametrize("package", LAYERS)
def test_sub_package_imports_only_downward(package):
    graph = import_graph()
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    modules = [name for name in graph if package_of(name) == package]
    assert len(modules) > 1, f"newstune.{package} has no modules"
    upward = {name: sorted(m for m in graph[name] if m not in LEAVES and package_of(m) not in allowed)
              for name in modules}
    assert not any(upward.values()), f"newstune.{package} imports upward: {upward}"


@pytest.mark.parametrize("package", LAYERS)
def test_sub_package_says_what_it_owns_and_may_import(package):
    doc = importlib.import_module(f"newstune.{package}").__doc__ or ""
    assert len(doc.split()) > 25 and "May import" in doc, f"newstune.{package} needs a docstring naming its job"


def test_leaves_import_only_leaves_and_nothing_imports_the_cli():
    graph = import_graph()
    assert not any(m not in LEAVES for leaf in LEAVES for m in graph[leaf])
    assert not [name for name, deps in graph.items() if "newstune.cli" in deps]


def test_no_import_cycle_between_modules():
    try:
        list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
