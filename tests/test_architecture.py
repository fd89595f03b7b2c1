"""The module structure the README's Architecture section describes: no import cycle, sampling.py is the
registry that imports the sampler families (not the other way round), networks do not read config.training."""

import ast
import os

import pytest
from conftest import ROOT

LIBRARY_DIRS = ("", "models", "samplers", "configs")


def _project_modules() -> dict[str, str]:
    """module name -> file path of every library module (top level, models/, samplers/)."""
    modules = {}
    for sub in LIBRARY_DIRS:
        folder = os.path.join(ROOT, sub)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                stem = name[:-3]
                dotted = stem if not sub else (sub if stem == "__init__" else f"{sub}.{stem}")
                if sub == "configs" and stem != "defaults":
                    continue  # the config files themselves are data, not library modules
                modules[dotted] = os.path.join(folder, name)
    return modules


def _imports(path: str, module: str, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (module level and inside functions)."""
    tree = ast.parse(open(path).read())
    package = module.rsplit(".", 1)[0] if "." in module else ""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import inside a package
                base = f"{package}.{base}" if base else package
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            if name in known and name != module:
                found.add(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (each reported once from its first node)."""
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    modules = _project_modules()
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        graph[module] = _imports(path, module, known)
    return graph


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere(import_graph):
    assert {"sampling", "parametrization", "configs.defaults"} <= set(import_graph)
    assert _cycles(import_graph) == []


def test_sampler_families_do_not_import_the_registry(import_graph):
    for module in (
        "soft_diffusion",
        "samplers.base",
        "samplers.pc",
        "samplers.ode",
        "samplers.fast",
        "samplers.stochastic",
    ):
        assert "sampling" not in import_graph[module], module
    assert {"soft_diffusion", "samplers.pc", "samplers.ode", "samplers.fast", "samplers.stochastic"} <= import_graph[
        "sampling"
    ]


def test_the_config_boundary_imports_nothing_of_the_project(import_graph):
    """configs.defaults is read by every module: it must import none of them."""
    assert import_graph["configs.defaults"] == set()


def _reads_config_section(node, sections) -> bool:
    """node is config.<section> or <obj>.config.<section> (not e.g. nn.Module's own .training flag)."""
    if not (isinstance(node, ast.Attribute) and node.attr in sections):
        return False
    owner = node.value
    return (isinstance(owner, ast.Name) and owner.id == "config") or (
        isinstance(owner, ast.Attribute) and owner.attr == "config"
    )


def test_section_reads_are_detected():
    tree = ast.parse("a = config.training.sde\nb = self.config.sampling\nc = module.training")
    assert sorted(n.lineno for n in ast.walk(tree) if _reads_config_section(n, ("training", "sampling"))) == [1, 2]


def test_networks_do_not_read_the_training_section():
    """Networks read config.model and config.data only (the parametrisation layer owns the rest)."""
    for name in sorted(os.listdir(os.path.join(ROOT, "models"))):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, "models", name)).read())
            reads = [n.lineno for n in ast.walk(tree) if _reads_config_section(n, ("training", "sampling"))]
            assert reads == [], f"models/{name} reads config.training / config.sampling at lines {reads}"
