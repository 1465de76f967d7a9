"""An elementwise rule over a list of torch tensors as torch's own multi-tensor operations.

The rule, traced once into array operations (:mod:`treeopt.kernels.expression`), runs as one
``torch._foreach_*`` call per operation over many tensors, with no compiler: the runner of CPU
tensors when numba is not installed, and of accelerators where Triton is not.

Each operation is the one the per-tensor rule performs, so the numbers are the rule's, bit for
bit: a result goes into a buffer whose value is no longer needed (a slot's old value, or an
earlier temporary) with the in-place form of the same operation; ``k - x`` is ``(-x) + k``
and ``k / x`` is ``reciprocal(x) * k``, exactly as torch computes them for one tensor; CPU
square roots go through NumPy (correctly rounded, where torch's are not; as the backend).

On CPU, the tensors are cut into chunks of about :data:`CHUNK_ELEMENTS` elements (pieces of
big tensors, runs of small ones) and the whole program runs on one chunk before the next: its
arrays stay in cache from one operation to the next, and temporaries live in a few
chunk-sized buffers made once (fresh memory at every operation costs more than the
arithmetic). On accelerators each operation takes the whole list, and temporaries come from
torch's caching allocator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from treeopt.backends.program import COMMUTATIVE, Operand, Program
from treeopt.backends.torch_backend import TorchBackend

_BACKEND = TorchBackend()

#: elements per chunk on CPU: a chunk's gradient, parameter, slots and temporaries together
#: stay in the caches between the program's operations
CHUNK_ELEMENTS = 1 << 16

# each operation's foreach forms: (a new list, in place)
_FOREACH: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "add": (torch._foreach_add, torch._foreach_add_),
    "sub": (torch._foreach_sub, torch._foreach_sub_),
    "mul": (torch._foreach_mul, torch._foreach_mul_),
    "div": (torch._foreach_div, torch._foreach_div_),
    "maximum": (torch._foreach_maximum, torch._foreach_maximum_),
    "minimum": (torch._foreach_minimum, torch._foreach_minimum_),
    "neg": (torch._foreach_neg, torch._foreach_neg_),
    "abs": (torch._foreach_abs, torch._foreach_abs_),
    "sign": (torch._foreach_sign, torch._foreach_sign_),
    "cos": (torch._foreach_cos, torch._foreach_cos_),
    "sqrt": (torch._foreach_sqrt, torch._foreach_sqrt_),
    "reciprocal": (torch._foreach_reciprocal, torch._foreach_reciprocal_),
}
# with a number: torch's maximum of a tensor and a number is clamp_min (the backend's too)
_WITH_NUMBER = {
    "maximum": (torch._foreach_clamp_min, torch._foreach_clamp_min_),
    "minimum": (torch._foreach_clamp_max, torch._foreach_clamp_max_),
}
# no foreach form: one tensor at a time, each result a new tensor
_PER_TENSOR: dict[str, Callable[..., Any]] = {
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "where": lambda c, a, b: np.where(c, a, b) if isinstance(c, np.ndarray) else _BACKEND.where(c, a, b),
}


class _Instruction:
    """One array operation, with its operands as registers (``(0, register)``), columns of
    the coefficient row (``(1, column)``) or constants (``(2, value)``): ``base`` is what it
    is computed on (in place when ``out`` is its register), ``args`` every operand in order."""

    __slots__ = ("op", "base", "other", "out", "in_place", "number_first", "with_number", "args")

    def __init__(
        self,
        op: str,
        base: tuple[int, Any] | None,
        other: tuple[int, Any] | None,
        out: int,
        in_place: bool,
        number_first: bool,
        args: tuple[tuple[int, Any], ...],
    ) -> None:
        self.op, self.base, self.other, self.out = op, base, other, out
        self.in_place, self.number_first, self.args = in_place, number_first, args
        self.with_number = other is not None and other[0] != 0


def plan(program: Program) -> tuple[list[_Instruction], int, list[int]]:
    """Each node with the register its result goes to: the buffer of an operand that is not
    read again (the old value of the parameter or a slot, or a temporary; never the caller's
    gradient), in place, or else a temporary, reused once its value is dead.

    Registers: 0 the gradient, 1 the parameter, ``2 + k`` slot ``k``, then the temporaries,
    then one of its own for each result of a per-tensor operation (which may be boolean).
    Returns the instructions, the count of temporaries and the register of each output."""
    last = program.last_uses()
    homes = 2 + program.slots
    register: dict[Operand, int] = {Operand("grad"): 0, Operand("param"): 1}
    register.update({Operand("slot", k): 2 + k for k in range(program.slots)})
    count = len(program.numeric)
    temps: list[int] = []  # the temporaries' numbers, then the per-tensor results'
    free: list[int] = []
    fresh: list[int] = []
    nodes: list[tuple] = []

    def encode(operand):
        if operand.is_array:
            return (0, register[operand])
        if operand.kind == "constant":
            return (2, operand.value)
        return (1, operand.index + (count if operand.kind == "scalar" else 0))

    for k, node in enumerate(program.nodes):
        result, args = Operand("node", k), node.args
        if node.op in _PER_TENSOR:
            fresh.append(k)
            register[result] = -len(fresh)  # numbered below, after the temporaries
            nodes.append((node.op, None, None, register[result], False, False, tuple(encode(a) for a in args)))
            continue
        number_first = len(args) == 2 and not args[0].is_array
        base, other = (args[1], args[0]) if number_first else (args[0], args[1] if len(args) == 2 else None)
        if not number_first and other is not None and other.is_array and node.op in COMMUTATIVE:
            if not _reusable(base, k, last, args) and _reusable(other, k, last, args):
                base, other = other, base  # in place on the right operand when only it is free
        in_place = _reusable(base, k, last, args)
        if in_place:
            target = register[base]
        elif free:
            target = free.pop()
        else:
            target = homes + len(temps)
            temps.append(target)
        for a in set(args):  # temporaries read for the last time are free again
            r = register.get(a, -1) if a.is_array else -1
            if r >= homes and last.get(a) == k and r != target and r not in free:
                free.append(r)
        register[result] = target
        nodes.append(
            (node.op, encode(base), None if other is None else encode(other), target, in_place, number_first, ())
        )
    first_fresh = homes + len(temps)

    def renumber(code):
        return (0, first_fresh - 1 - code[1]) if code is not None and code[0] == 0 and code[1] < 0 else code

    instructions = [
        _Instruction(
            op,
            renumber(base),
            renumber(other),
            first_fresh - 1 - out if out < 0 else out,
            in_place,
            number_first,
            tuple(renumber(a) for a in args),
        )
        for op, base, other, out, in_place, number_first, args in nodes
    ]
    outputs = [register[o] if o.kind == "node" else register[o] for o in program.outputs]
    outputs = [first_fresh - 1 - r if r < 0 else r for r in outputs]
    return instructions, len(temps), outputs


def _reusable(operand, k, last, args):
    return operand.is_array and operand.kind != "grad" and last.get(operand) == k and args.count(operand) == 1


class _TorchLists:
    """Operations on lists of torch tensors: one ``torch._foreach_*`` call each."""

    def apply(self, op: str, base: list, other: Any, out: list | None, with_number: bool) -> list:
        """``op(base, other)`` into ``out``: ``base`` itself (in place), a temporary, or
        ``None`` (a new list)."""
        new, in_place = _WITH_NUMBER[op] if with_number and op in _WITH_NUMBER else _FOREACH[op]
        args = () if other is None else (other,)
        if out is base:
            in_place(base, *args)
            return base
        if out is None:
            return list(new(base, *args))
        torch._foreach_copy_(out, base)
        in_place(out, *args)
        return out

    def copy(self, out: list, source: list) -> None:
        torch._foreach_copy_(out, source)

    def view(self, tensor: torch.Tensor) -> Any:
        return tensor


def _torch_out(function):
    """A torch function with ``out=``, on NumPy views: where NumPy's answer differs from
    torch's (the sign of NaN, which zero is the maximum of -0 and 0, cosines)."""

    def run(a, b=None, out=None):
        args = [torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in (a, b) if x is not None]
        return function(*args, out=torch.from_numpy(out)).numpy()

    return run


