"""The runners of an elementwise rule over a fused bucket of torch tensors, one interface:
``runner(grads, rows)``, ``rows[r]`` the numeric coefficients of the bucket's optimizer ``r``
(Python numbers, already in the tensors' dtype), the tensors written in place.

- ``"triton"`` (:mod:`.torch_triton`): one generated Triton kernel a step; starts in seconds.
  The default on accelerators.
- ``"foreach"`` (:mod:`.torch_foreach`): torch's multi-tensor operations, one per operation of
  the rule (on CPU through NumPy views, in cache-sized chunks). The default on CPU without
  numba, and on accelerators without Triton.
- ``"compile"`` (:mod:`.torch_compiled`): one ``torch.compile``d step; its first call compiles
  (about a minute for GPT-2 small on a GPU). Only when asked.

Which one runs is :data:`treeopt.kernels.torch_runner`'s choice (see
:func:`treeopt.kernels.compiled_step`'s bucket); every one gives the per-tensor rule's numbers.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from treeopt.backends.program import Program
from treeopt.backends.torch_foreach import ForeachStep

Runner = Callable[[Sequence[torch.Tensor], Sequence[Sequence[float]]], None]


def triton_usable(device: torch.device) -> bool:
    """Whether Triton can run kernels on ``device``'s tensors: CUDA with Triton installed, or
    any device under Triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", "", "false"):
        return device.type == "cpu"
    return device.type == "cuda"


def build(
    kind: str,
    rule: Any,
    program: Program | None,
    static: tuple[str, ...],
    flags: tuple[Any, ...],
    params: Sequence[torch.Tensor],
    slots: Sequence[Sequence[torch.Tensor]],
    rows: Sequence[int],
) -> tuple[Runner, Callable[[], None]]:
    """``(runner, compile)`` of ``kind`` for ``params`` (tensor ``i`` reads row ``rows[i]``)
    and ``slots`` (one list per slot name, in the rule's order): ``program`` is the rule as
    array operations (for ``"triton"`` and ``"foreach"``; ``"compile"`` traces the rule's
    ``update`` itself); ``compile()`` builds what the first call would (a kernel) so a failure
    shows before anything is written."""
    if kind == "compile":
        return _compiled(rule, static, flags, params, slots, rows)
    assert program is not None
    step: Any
    if kind == "triton":
        from treeopt.backends.torch_triton import TritonStep  # Triton: imported only when used

        step = TritonStep(program, rule.name, params, slots, rows)
        prepare = step.compile
    elif kind == "foreach":
        step = ForeachStep(program, params, slots, rows)
        prepare = _nothing
    else:
        raise ValueError(f"unknown torch runner {kind!r}")

    def run(grads: Sequence[torch.Tensor], values: Sequence[Sequence[float]]) -> None:
        step(grads, _with_scalars(program, values))

    return run, prepare


def _with_scalars(program: Program, values: Sequence[Sequence[float]]) -> list[list[float]]:
    if not program.scalars:
        return values  # type: ignore[return-value]
    return [list(row) + program.scalar_values(list(row)) for row in values]


def _nothing() -> None:
    return None


def _compiled(rule, static, flags, params, slots, rows):

    # torch.compile loads only for a bucket it runs
    from treeopt.backends.torch_compiled import CoefficientTable, compile_step

    numeric = [n for n in list(inspect.signature(rule.update).parameters)[2 + len(rule.slots) :] if n not in static]
    table = CoefficientTable(max(rows) + 1, len(numeric), params[0])
    step = compile_step(rule.update, len(rule.slots), numeric, dict(zip(static, flags)), list(rows))
    params, slots = list(params), [list(s) for s in slots]

    def run(grads, values):
        table.write(values)
        step(grads, params, slots, table.tensor)

    return run, _nothing
