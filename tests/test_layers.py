"""The layers depend downward only, and no module imports itself around a cycle (read off the source with `ast`).

    moedisco/ (the algorithm) <- ray_cluster/ (where and when) <- service/ (HTTP, job store) <- moedisco_cli/

Inside `moedisco/` and `service/` the parts are layers too, in the order of `PARTS` (bottom first): a part imports
only itself and the parts before it. In `service/`, running jobs and reporting on them share the store, not each
other's code.

Every import counts, also one inside a function: a lazy import still ties the lower layer to the upper one. So does
a module's name in a string (`importlib.import_module("a.b")`, `python -m a.b`), which the layer check also reads.
Imports under `if TYPE_CHECKING:` count too: a cycle through a type annotation is still two modules that each
need the other to be read.

    pytest tests/test_layers.py -q
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("moedisco", "ray_cluster", "service", "moedisco_cli")  # bottom first
PARTS = {  # bottom first; a part is a subpackage, or a module at the layer's top
    "moedisco": ("io", "config", "job", "models", "training", "stages", "planning", "runner"),
    "service": ("core", "schemas", "store", "jobs", "reporting", "api", "main", "serve"),
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py of every layer (a package is its __init__.py)."""
    modules = {}
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = module_files()


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """`from .x import y` in `module` as an absolute name."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(module: str) -> Iterator[str]:
    """Every module `module` imports: `a.b` for `import a.b`; `a.b`, and `a.b.c` if it is a module, for
    `from a.b import c`."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES)


def named_modules(module: str) -> set[str]:
    """The project's modules named by a string in `module`: `import_module("a.b")`, `python -m a.b`."""
    tree = ast.parse(MODULES[module].read_text())
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in MODULES}


def project_imports(module: str) -> set[str]:
    return {name for name in imported_names(module) if name in MODULES} - {module}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


@pytest.mark.parametrize("package", LAYERS)
def test_no_package_imports_a_layer_above_it(package):
    upward = {f"{module} imports {name}" for module in MODULES if module.split(".")[0] == package
              for name in {*imported_names(module), *named_modules(module)}
              if name.split(".")[0] in LAYERS and layer(name) > layer(module)}
    assert not upward, "\n".join(sorted(upward))


def part_of(module: str) -> str | None:
    """`service.store.users` -> "store"; None for a layer's own package."""
    return module.split(".")[1] if "." in module else None


def part_rank(module: str) -> int:
    """Where `layer.part...` sits in its layer's `PARTS`; the layer's own package is below all its parts."""
    part = part_of(module)
    return -1 if part is None else PARTS[module.split(".")[0]].index(part)


@pytest.mark.parametrize("package", PARTS)
def test_every_part_is_declared(package):
    found = {path.relative_to(REPO / package).parts[0].removesuffix(".py")
             for path in (REPO / package).rglob("*.py") if path.name != "__init__.py" or path.parent != REPO / package}
    assert found == set(PARTS[package])


@pytest.mark.parametrize("package", PARTS)
def test_parts_depend_downward_only(package):
    upward = {f"{module} imports {name}" for module in MODULES if module.split(".")[0] == package
              for name in {*imported_names(module), *named_modules(module)}
              if name.split(".")[0] == package and name in MODULES and part_rank(name) > part_rank(module)}
    assert not upward, "\n".join(sorted(upward))


def test_service_jobs_and_reporting_are_apart():
    crossing = {f"{module} imports {name}" for module in MODULES if module.startswith("service.")
                for name in imported_names(module)
                if name in MODULES and name.startswith("service.")
                and {part_of(module), part_of(name)} == {"jobs", "reporting"}}
    assert not crossing, "\n".join(sorted(crossing))


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for child in graph[todo.pop()] - seen:
            seen.add(child)
            todo.append(child)
    return seen


def import_cycles() -> set[frozenset[str]]:
    """The modules on each import cycle (a module reaches itself; two reach each other: the same cycle)."""
    graph = {module: project_imports(module) for module in MODULES}
    reach = {module: reachable(graph, module) for module in graph}
    return {frozenset({module} | {other for other in reach[module] if module in reach[other]})
            for module in graph if module in reach[module]}


def test_no_import_cycles():
    assert not import_cycles(), f"import cycles: {sorted(sorted(cycle) for cycle in import_cycles())}"


def test_the_command_line_imports_neither_ray_nor_the_server():
    """`moedisco estimate` and `moedisco run --runner local` must not pay for Ray, the FastAPI app or the store."""
    heavy = ("ray", "ray_cluster.orchestrate", "fastapi", "sqlalchemy", "service.store", "service.main", "torch")
    probe = f"import sys, moedisco_cli.main; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == []
