"""The layout docs/architecture.md describes holds: no import cycle among treeopt's modules,
framework imports only in the backends and the integrations, and no module reaching into the
private members of Optimizer or MultiOptimizer (they offer the engine interface instead)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parent.parent / "treeopt"
FRAMEWORKS = ("torch", "jax", "jaxlib", "mlx", "optax", "flax")
#: where a framework may be imported: the backends and the integrations
INTEGRATIONS = ("backends/", "torch/", "jax.py", "distributed/", "demo/")
KNOWN_CYCLES: set = set()
KNOWN_PRIVATE_USES: set = set()
KNOWN_FRAMEWORK_IMPORTS: set = set()


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text())


def imported(name, tree, known):
    """The treeopt modules ``name`` imports (anywhere in it, functions included), not counting
    the imports under ``if TYPE_CHECKING:``, which only annotations use (they run no code)."""
    found = set()
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for statement in node.body
        for inner in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            below = [f"{node.module}.{alias.name}" for alias in node.names]
            targets = [t for t in below if t in known] or [node.module]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycle():
    parsed = list(modules())
    known = {name for name, _, _ in parsed}
    graph = {name: imported(name, tree, known) - {"treeopt"} for name, _, tree in parsed}

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    cycles = sorted(
        name for name in graph if name.count(".") and reaches(name, name, set()) and not name.startswith("treeopt.demo")
    )
    assert set(cycles) == KNOWN_CYCLES, f"modules on an import cycle: {cycles}"


def test_frameworks_are_imported_only_by_backends_and_integrations():
    offenders = []
    for name, path, tree in modules():
        relative = str(path.relative_to(PACKAGE))
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


def private_members():
    """Underscored methods and attributes that Optimizer and MultiOptimizer define."""
    members = {}
    for file, cls in (("optimizer.py", "Optimizer"), ("multi.py", "MultiOptimizer")):
        tree = ast.parse((PACKAGE / file).read_text())
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        for node in ast.walk(body):
            name = None
            if isinstance(node, ast.FunctionDef):
                name = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                name = node.attr
            if name and name.startswith("_") and not name.startswith("__"):
                members.setdefault(name, set()).add(file)
    return members


def test_no_module_uses_the_private_members_of_the_optimizers():
    members = private_members()
    assert {"_check_state", "_settings", "_slot_shapes"} <= set(members)  # the scan sees them
    used = []
    for _, path, tree in modules():
        relative = str(path.relative_to(PACKAGE))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in members
                and relative not in members[node.attr]
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and not (isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "super")
            ):
                used.append((relative, node.attr))
    assert set(used) == KNOWN_PRIVATE_USES, "use the engine interface (docs/architecture.md) instead"
