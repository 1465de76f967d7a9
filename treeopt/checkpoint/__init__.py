"""Checkpoints of optimizer state keyed by parameter name, validated, atomic, and loadable on
any array library.

    from treeopt import checkpoint

    checkpoint.save(optimizer, "opt.safetensors")
    report = checkpoint.load(optimizer, "opt.safetensors", params=model_params)

The file is safetensors: every state array under ``"{parameter path}/{slot}"`` (for example
``layers.0.attn.weight/m``), and JSON metadata saying which optimizer owns each parameter,
every slot's shape and dtype, each optimizer's hyper-parameters, the step and a checksum.
Loading matches by name, never by position, and checks everything first: with
``strict=True`` (the default) a problem raises :class:`CheckpointError` listing every
problem and nothing changes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from treeopt.checkpoint import files, mlx_layout
from treeopt.checkpoint.format import CheckpointError, LoadReport, Problem, from_flat, to_flat
from treeopt.optimizer import step_lock
from treeopt.types import Tree

if TYPE_CHECKING:  # checkpoints sit above the optimizers, which never import them
    from treeopt.checkpoint.base import Stored
    from treeopt.optimizer import Optimizer

__all__ = ["save", "load", "load_content", "read", "to_flat", "from_flat", "CheckpointError", "LoadReport", "Problem"]


def save(optimizer: Optimizer, path: str | os.PathLike, *, layout: str = "treeopt") -> None:
    """Save ``optimizer``'s state to ``path`` (a safetensors file), atomically.

    A ``treeopt.torch.Optimizer`` on several ranks (DDP or ``sharding="zero1"``) saves to a
    folder instead, every rank together: one safetensors file per rank and ``treeopt.json``,
    loadable at any world size (see :mod:`treeopt.distributed.files`).

    Args:
        layout: ``"treeopt"`` (keyed by parameter path, with metadata and checksum), or
            ``"mlx"``: the keys of ``tree_flatten(optimizer.state)``, readable by
            ``mx.load`` and ``mlx.optimizers`` code, without metadata.
    """
    if getattr(optimizer, "_distributed", None) is not None:  # a treeopt.torch.Optimizer on several ranks
        if layout != "treeopt":
            raise ValueError("a checkpoint of several ranks has the treeopt layout only")
        from treeopt.distributed import files as folders

        return folders.save(optimizer, path)  # type: ignore[arg-type]  # a treeopt.torch.Optimizer
    if layout not in ("treeopt", "mlx"):
        raise ValueError(f"layout must be 'treeopt' or 'mlx', got {layout!r}")
    with step_lock(optimizer):  # a step in another thread waits: the file holds one step's state
        if layout == "treeopt":
            tensors, metadata = to_flat(optimizer)
            files.write(path, tensors, metadata)
        else:
            arrays = {k: files.as_numpy(v) for k, v in mlx_layout.to_mlx(optimizer).items()}
            save_file = files.safetensors().numpy.save_file
            files.replace_atomically(path, lambda temporary: save_file(arrays, temporary))


def read(path: str | os.PathLike) -> tuple[Stored, dict[str, Any] | None]:
    """``(tensors, metadata)`` of a checkpoint file, checksum verified; for an MLX-layout
    file (safetensors or ``.npz``) ``metadata`` is ``None``."""
    if os.fspath(path).endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                return dict(npz), None
        except FileNotFoundError:
            raise
        except Exception as error:  # zipfile, zlib and format errors of a damaged file
            raise CheckpointError(f"{path} is not a readable .npz file (truncated or corrupted?): {error}") from error
    return files.read(path)


def load(
    optimizer: Optimizer, path: str | os.PathLike, params: Tree | None = None, *, strict: bool = True
) -> LoadReport:
    """Load a checkpoint into ``optimizer``, by parameter name.

    Args:
        params: the parameters (or the model) to initialise the optimizer with first; needed
            unless the optimizer already took a step or was initialised.
        strict: with ``True`` any problem raises :class:`CheckpointError` and nothing
            changes; with ``False`` what fits is loaded and the report lists the rest.

    Returns:
        a :class:`LoadReport`.
    """
    from treeopt.distributed import files as folders

    if getattr(optimizer, "_distributed", None) is not None or folders.is_folder_checkpoint(path):
        return folders.load(optimizer, path, strict=strict)  # type: ignore[arg-type]  # as in save
    tensors, metadata = read(path)
    if metadata is None and not mlx_layout.is_mlx_layout(tensors):
        raise CheckpointError(f"{path} has neither treeopt metadata nor MLX's optimizer layout")
    return load_content(optimizer, tensors, metadata, params, strict=strict)


def load_content(
    optimizer: Optimizer,
    tensors: Stored,
    metadata: dict[str, Any] | None,
    params: Tree | None = None,
    *,
    strict: bool = True,
    check_hyperparameters: bool = True,
) -> LoadReport:
    """Load checkpoint content (``tensors`` by key and ``metadata``, as :func:`to_flat` makes
    them; ``metadata`` ``None`` for MLX's layout) into ``optimizer``; see :func:`load`.
    ``check_hyperparameters=False`` leaves the saved hyper-parameters to the caller (see
    :func:`~treeopt.checkpoint.format.from_flat`).

    Every value is checked before the optimizer changes (:mod:`.validate`); the saved routing
    changes are applied before any state is created, so each parameter's state is created by
    the optimizer that owned it; any failure puts the optimizer back as it was.
    """
    from treeopt.checkpoint import validate

    if not hasattr(tensors, "keys") or not hasattr(tensors, "__getitem__"):
        raise CheckpointError(f"checkpoint tensors must be a mapping of key to array, got {type(tensors).__name__}")
    if metadata is not None:
        validate.metadata(metadata)
        validate.tensors(tensors, metadata)
    with step_lock(optimizer):  # a step in another thread waits for the load
        return _load_content(optimizer, tensors, metadata, params, strict, check_hyperparameters)


def _load_content(optimizer, tensors, metadata, params, strict, check_hyperparameters):
    from treeopt.checkpoint import routing

    restore = optimizer.snapshot()
    try:
        if metadata is not None:
            routing.restore(optimizer, metadata)  # before init: parameters get their saved owners
        if params is not None:
            optimizer.init(params)
            if metadata is not None:
                routing.mirror_frozen(optimizer, metadata, params)
        if metadata is None:
            tensors, metadata = mlx_layout.from_mlx(optimizer, tensors)
        carried, problems = routing.check_carried(optimizer, metadata, tensors)
        if problems and strict:
            report = LoadReport(problems=problems)
            raise CheckpointError(f"the checkpoint does not fit the optimizer (nothing was loaded): {report}", report)
        report = from_flat(optimizer, tensors, metadata, strict=strict, check_hyperparameters=check_hyperparameters)
        report.problems.extend(problems)
        routing.apply_carried(carried)
        return report
    except BaseException:
        restore()  # a failed load leaves the optimizer exactly as it was, initialised or not
        raise
