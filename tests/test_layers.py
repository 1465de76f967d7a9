"""The layout docs/architecture.md draws holds, for every module of the package (demo
included) and every import (module level, inside functions, under ``TYPE_CHECKING``): no
import cycle, no import up the floors, an import inside a function only with its reason
beside it, frameworks imported only by the backends and integrations, and no module using
another's private members."""

import ast
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import structure  # noqa: E402  # the import graph and the floors, as benchmarks/structure.py measures them

PACKAGE = structure.ROOT / "treeopt"
FRAMEWORKS = ("torch", "jax", "jaxlib", "mlx", "optax", "flax")
#: where a framework may be imported: the backends and the integrations
INTEGRATIONS = ("backends/", "torch/", "jax.py", "distributed/", "demo/")

KNOWN_CYCLES: set = set()
KNOWN_UPWARD = {
    # checkpoint.save/load of a torch optimizer on several ranks writes a folder
    "checkpoint -> distributed.files",
    "checkpoint.__main__ -> distributed.files",
}
KNOWN_FRAMEWORK_IMPORTS: set = set()
KNOWN_UNEXPLAINED: set = set()
#: private members read from another module (by name, in getattr or hasattr too)
KNOWN_PRIVATE_USES = {
    # checkpoint.save/load ask a treeopt.torch.Optimizer whether it runs on several ranks
    ("checkpoint", "_distributed"),
}

PARSED = structure.modules(PACKAGE)


def test_every_module_is_on_a_floor():
    assert structure.FLOORS[0] == ["types", "errors", "_version"]  # the scan reads the layout
    for name in PARSED:
        structure.floor(name)  # raises KeyError for a module the layout leaves out


def test_no_import_cycle():
    graph = {
        name: {target for target, _ in structure.imports(name, tree, set(PARSED))} for name, tree in PARSED.items()
    }
    assert {"engine", "optimizer"} <= set(graph) and "optimizer" not in graph["engine"]
    assert {tuple(group) for group in structure.cycles(graph)} == KNOWN_CYCLES


def test_imports_go_down_the_floors():
    upward = set()
    for name, tree in PARSED.items():
        for target, _ in structure.imports(name, tree, set(PARSED)):
            if structure.floor(target) > structure.floor(name):
                upward.add(f"{name} -> {target}")
    assert upward == KNOWN_UPWARD, "move the code down, or pass what it needs in"


def test_imports_inside_functions_say_why():
    """An import inside a function is for a heavy optional dependency or a real cycle, and
    says which: a comment on its line or right above its block of imports."""
    unexplained = set()
    for name, tree in PARSED.items():
        lines = (PACKAGE / structure.path_of(name)).read_text().splitlines()
        inside = {
            id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) in inside:
                above = node.lineno - 2
                while above >= 0 and (
                    not lines[above].strip() or lines[above].strip().startswith(("import ", "from "))
                ):
                    above -= 1
                if "#" not in lines[node.lineno - 1] and not (above >= 0 and lines[above].strip().startswith("#")):
                    unexplained.add((name, ast.unparse(node)))
    assert unexplained == KNOWN_UNEXPLAINED


def test_frameworks_are_imported_only_by_backends_and_integrations():
    offenders = []
    for name, tree in PARSED.items():
        relative = structure.path_of(name)
        if relative.startswith(INTEGRATIONS):
            continue
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else []
            )
            offenders += [f"{relative}: {n}" for n in names if n.split(".")[0] in FRAMEWORKS]
    assert set(offenders) == KNOWN_FRAMEWORK_IMPORTS


def private_names():
    """``{name: modules that define it}`` for the underscored members of every class (methods,
    class attributes, attributes set on instances) and the underscored module-level names."""
    found = {}
    for module, tree in PARSED.items():
        names = set()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for node in ast.walk(cls):
                if isinstance(node, ast.FunctionDef):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    names.add(node.attr)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
        for name in names:
            if name.startswith("_") and not name.startswith("__"):
                found.setdefault(name, set()).add(module)
    return found


def test_no_module_uses_the_private_members_of_another():
    members = private_names()
    assert {"_check_state", "_hook", "_routes", "_pending", "_optimizers"} <= set(members)  # the scan sees them
    used = set()
    for module, tree in PARSED.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                name, owner = node.attr, node.value
                if (isinstance(owner, ast.Name) and owner.id in ("self", "cls")) or (
                    isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super"
                ):
                    continue
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr", "setattr"):
                if len(node.args) < 2 or not isinstance(node.args[1], ast.Constant):
                    continue
                name = node.args[1].value
            else:
                continue
            if name in members and module not in members[name]:
                used.add((module, name))
    assert used == KNOWN_PRIVATE_USES, "offer what the reader needs (docs/architecture.md) instead"
