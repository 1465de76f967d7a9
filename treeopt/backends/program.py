"""A program of array operations: what an elementwise rule computes, in the form the runners
of :mod:`treeopt.backends` (torch's foreach operations, a generated Triton kernel) execute.
:mod:`treeopt.kernels.expression` makes one from a rule; this module holds only the data and
the host-side arithmetic of its scalars.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: operations with two operands (``where`` has three), by name
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum", "gt", "ge", "lt", "le")
UNARY = ("neg", "abs", "sqrt", "rsqrt", "sign", "cos")
COMMUTATIVE = ("add", "mul", "maximum", "minimum")


@dataclass(frozen=True)
class Operand:
    """What an operation reads: ``kind`` is ``"grad"``, ``"param"``, ``"slot"`` (``index``:
    the slot's position), ``"coefficient"`` (``index``: its position among the numeric
    coefficients), ``"scalar"`` (``index``: a scalar operation's position), ``"node"``
    (``index``: an array operation's position) or ``"constant"`` (``value``)."""

    kind: str
    index: int = 0
    value: float = 0.0

    @property
    def is_array(self) -> bool:
        return self.kind in ("grad", "param", "slot", "node")


@dataclass(frozen=True)
class Operation:
    op: str
    args: tuple[Operand, ...]


@dataclass(frozen=True)
class Program:
    """``update`` as array operations: ``nodes`` in order, ``outputs`` the new parameter
    and the new slots (an input operand when the rule returns it unchanged)."""

    slots: int
    numeric: tuple[str, ...]  # the coefficients read from the table, in order
    scalars: tuple[Operation, ...]  # operations on coefficients only, in order
    nodes: tuple[Operation, ...]
    outputs: tuple[Operand, ...]

    def scalar_values(self, coefficients: list[float]) -> list[float]:
        """The scalars of one optimizer's step, from its numeric coefficients (in
        :attr:`numeric`'s order), in double precision like Python numbers in the rule."""
        values: list[float] = []
        for operation in self.scalars:
            args = [_scalar_of(a, coefficients, values) for a in operation.args]
            values.append(float(SCALAR_FUNCTIONS[operation.op](*args)))
        return values

    def last_uses(self) -> dict[Operand, int]:
        """For each array operand, the index of the last node that reads it
        (``len(nodes)`` when an output is it)."""
        last: dict[Operand, int] = {}
        for k, node in enumerate(self.nodes):
            for a in node.args:
                if a.is_array:
                    last[a] = k
        for a in self.outputs:
            if a.is_array:
                last[a] = len(self.nodes)
        return last


def _scalar_of(operand, coefficients, values):
    if operand.kind == "coefficient":
        return coefficients[operand.index]
    if operand.kind == "scalar":
        return values[operand.index]
    return operand.value


def _sqrt(x):
    return x**0.5


SCALAR_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "maximum": max,
    "minimum": min,
    "neg": lambda a: -a,
    "abs": abs,
    "sqrt": _sqrt,
    "rsqrt": lambda a: 1 / _sqrt(a),
}
