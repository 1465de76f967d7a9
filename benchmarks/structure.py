"""How treeopt's middle reads, in numbers: the figures docs/architecture.md argues from.

    python benchmarks/structure.py                 # this checkout
    python benchmarks/structure.py --root OTHER    # another checkout (e.g. an older commit's tree)

Printed (every import counted: module level, inside functions, under ``TYPE_CHECKING``):

- public names of ``Optimizer`` (``mlx.optimizers.Optimizer`` has 8) and of ``MultiOptimizer``;
- members of the two classes that other modules of the package use (attribute reads of a
  name the classes define, outside ``self``), and in how many modules;
- import cycles (strongly connected groups of modules) and the modules on them;
- imports that run up the floors of the layout (a module importing one on a higher floor);
- imports inside functions;
- the line counts of the middle's files;
- a gradient's walk: ``update`` on a small NumPy tree, traced: the package's files it enters,
  and the calls from a module to one on a higher floor ("climbs"), for a single ``AdamW``
  and for a ``MultiOptimizer`` of Muon and AdamW, on the general engine (fast paths off).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def read_floors(doc: pathlib.Path) -> list[list[str]]:
    """The floors of the package, bottom first, from the layout block of docs/architecture.md
    (every checkout is measured against this one's layout)."""
    text = doc.read_text()
    block = text[text.index("```text", text.index("<!-- the floors")) + len("```text") :]
    floors = []
    for line in reversed(block[: block.index("```")].strip("\n").splitlines()):
        names = line if line.startswith(" ") else line.split(None, 1)[1]  # "top", "bottom": labels
        floors.append([name.strip() for name in names.split(",")])
    return floors


FLOORS = read_floors(ROOT / "docs" / "architecture.md")
MIDDLE = [
    "engine.py",
    "optimizer.py",
    "optimizers.py",
    "multi.py",
    "plan.py",
    "whole_model.py",
    "kernels/compiled_step.py",
    "state.py",
    "scalars.py",
    "routing.py",
    "torch/optimizer.py",
]


def modules(package: pathlib.Path) -> dict[str, ast.Module]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        found[name] = ast.parse(path.read_text())
    return found


def path_of(name: str) -> str:
    """The path of module ``name`` inside the package."""
    if name == "__init__":
        return "__init__.py"
    path = name.replace(".", "/")
    return path + ".py" if (ROOT / "treeopt" / (path + ".py")).exists() else path + "/__init__.py"


def floor(name: str) -> int:
    for depth in range(name.count(".") + 1, 0, -1):
        prefix = ".".join(name.split(".")[:depth])
        for level, members in enumerate(FLOORS):
            if prefix in members:
                return level
    raise KeyError(name)


def imports(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, bool]]:
    """``(module imported, inside a function)`` for every import of a package module."""
    inside = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            below = [f"{node.module}.{a.name}" for a in node.names]
            targets = [t for t in below if t.removeprefix("treeopt.") in known] or [node.module]
        else:
            continue
        for target in targets:
            if not target.startswith("treeopt"):
                continue
            target = target.removeprefix("treeopt").removeprefix(".") or "__init__"
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                found.append((target, id(node) in inside))
    return found


def function_imports(tree: ast.Module) -> int:
    inside = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    return sum(isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) in inside for n in ast.walk(tree))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def class_members(tree: ast.Module, cls: str) -> tuple[set[str], set[str]]:
    """``(every name the class defines, its public names)``: methods, properties, class
    attributes and attributes its methods assign on ``self``."""
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    names = set()
    for node in body.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(body):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name):
            if node.value.id == "self":
                names.add(node.attr)
    public = {n for n in names if not n.startswith("_")}
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}, public


