"""The package's layering, read from its imports (ast only, nothing is imported).

A module may import from its own layer and from the layers below it, never from a layer
above; some packages are held to less (``ONLY``). Every import counts, including those
inside functions: a lazy import still ties the lower layer to the upper one.
"""
import ast
import pathlib
import shutil

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "functransforms"

# Lowest first. Names are the first path component under functransforms/ (a subpackage or a
# top-level module); "__init__" is the package face.
LAYERS = [
    {"core"},
    {"batching", "reverse", "forward", "nn"},
    {"autograd_function"},
    {"api"},
    {"__init__", "examples"},
]
ONLY = {"nn": {"core"}}


def _unit(module):
    """The layering unit of a dotted module name inside the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(root, path):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _imports(root):
    """``{module: {imported module, ...}}`` for every module of the package at ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        name, is_package = _module_name(root, path)
        modules[name] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # ``from pkg import submodule`` imports the submodule itself.
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                targets.update(subs or [target])
        graph[name] = {t for t in targets if t == root.name or t.startswith(root.name + ".")}
    return graph


def layering_violations(root=PACKAGE):
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    problems = []
    for module, targets in sorted(_imports(root).items()):
        unit = _unit(module)
        if unit not in rank:
            problems.append(f"{module}: not in any layer; add '{unit}' to LAYERS in {__file__}")
            continue
        for target in sorted(targets):
            other = _unit(target)
            if other == unit or other not in rank:
                continue
            if rank[other] > rank[unit]:
                problems.append(f"{module} imports {target}: layer '{other}' is above '{unit}'")
            elif unit in ONLY and other not in ONLY[unit]:
                problems.append(f"{module} imports {target}: '{unit}' may import only {sorted(ONLY[unit])}")
    return problems


def import_cycles(root=PACKAGE):
    graph = _imports(root)
    cycles, state, path = [], {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state and target in graph:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_lower_layer_imports_a_higher_one():
    assert layering_violations() == []


def test_no_import_cycles():
    assert [" -> ".join(c) for c in import_cycles()] == []


def test_every_layer_exists():
    present = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert set().union(*LAYERS) <= present


@pytest.mark.parametrize("module, planted, expected", [
    ("core/levels.py", "from ..api.vmap import vmap\n", "layer 'api' is above 'core'"),
    ("forward/fallback.py", "def f():\n    from ..api import reverse\n", "layer 'api' is above 'forward'"),
    ("nn/functional_call.py", "from ..reverse import interpreter\n", "'nn' may import only ['core']"),
])
def test_a_planted_upward_import_is_caught(tmp_path, module, planted, expected):
    copy = tmp_path / "functransforms"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + "\n" + planted)
    assert any(expected in p for p in layering_violations(copy))


def test_a_planted_cycle_is_caught(tmp_path):
    copy = tmp_path / "functransforms"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    levels = copy / "core" / "levels.py"
    levels.write_text(levels.read_text() + "\nfrom . import mode\n")
    assert any(c[0] == "functransforms.core.levels" or "functransforms.core.levels" in c
               for c in import_cycles(copy))
