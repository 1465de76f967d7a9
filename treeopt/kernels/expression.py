"""An elementwise rule as a short list of array operations, found by running its ``update``
once on symbols.

A runner that is not a loop over elements (torch's foreach operations, a generated Triton
kernel) needs the rule as operations on whole tensors: ``m = b1 * m + one_minus_b1 * grad``
is three operations. :func:`trace` calls the rule's own ``update`` with symbols for the
gradient, the parameter, the slots and the numeric coefficients (the switches are given as
the booleans they are, so the rule's ``if``\\ s are decided), and records each operation:

- an operation on coefficients only (``lr * weight_decay`` inside an update) is a *scalar*:
  runners compute it on the host, in double precision, as the per-tensor rule does with
  Python numbers;
- every other operation is an array operation, in the order the rule makes them.

The program is framework-free: the runners in :mod:`treeopt.backends` give each operation
its meaning. Every operation is one the per-tensor rule performs, in the same order and on
the same operands, so a runner that rounds each result to the tensor's dtype computes the
rule's numbers exactly.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from treeopt import ops
from treeopt.backends.program import SCALAR_FUNCTIONS, Operand, Operation, Program

if TYPE_CHECKING:
    from treeopt.rules.base import Rule


class TraceError(TypeError):
    """The rule does something a program of array operations cannot hold (a branch on a
    numeric coefficient, a call outside :data:`treeopt.ops.ELEMENTWISE`...)."""


class _Tracer:
    def __init__(self) -> None:
        self.nodes: list[Operation] = []
        self.scalars: list[Operation] = []

    def record(self, op: str, *args: Any) -> Symbol:
        operands = tuple(_operand(a) for a in args)
        if all(not o.is_array for o in operands):
            if op not in SCALAR_FUNCTIONS:
                raise TraceError(f"{op} of coefficients only")
            self.scalars.append(Operation(op, operands))
            return Symbol(self, Operand("scalar", len(self.scalars) - 1))
        self.nodes.append(Operation(op, operands))
        return Symbol(self, Operand("node", len(self.nodes) - 1))


def _operand(value):
    if isinstance(value, Symbol):
        return value.operand
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Operand("constant", value=float(value))
    raise TraceError(f"an operand of type {type(value).__name__}")


class Symbol:
    """A value of the traced update: an input, a coefficient or an operation's result."""

    __slots__ = ("tracer", "operand")

    def __init__(self, tracer: _Tracer, operand: Operand) -> None:
        self.tracer, self.operand = tracer, operand

    def __add__(self, other: Any) -> Symbol:
        return self.tracer.record("add", self, other)

    def __radd__(self, other: Any) -> Symbol:
        return self.tracer.record("add", other, self)

    def __sub__(self, other: Any) -> Symbol:
        return self.tracer.record("sub", self, other)

    def __rsub__(self, other: Any) -> Symbol:
        return self.tracer.record("sub", other, self)

    def __mul__(self, other: Any) -> Symbol:
        return self.tracer.record("mul", self, other)

    def __rmul__(self, other: Any) -> Symbol:
        return self.tracer.record("mul", other, self)

    def __truediv__(self, other: Any) -> Symbol:
        return self.tracer.record("div", self, other)

    def __rtruediv__(self, other: Any) -> Symbol:
        return self.tracer.record("div", other, self)

    def __neg__(self) -> Symbol:
        return self.tracer.record("neg", self)

    def __abs__(self) -> Symbol:
        return self.tracer.record("abs", self)

    def __gt__(self, other: Any) -> Symbol:
        return self.tracer.record("gt", self, other)

    def __ge__(self, other: Any) -> Symbol:
        return self.tracer.record("ge", self, other)

    def __lt__(self, other: Any) -> Symbol:
        return self.tracer.record("lt", self, other)

    def __le__(self, other: Any) -> Symbol:
        return self.tracer.record("le", self, other)

    def __bool__(self) -> bool:
        raise TraceError("a branch on a value that is not a switch")

    def __pow__(self, other: Any) -> Symbol:
        raise TraceError("a power")


def _op(name: str) -> Callable[..., Symbol]:
    def function(*args: Any) -> Symbol:
        tracer = next(a.tracer for a in args if isinstance(a, Symbol))
        return tracer.record(name, *args)

    function.__name__ = name
    return function


#: the symbolic form of each function an elementwise rule may call (ops.ELEMENTWISE)
SYMBOLIC_OPS = {name: _op(name) for name in ops.ELEMENTWISE}


def rebind(function: Callable[..., Any], replacements: Mapping[str, Any], wrap: Callable | None = None) -> Any:
    """``function`` with the :mod:`treeopt.ops` functions it calls replaced by
    ``replacements`` (by name), and the same done to every rule function it calls;
    ``wrap`` (e.g. a compiler) is applied to each rebound function."""
    return _rebind(function, tuple(sorted(replacements.items(), key=lambda item: item[0])), wrap)


@functools.cache
def _rebind(function, replacements, wrap):
    table = dict(replacements)
    names = dict(function.__globals__)
    for name in function.__code__.co_names:
        value = names.get(name)
        if value is not None and getattr(ops, name, None) is value:
            if name not in table:
                raise TraceError(f"treeopt.ops.{name}, which has no elementwise form")
            names[name] = table[name]
        elif isinstance(value, types.FunctionType) and value.__module__.startswith("treeopt.rules"):
            names[name] = _rebind(value, replacements, wrap)
    rebound = types.FunctionType(
        function.__code__, names, function.__name__, function.__defaults__, function.__closure__
    )
    return wrap(rebound) if wrap is not None else rebound


@functools.cache
def trace(rule: Rule, static: tuple[str, ...], flags: tuple[Any, ...]) -> Program:
    """``rule.update`` as a :class:`Program`, with the coefficients named in ``static`` fixed
    to ``flags`` (switches) and the others numeric. Raises :class:`TraceError` when the rule
    cannot be written so."""
    import inspect

    if callable(rule.slots) or not rule.elementwise:
        raise TraceError(f"rule {rule.name!r} is not elementwise with fixed slots")
    update = rebind(rule.update, SYMBOLIC_OPS)
    names = list(inspect.signature(rule.update).parameters)[2 + len(rule.slots) :]
    numeric = tuple(n for n in names if n not in static)
    tracer = _Tracer()
    grad, param = Symbol(tracer, Operand("grad")), Symbol(tracer, Operand("param"))
    slots = [Symbol(tracer, Operand("slot", k)) for k in range(len(rule.slots))]
    values: dict[str, Any] = {n: Symbol(tracer, Operand("coefficient", numeric.index(n))) for n in numeric}
    values.update(zip(static, flags))
    try:
        results = update(grad, param, *slots, **values)
    except TraceError as error:
        raise TraceError(f"rule {rule.name!r}: {error}") from None
    if not isinstance(results, tuple) or len(results) != 1 + len(rule.slots):
        raise TraceError(f"rule {rule.name!r}: update returned {type(results).__name__}, not (param, *slots)")
    outputs = tuple(_operand(r) for r in results)
    if not all(o.is_array for o in outputs):
        raise TraceError(f"rule {rule.name!r}: an output that is not an array")
    return Program(len(rule.slots), numeric, tuple(tracer.scalars), tuple(tracer.nodes), outputs)