def static(package: pathlib.Path) -> dict:
    parsed = modules(package)
    known = set(parsed)
    graph = {name: set() for name in parsed}
    upward, inside, inside_package = set(), 0, 0
    for name, tree in parsed.items():
        for target, in_function in imports(name, tree, known):
            graph[name].add(target)
            inside_package += in_function
            if floor(target) > floor(name) and not name.startswith("demo"):
                upward.add(f"{name} -> {target}")
        inside += function_imports(tree)
    members: set[str] = set()
    public = {}
    for module, cls in (("optimizer", "Optimizer"), ("multi", "MultiOptimizer")):
        every, mine = class_members(parsed[module], cls)
        members |= every
        public[cls] = sorted(mine)
    used: dict[str, set[str]] = {}
    for name, tree in parsed.items():
        if name in ("optimizer", "multi", "optimizers") or name.startswith("demo"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in members:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    used.setdefault(node.attr, set()).add(name)
    sizes = {f: len((package / f).read_text().splitlines()) for f in MIDDLE if (package / f).exists()}
    return {
        "Optimizer public names": len(public["Optimizer"]),
        "Optimizer public names (list)": public["Optimizer"],
        "MultiOptimizer public names (with Optimizer's)": len(set(public["Optimizer"]) | set(public["MultiOptimizer"])),
        "members used from other modules": len(used),
        "modules using them": len(set().union(*used.values())) if used else 0,
        "members used (list)": sorted(used),
        "import cycles": len(cycles(graph)),
        "modules on cycles": cycles(graph),
        "upward imports": len(upward),
        "upward imports (list)": sorted(upward),
        "imports inside functions": inside,
        "imports of package modules inside functions": inside_package,
        "middle file lines": sizes,
    }


WALK = r"""
import json, os, sys
import numpy as np
import treeopt as optim
from treeopt import kernels
kernels.enabled = False
package = os.path.dirname(optim.__file__)
sys.path.insert(0, os.path.dirname(sys.argv[1]))
from structure import floor

def module(path):
    rel = os.path.relpath(path, package)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel

def walk(opt):
    params = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32), "layers": [{"w": np.ones((3, 3), np.float32)}]}
    grads = {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32), "layers": [{"w": np.ones((3, 3), np.float32)}]}
    opt.update(params, grads)  # routes and slots exist: the walk is a step's, not the first step's
    files, climbs = set(), set()
    def profile(frame, event, arg):
        if event != "call":
            return
        callee = frame.f_code.co_filename
        caller = frame.f_back.f_code.co_filename if frame.f_back else ""
        if not callee.startswith(package):
            return
        files.add(module(callee))
        if caller.startswith(package):
            a, b = module(caller), module(callee)
            if a != b and floor(b) > floor(a):
                climbs.add((a, frame.f_back.f_code.co_name, b, frame.f_code.co_name))
    sys.setprofile(profile)
    opt.update(params, grads)
    sys.setprofile(None)
    return {"files": len(files), "climbs": len(climbs), "file list": sorted(files), "climb list": sorted(map(list, climbs))}

import warnings
warnings.simplefilter("ignore")
plain = walk(optim.AdamW(1e-3))
multi = walk(optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [lambda path, w: w.ndim == 2]))
print(json.dumps({"plain": plain, "multi": multi}))
"""


def walk(root: pathlib.Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), TREEOPT_KERNELS="0")
    out = subprocess.run(
        [sys.executable, "-c", WALK, str(pathlib.Path(__file__).resolve())],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    )
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parent.parent))
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--verbose", action="store_true", help="list the names, cycles, arrows and climbs")
    args = parser.parse_args()
    root = pathlib.Path(args.root).resolve()
    figures = static(root / "treeopt")
    figures["walk"] = walk(root)
    for key, value in figures.items():
        if key == "walk":
            for kind, found in value.items():
                print(f"gradient walk, {kind}: {found['files']} files, {found['climbs']} climbs")
                if args.verbose:
                    print("  files:", ", ".join(found["file list"]))
                    for climb in found["climb list"]:
                        print("  climb:", " ".join(climb))
        elif isinstance(value, list) and not args.verbose:
            continue
        else:
            print(f"{key}: {value}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