_UFUNCS: dict[str, Any] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "neg": np.negative,
    "abs": np.absolute,
    "reciprocal": np.reciprocal,
    "sqrt": np.sqrt,
    "sign": _torch_out(torch.sign),
    "cos": _torch_out(torch.cos),
    "maximum": _torch_out(torch.maximum),
    "minimum": _torch_out(torch.minimum),
}
_UFUNCS_WITH_NUMBER: dict[str, Any] = {"maximum": np.maximum, "minimum": np.minimum}  # torch's clamp_min/max


class _NumpyLists:
    """Operations on lists of NumPy views of CPU float32/float64 tensors: one ufunc call per
    piece, with ``out=`` (a microsecond each, a fifth of a torch call on CPU). NumPy's
    arithmetic and square root are correctly rounded, as torch's arithmetic is."""

    scratch = True

    def apply(self, op: str, base: list, other: Any, out: list | None, with_number: bool) -> list:
        ufunc = _UFUNCS_WITH_NUMBER[op] if with_number and op in _UFUNCS_WITH_NUMBER else _UFUNCS[op]
        if out is None:
            out = [np.empty_like(b) for b in base]
        if other is None:
            for b, o in zip(base, out):
                ufunc(b, out=o)
        elif isinstance(other, list):
            for b, x, o in zip(base, other, out):
                ufunc(b, x, out=o)
        else:
            for b, o in zip(base, out):
                ufunc(b, other, out=o)
        return out

    def copy(self, out: list, source: list) -> None:
        for o, s in zip(out, source):
            np.copyto(o, s)

    def view(self, tensor: torch.Tensor) -> Any:
        return tensor.detach().numpy()


