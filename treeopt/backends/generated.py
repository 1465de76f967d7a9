"""Modules of generated source, written once to treeopt's cache folder and imported from
there: numba's cache and Triton both find a kernel by its file (numba through the module in
``sys.modules``, Triton by reading the function's source)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types


def cache_dir() -> str:
    """``TREEOPT_CACHE_DIR``, default ``~/.cache/treeopt``."""
    return os.environ.get("TREEOPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "treeopt")


def load(source: str, folder: str, stem: str, module_name: str) -> types.ModuleType:
    """The module of ``source``, from ``cache_dir()/folder/stem.py`` (written atomically the
    first time), registered in ``sys.modules`` as ``module_name``. Raises ``OSError`` when the
    folder cannot be written."""
    directory = os.path.join(cache_dir(), folder)
    path = os.path.join(directory, f"{stem}.py")
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(path):
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as file:
            file.write(source)
        os.replace(temporary, path)  # another process may write the same file: either one is whole
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