class ForeachStep:
    """``step(grads, columns)``: the program on every tensor of ``params`` (and ``slots``, one
    list per slot, in the same order), written in place. ``rows[i]`` is tensor ``i``'s row of
    ``columns``: its optimizer's numeric coefficients then scalars, in the program's order.

    CPU tensors run in chunks (float32 and float64 through NumPy views); others whole."""

    def __init__(
        self,
        program: Program,
        params: Sequence[torch.Tensor],
        slots: Sequence[Sequence[torch.Tensor]],
        rows: Sequence[int],
        chunk_elements: int | None = None,
    ) -> None:
        self.program = program
        self.instructions, temps, self.outputs = plan(program)
        self.registers = 2 + program.slots + temps + sum(i.op in _PER_TENSOR for i in self.instructions)
        like = params[0]
        cpu = like.device.type == "cpu"
        # float32 and float64 CPU tensors through NumPy views: its square root is correctly
        # rounded (the backend's too; torch's CPU one is not) and its calls cost less
        self.lists: _TorchLists | _NumpyLists = (
            _NumpyLists() if cpu and like.dtype in (torch.float32, torch.float64) else _TorchLists()
        )
        self.rows, self.single_row = list(rows), len(set(rows)) == 1
        self.params, self.slots = list(params), [list(s) for s in slots]
        sizes = [p.numel() for p in params]
        chunk_elements = chunk_elements or CHUNK_ELEMENTS
        chunked = cpu
        self.chunks = _chunks(sizes, chunk_elements) if chunked else [[(i, 0, n) for i, n in enumerate(sizes)]]
        longest = max(sum(b - a for _, a, b in chunk) for chunk in self.chunks)
        self.scratch = (
            [torch.empty(longest, dtype=like.dtype, device=like.device) for _ in range(temps)] if chunked else []
        )
        self._views()

    def _views(self) -> None:
        """Each chunk's registers: pieces of the parameters, slots and temporaries, made once."""
        view = self.lists.view
        self.param_ptrs = [p.data_ptr() for p in self.params]
        self.chunk_views = []
        for chunk in self.chunks:
            registers: list[Any] = [None] * self.registers
            registers[1] = [view(_piece(self.params[i], a, b)) for i, a, b in chunk]
            for k, slot in enumerate(self.slots):
                registers[2 + k] = [view(_piece(slot[i], a, b)) for i, a, b in chunk]
            for r, buffer in enumerate(self.scratch):
                registers[2 + len(self.slots) + r] = [view(t) for t in _scratch_pieces(buffer, chunk, self.params)]
            self.chunk_views.append((chunk, registers, [self.rows[i] for i, _, _ in chunk]))

    def __call__(self, grads: Sequence[torch.Tensor], columns: Sequence[Sequence[float]]) -> None:
        """``grads`` in the order of the parameters; ``columns[row]``: one row's values."""
        if [p.data_ptr() for p in self.params] != self.param_ptrs:
            self._views()  # a parameter's storage was replaced (p.data = ...)
        view = self.lists.view
        with torch.no_grad():
            for chunk, views, rows in self.chunk_views:
                values: Sequence[Any] = (
                    columns[rows[0]] if self.single_row else [list(v) for v in zip(*(columns[r] for r in rows))]
                )
                registers = list(views)
                registers[0] = [view(_piece(grads[i], a, b)) for i, a, b in chunk]
                self._run_chunk(registers, values)

    def _run_chunk(self, registers: list[Any], values: Sequence[Any]) -> None:
        homes = registers[1 : 2 + self.program.slots]
        apply = self.lists.apply
        for instruction in self.instructions:
            op = instruction.op
            if instruction.args:  # a per-tensor operation
                args = [registers[v] if kind == 0 else values[v] if kind == 1 else v for kind, v in instruction.args]
                registers[instruction.out] = _per_tensor(_PER_TENSOR[op], args)
                continue
            assert instruction.base is not None  # every operation but a per-tensor one has a base
            base = registers[instruction.base[1]]
            other = instruction.other
            if other is not None:
                kind, v = other
                other = registers[v] if kind == 0 else values[v] if kind == 1 else v
            out = base if instruction.in_place else registers[instruction.out]
            if op == "rsqrt":
                result = apply("sqrt", base, None, out, False)
                result = apply("reciprocal", result, None, result, False)
            elif instruction.number_first and op in ("sub", "div"):
                # k - x == (-x) + k exactly; torch computes k / x as reciprocal(x) * k
                first, then = ("neg", "add") if op == "sub" else ("reciprocal", "mul")
                result = apply(first, base, None, out, False)
                result = apply(then, result, other, result, True)
            else:
                result = apply(op, base, other, out, instruction.with_number)
            registers[instruction.out] = result
        pending = [(1 + k, r) for k, r in enumerate(self.outputs) if r != 1 + k]
        if pending:
            _write_back(pending, homes, registers, self.lists)


def _per_tensor(function, args):
    count = len(next(a for a in args if isinstance(a, list)))
    columns = [a if isinstance(a, list) else [a] * count for a in args]
    return [function(*row) for row in zip(*columns)]


def _write_back(pending, homes, registers, lists):
    """Copy each output into its home (the parameter, a slot: registers ``1 + k``), reading an
    output that lives in another home before that home is written."""
    while pending:
        for index, (home, source) in enumerate(pending):
            if not any(s == home for h, s in pending if h != home):
                lists.copy(homes[home - 1], registers[source])
                del pending[index]
                break
        else:  # a cycle: keep one source apart first
            home, source = pending[0]
            registers.append([t.copy() if isinstance(t, np.ndarray) else t.clone() for t in registers[source]])
            pending[0] = (home, len(registers) - 1)


def _chunks(sizes: Sequence[int], length: int) -> list[list[tuple[int, int, int]]]:
    """``sizes`` cut into chunks of about ``length`` elements: ``(tensor, start, stop)``
    pieces; a tensor up to ``length`` is one piece."""
    chunks: list[list[tuple[int, int, int]]] = [[]]
    filled = 0
    for i, size in enumerate(sizes):
        if size <= length:
            if filled + size > length and chunks[-1]:
                chunks.append([])
                filled = 0
            chunks[-1].append((i, 0, size))
            filled += size
            continue
        for start in range(0, size, length):
            chunks.append([(i, start, min(size, start + length))])
        chunks.append([])
        filled = 0
    return [c for c in chunks if c]


def _piece(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    if start == 0 and stop == tensor.numel():
        return tensor
    return tensor.view(-1)[start:stop]


def _scratch_pieces(buffer, chunk, params):
    pieces, offset = [], 0
    for i, start, stop in chunk:
        piece = buffer[offset : offset + stop - start]
        pieces.append(piece.view(params[i].shape) if start == 0 and stop == params[i].numel() else piece)
        offset += stop - start
    return pieces
