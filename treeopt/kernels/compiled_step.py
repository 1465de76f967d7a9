"""A step planned once: ``update(model, grads)`` on a tree whose structure does not change.

The first ``update`` goes through the general engine (checks, routing, initialisation). When
every parameter is a NumPy array or a CPU torch tensor written in place, the optimizer then
keeps a :class:`CompiledStep`: the structure of the gradient tree, the parameter objects,
and per bucket (optimizer, dtype) the tables of parameter and slot pointers. A later
``update`` with the same structure and the same parameter objects only collects the
gradients, checks them (shape, dtype, layout; in compiled code for NumPy), advances the
schedules and runs one compiled loop per bucket. Anything else (a new path, a replaced
array, a changed state, a wrong gradient) falls back to the general engine, which gives the
same numbers and the proper error.

Elementwise rules on float32/float64 run in numba (see :mod:`.numba_kernels`); on torch
tensors on accelerators they run as one ``torch.compile``d step (see
:mod:`treeopt.backends.torch_compiled`). Other buckets (Muon, Adafactor, half precision on
CPU) run their rule per tensor, or per stack of same-shape tensors (see :mod:`.stacking`), in
place.
"""

from __future__ import annotations

import atexit
import inspect
import operator
import sys
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from treeopt import engine, kernels
from treeopt.engine import Group, Pair, Taken
from treeopt.errors import warn
from treeopt.kernels import numba_available, stacking
from treeopt.kernels.expression import trace
from treeopt.precision import codes as precision_codes
from treeopt.routing import Direct, Router
from treeopt.types import Array, Tree

if TYPE_CHECKING:
    from treeopt.backends import Backend

_is = operator.is_
_LEAF_TYPES: set[type] = {np.ndarray}  # the array types of every backend in use (Backend.array_types)


def _flatten_pair(grad, model, grads, params):
    """The gradients and the model's arrays at the same keys, in the engine's order.

    No structure signature is needed: the plan holds the parameter objects in order, and a
    tree with other paths or another order cannot pair every gradient with the same object.
    """
    pairs: Iterable[tuple[Any, Any]]
    if type(grad) is dict:
        pairs = grad.items()
    elif type(grad) is list or type(grad) is tuple:
        if len(model) < len(grad):
            raise IndexError
        pairs = zip(range(len(grad)), grad)
    elif isinstance(grad, dict):
        pairs = grad.items()
    elif isinstance(grad, (list, tuple)):
        pairs = zip(range(len(grad)), grad)
    elif type(grad) in _LEAF_TYPES:
        grads.append(grad)
        params.append(model)
        return
    else:  # None, a number, an array subclass: the general engine decides (and never reads id(None))
        raise TypeError(type(grad).__name__)
    for key, child in pairs:
        if type(child) in _LEAF_TYPES:
            grads.append(child)
            params.append(model[key])
        else:
            _flatten_pair(child, model[key], grads, params)


class _RuleBucket:
    """Parameters of one optimizer, library and dtype, updated in place by the engine's rule
    runner (:func:`treeopt.engine.run_rule`): per tensor, or for a stackable rule (Muon) per
    stack of same-shape tensors (see :mod:`.stacking`)."""

    def __init__(self, group: Group, backend: Backend, taken: list[Pair], positions: list[int]) -> None:
        self.group, self.backend, self.positions = group, backend, positions
        # the step's pairs without their gradients (a new one each step), holding slots and options
        self.pairs = [Pair(pair.keys, None, pair.param, backend) for pair in taken]
        for pair, done in zip(self.pairs, taken):
            pair.slots, pair.options = done.slots, done.options
        self.params = [pair.param for pair in taken]
        self.shapes = [tuple(backend.shape(pair.param)) for pair in taken]
        self.dtype = taken[0].param.dtype
        self.stacks: dict[Any, Any] = {}  # a stackable rule's buffers, by run, kept from step to step

    def prepare(self, grads):
        writable = self.backend.writable
        if not all(
            writable(p) and all(writable(a) for a in slots.values())
            for p, slots in zip(self.params, (pair.slots for pair in self.pairs))
        ):
            return None  # made read-only since the plan: the engine replaces it instead
        chosen = [grads[k] for k in self.positions]
        types = self.backend.array_types  # torch: a Parameter's gradient is a Tensor
        for g, shape in zip(chosen, self.shapes):
            if type(g) not in types or g.dtype != self.dtype or tuple(g.shape) != shape:
                return None
        return chosen

    def run(self, grads):
        for pair, g in zip(self.pairs, grads):
            pair.grad = g
        try:
            engine.run_rule(self.group, self.pairs, in_place=True, stacks=self.stacks)
        finally:
            for pair in self.pairs:
                pair.grad = None  # do not keep the caller's gradients alive


class _StackedBucket(_RuleBucket):
    """Torch tensors of a stackable rule (Muon) on a GPU: the rule once per group of same-shape
    tensors, the step after the gradients' gathering replayed as a CUDA graph (see
    :mod:`treeopt.backends.torch_graphs`)."""

    def __init__(self, group: Group, backend: Backend, taken: list[Pair], positions: list[int]) -> None:
        # CUDA graphs load only for a bucket that replays one
        from treeopt.backends.torch_graphs import StackedStep

        super().__init__(group, backend, taken, positions)
        rule = group.scalars.rule
        assert rule is not None  # _stacked_eligible
        store = group.store
        names = [
            rule.slot_names(backend.shape(pair.param), store.hyper(pair.keys) if callable(rule.slots) else None)
            for pair in self.pairs
        ]
        every = list(dict.fromkeys(n for per_pair in names for n in per_pair))  # in the rule's order
        groups = stacking.groups_by_shape([(shape, n) for shape, n in zip(self.shapes, names)])
        slots = [[pair.slots.get(n) for pair in self.pairs] for n in every]
        self.step = StackedStep(rule.update, groups, self.params, slots)

    def run(self, grads):
        self.step(grads, self.group.scalars.coefficients(self.params[0], self.backend))


def _stacked_eligible(owner, backend, param):
    rule = owner.scalars.rule
    if backend.name != "torch" or not kernels.enabled or not rule.stackable:
        return False
    mode = kernels.torch_graphs
    return mode == "always" or (mode == "auto" and param.device.type == "cuda")


def _fuse(bucket, groups, backend, static, flags):
    """What a fused bucket keeps of its ``groups`` (``(owner, pairs, positions)`` each, one
    rule): sets its owners and gradient positions; returns its pairs, each pair's row of the
    coefficient table, and the rule."""
    bucket.backend, bucket.static, bucket.flags = backend, static, flags
    bucket.owners = [owner for owner, _, _ in groups]
    bucket.positions = [k for _, _, positions in groups for k in positions]
    pairs = [pair for _, group, _ in groups for pair in group]
    rows = [r for r, (_, group, _) in enumerate(groups) for _ in group]
    return pairs, rows, bucket.owners[0].scalars.rule


class _FusedBucket:
    """What a fused bucket keeps of its groups, set by :func:`_fuse`."""

    backend: Backend
    static: tuple[str, ...]
    flags: tuple[Any, ...]
    owners: list[Group]
    params: list[Array]

    def switches_hold(self) -> bool:
        """Whether every owner's switches are still the ones compiled in (a setting changed)."""
        return all(_flags(o, self.params[0], self.backend, self.static) == self.flags for o in self.owners)

    positions: list[int]


class _NumbaBucket(_FusedBucket):
    """Leaves of one elementwise rule and dtype, from one or more optimizers (groups of a
    MultiOptimizer), run as one parallel loop: each tensor reads its optimizer's numeric
    coefficients from a row of a table; the switches (booleans) are shared."""

    def __init__(
        self,
        groups: list[tuple[Group, list[Pair], list[int]]],
        backend: Backend,
        static: tuple[str, ...],
        flags: tuple[Any, ...],
    ) -> None:
        # numba is optional (treeopt[fast]): loaded when a loop is planned
        from treeopt.kernels.numba_kernels import kernel_for, work_items

        pairs, rows, rule = _fuse(self, groups, backend, static, flags)
        self.kernel, self.numeric = kernel_for(rule, static)
        self.params = [pair.param for pair in pairs]
        self.shapes = [tuple(backend.shape(p)) for p in self.params]
        self.dtype = self.params[0].dtype
        self.numpy = backend.name == "numpy"
        self.np_dtype = np.dtype(backend.dtype_name(self.params[0]))
        self.like = np.zeros(0, self.np_dtype)
        self.rows = np.array(rows, np.int64)
        self.table = np.zeros((len(self.owners), len(self.numeric)), self.np_dtype)
        self.pieces, self.items = work_items([int(np.prod(s)) for s in self.shapes])
        self.slot_arrays = [[pair.slots[n] for n in rule.slots] for pair in pairs]  # kept alive with the table
        self.slot_ptrs = np.array([[_pointer(a) for a in row] for row in self.slot_arrays], dtype=np.int64).reshape(
            len(pairs), len(rule.slots)
        )
        self.param_ptrs = np.array([_pointer(p) for p in self.params], dtype=np.int64)
        if self.numpy:
            # numba is optional (treeopt[fast]): loaded when a loop is planned
            from treeopt.kernels.numba_support import STRUCT_OK, numpy_pointers

            if not STRUCT_OK:
                raise RuntimeError("NumPy's array objects are not laid out as the loop reads them")

            width = max([len(s) for s in self.shapes] + [1])
            self.shape_table = np.zeros((len(pairs), width), np.int64)
            for i, shape in enumerate(self.shapes):
                self.shape_table[i, : len(shape)] = shape
            self.ndims = np.array([len(s) for s in self.shapes], np.int64)
            self.descr = id(self.np_dtype)
            self.pointers = numpy_pointers
            # what the loop writes, checked still writable (and of its shape) at every step
            targets = self.params + [a for row in self.slot_arrays for a in row]
            self.target_ids = np.array([id(a) for a in targets], np.int64)
            self.target_shapes = np.zeros((len(targets), width), np.int64)
            for i, a in enumerate(targets):
                self.target_shapes[i, : a.ndim] = a.shape
            self.target_ndims = np.array([a.ndim for a in targets], np.int64)
            self.target_out = np.empty(len(targets), np.int64)

    def prepare(self, grads):
        chosen = [grads[k] for k in self.positions]
        out = np.empty(len(chosen), np.int64)
        if self.numpy:
            ids = np.fromiter(map(id, chosen), np.int64, len(chosen))
            if self.pointers(ids, self.descr, self.shape_table, self.ndims, False, out) != -1:
                return None
            if (
                self.pointers(self.target_ids, self.descr, self.target_shapes, self.target_ndims, True, self.target_out)
                != -1
            ):
                return None  # a parameter or slot made read-only (or resized) since the plan
        else:
            dtype = self.dtype  # the cheapest checks torch has (about 1 us a tensor in all)
            if not all(
                g.dtype is dtype and g.is_cpu and g.shape == shape and g.is_contiguous()
                for g, shape in zip(chosen, self.shapes)
            ):
                return None
            out[:] = [g.data_ptr() for g in chosen]
            pointers = np.array([p.data_ptr() for p in self.params], np.int64)
            if not np.array_equal(pointers, self.param_ptrs):  # p.data rebound: to a tensor that fits?
                if not all(
                    p.dtype is dtype and p.is_cpu and p.shape == shape and p.is_contiguous()
                    for p, shape in zip(self.params, self.shapes)
                ):
                    return None
                self.param_ptrs = pointers
        return chosen, out

    def compiled(self):
        """This bucket, its loop compiled (called on no element)."""
        self.kernel(
            np.zeros(len(self.params), np.int64),
            self.param_ptrs,
            self.slot_ptrs,
            np.zeros((0, 3), np.int64),
            np.zeros(1, np.int64),
            self.rows,
            self.table,
            self.like,
            self.flags,
        )
        return self

    def run(self, prepared):
        _, grad_ptrs = prepared
        for row, owner in enumerate(self.owners):
            values = owner.scalars.coefficients(self.params[0], self.backend)
            self.table[row] = [_float(values[n]) for n in self.numeric]
        self.kernel(
            grad_ptrs,
            self.param_ptrs,
            self.slot_ptrs,
            self.pieces,
            self.items,
            self.rows,
            self.table,
            self.like,
            self.flags,
        )


class _StoredBucket(_NumbaBucket):
    """Float32 parameters of one elementwise rule whose slots are stored as ``kinds``, from one
    or more groups, run as one parallel loop (:func:`kernel_for`); the gradients and the
    parameters are checked as :class:`~treeopt.kernels.compiled_step._NumbaBucket` checks them,
    the stored arrays by their own dtypes."""

    def __init__(
        self,
        groups: list[tuple[Any, list[Any], list[int]]],
        backend: Any,
        static: tuple[str, ...],
        flags: tuple[Any, ...],
        kinds: tuple[str, ...],
    ) -> None:
        # numba is optional (treeopt[fast]): loaded when a loop is planned
        from treeopt.kernels.numba_precision import block_items, block_of, kernel_for

        pairs, rows, rule = _fuse(self, groups, backend, static, flags)
        self.kinds = kinds
        self.kernel, self.numeric = kernel_for(rule, kinds, static)
        self.params = [pair.param for pair in pairs]
        self.shapes = [tuple(backend.shape(p)) for p in self.params]
        self.dtype = self.params[0].dtype
        self.numpy = backend.name == "numpy"
        self.np_dtype = np.dtype("float32")
        self.rows = np.array(rows, np.int64)
        self.table = np.zeros((len(self.owners), len(self.numeric)), np.float32)
        by_rows = any(kind in ("i8", "u8") for kind in kinds)
        self.pieces, self.items, self.columns, self.per_row = block_items(self.shapes, by_rows, block=block_of(kinds))
        names = rule.slots
        self.slot_arrays = [[pair.slots[n] for n in names] for pair in pairs]
        self.scale_arrays = [
            [pair.slots[f"{n}_scale"] for n, kind in zip(names, kinds) if kind in ("i8", "u8")] for pair in pairs
        ]
        count = len(names)
        self.slot_ptrs = np.array([[_pointer(a) for a in row] for row in self.slot_arrays], np.int64).reshape(-1, count)
        self.scale_ptrs = np.zeros((len(pairs), count), np.int64)
        for i, pair in enumerate(pairs):
            for k, (name, kind) in enumerate(zip(names, kinds)):
                if kind in ("i8", "u8"):
                    self.scale_ptrs[i, k] = _pointer(pair.slots[f"{name}_scale"])
        self.param_ptrs = np.array([_pointer(p) for p in self.params], np.int64)
        # the per-tensor part of each bfloat16 slot's random bits (the step is mixed in per
        # step), and each tensor's first element in the whole tensor (a shard's offset)
        self.starts = np.zeros((len(pairs), count), np.int64)
        self.offsets = np.zeros(len(pairs), np.int64)
        for i, pair in enumerate(pairs):
            noise = self.owners[rows[i]].store.noise(pair.keys)
            self.offsets[i] = noise.offset
            for k, name in enumerate(names):
                self.starts[i, k] = noise.start(name)
        self.salts = np.zeros_like(self.starts)
        if self.numpy:
            # numba is optional (treeopt[fast]): loaded when a loop is planned
            from treeopt.kernels.numba_support import numpy_pointers

            self.pointers = numpy_pointers
            self.descr = id(self.np_dtype)
            self.shape_table, self.ndims = _shape_table(self.shapes)
            # every array the loop writes, by dtype, checked still writable (and of its shape) at every step
            targets = (
                self.params
                + [a for row in self.slot_arrays for a in row]
                + [a for row in self.scale_arrays for a in row]
            )
            self.checks = []
            for dtype in {a.dtype for a in targets}:
                chosen = [a for a in targets if a.dtype == dtype]
                shapes, ndims = _shape_table([a.shape for a in chosen])
                ids = np.array([id(a) for a in chosen], np.int64)
                self.checks.append((id(dtype), ids, shapes, ndims, np.empty(len(chosen), np.int64)))
            self.target_ids = np.zeros(0, np.int64)  # the base class's check: done above instead
            self.target_shapes = np.zeros((0, 1), np.int64)
            self.target_ndims = np.zeros(0, np.int64)
            self.target_out = np.zeros(0, np.int64)

    def prepare(self, grads):
        prepared = super().prepare(grads)
        if prepared is None or not self.numpy:
            return prepared
        for descr, ids, shapes, ndims, out in self.checks:
            if self.pointers(ids, descr, shapes, ndims, True, out) != -1:
                return None
        return prepared

    def _call(self, grad_ptrs, pieces, items):
        self.kernel(
            grad_ptrs,
            self.param_ptrs,
            self.slot_ptrs,
            self.scale_ptrs,
            pieces,
            items,
            self.columns,
            self.per_row,
            self.rows,
            self.table,
            self.flags,
            self.salts,
            self.offsets,
        )

    def compiled(self):
        """This bucket, its loop compiled (called on no element)."""
        self._call(np.zeros(len(self.params), np.int64), np.zeros((0, 3), np.int64), np.zeros(1, np.int64))
        return self

    def run(self, prepared):
        _, grad_ptrs = prepared
        steps = np.zeros(len(self.owners), np.int64)
        for row, owner in enumerate(self.owners):
            values = owner.scalars.coefficients(self.params[0], self.backend)
            self.table[row] = [float(values[n]) for n in self.numeric]
            steps[row] = int(owner.store.tree["step"])
        if "bf16" in self.kinds:
            self.salts[:] = precision_codes.mix32((self.starts + steps[self.rows][:, None]) & precision_codes.MASK32)
        self._call(grad_ptrs, self.pieces, self.items)


def _shape_table(shapes):
    width = max([len(s) for s in shapes] + [1])
    table = np.zeros((len(shapes), width), np.int64)
    for i, shape in enumerate(shapes):
        table[i, : len(shape)] = shape
    return table, np.array([len(s) for s in shapes], np.int64)


class _TorchBucket(_FusedBucket):
    """Pairs of one elementwise rule, dtype and device (torch), from one or more groups, run by
    one of the torch runners (:mod:`treeopt.backends.torch_runners`: a generated Triton kernel,
    torch's foreach operations, or a ``torch.compile``d step); coefficients as in
    :class:`_NumbaBucket`."""

    def __init__(
        self,
        groups: list[tuple[Group, list[Pair], list[int]]],
        backend: Backend,
        static: tuple[str, ...],
        flags: tuple[Any, ...],
        kind: str,
    ) -> None:
        # the torch runners load only for a bucket they run
        from treeopt.backends import torch_runners

        pairs, rows, rule = _fuse(self, groups, backend, static, flags)
        self.kind = kind
        self.numeric = _numeric_names(rule, static)
        self.params = [pair.param for pair in pairs]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.strides = [p.stride() for p in self.params]
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        slots = [[pair.slots[n] for pair in pairs] for n in rule.slots]
        program = None if kind == "compile" else trace(rule, static, flags)
        self.step, self.prepare_runner = torch_runners.build(
            kind, rule, program, static, flags, self.params, slots, rows
        )

    def compiled(self):
        """This bucket, its kernel built (``torch.compile``: at the first call, which checks
        nothing the engine has not checked already)."""
        self.prepare_runner()
        return self

    def prepare(self, grads):
        chosen = [grads[k] for k in self.positions]
        dtype, device = self.dtype, self.device
        # what the step was planned for: another layout goes to the engine (torch.compile
        # would otherwise compile the whole step again; the other runners read the tensors
        # as the parameters' layout)
        if not all(
            g.dtype is dtype and g.device == device and g.shape == shape and g.stride() == stride
            for g, shape, stride in zip(chosen, self.shapes, self.strides)
        ):
            return None
        return chosen

    def run(self, grads):
        values = []
        for owner in self.owners:
            coefficients = owner.scalars.coefficients(self.params[0], self.backend)
            values.append([_float(coefficients[n]) for n in self.numeric])
        self.step(grads, values)


class _LoadingBucket(_FusedBucket):
    """Groups of a numba loop that is still loading. In a new process, importing numba and
    setting up its compiler takes longer than a step of a small model (about half a second),
    so the loop loads in a thread while the rule runs per tensor; it takes over at the first
    step after it is ready (both give the rule's numbers bit for bit). If it fails to load,
    the rule keeps running per tensor, with a warning."""

    def __init__(
        self,
        groups: list[tuple[Group, list[Pair], list[int]]],
        backend: Backend,
        static: tuple[str, ...],
        flags: tuple[Any, ...],
    ) -> None:
        _fuse(self, groups, backend, static, flags)
        self.params = [pair.param for _, group, _ in groups for pair in group]
        self.interim = [_RuleBucket(owner, group[0].backend, group, positions) for owner, group, positions in groups]
        self.loop: _NumbaBucket | None = None
        self.thread = threading.Thread(target=self._load, args=(groups,), name="treeopt numba loop", daemon=True)
        _LOADING.append(self.thread)
        self.thread.start()

    def _load(self, groups):
        global _loops_ready
        try:
            self.loop = _NumbaBucket(groups, self.backend, self.static, self.flags).compiled()
            _loops_ready = True
        except Exception as error:  # the rule keeps running per tensor; said at the next step
            self.error = error

    error: Exception | None = None

    def prepare(self, grads):
        loop = None if self.thread.is_alive() else self.loop
        if self.error is not None and not self.thread.is_alive():
            error, self.error = self.error, None
            _warn_fallback(self.owners[0].scalars.rule, error, "per tensor")
        if loop is not None:
            ready = loop.prepare(grads)
            return None if ready is None else (loop, ready)
        interim = [bucket.prepare(grads) for bucket in self.interim]
        return None if any(p is None for p in interim) else (None, interim)

    def run(self, prepared):
        loop, ready = prepared
        if loop is not None:
            loop.run(ready)
            return
        for bucket, grads in zip(self.interim, ready):
            bucket.run(grads)


_LOADING: list[threading.Thread] = []
_loops_ready = False  # a numba loop was loaded in this process: numba and its compiler are set up


@atexit.register
def _finish_loading():
    # a thread still importing numba or loading a loop when the interpreter shuts down can
    # crash it: let the loops finish first
    for thread in _LOADING:
        thread.join()


def _warn_fallback(rule, error, fallback):
    warn(
        f"the compiled loop of rule {rule.name!r} failed to build ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}); it runs {fallback}",
        RuntimeWarning,
    )


def _numeric_names(rule, static):
    """The coefficients of ``rule.update`` that are numbers (not the switches ``static``)."""

    parameters = list(inspect.signature(rule.update).parameters)[2 + len(rule.slots) :]
    return [n for n in parameters if n not in static]


def _torch_runner(owner, backend, param):
    """The runner of ``owner``'s tensors like ``param`` (see :data:`treeopt.kernels.torch_runner`),
    or ``None``: numba's loop on CPU, or the per-tensor path."""
    rule = owner.scalars.rule
    if backend.name != "torch" or not kernels.enabled or not rule.elementwise or callable(rule.slots):
        return None
    mode = kernels.torch_runner
    if mode == "auto":
        if param.device.type == "cpu":
            if _numba_eligible(owner, backend, param):
                return None
            _hint_fast_extra()
            return "foreach"
        # Triton is asked about only for tensors on a GPU
        from treeopt.backends.torch_runners import triton_usable

        return "triton" if triton_usable(param.device) else "foreach"
    return None if mode in ("numba", "per-tensor") else mode


_hinted = False


def _hint_fast_extra():
    global _hinted
    if not _hinted and not numba_available():
        _hinted = True
        warn(
            "treeopt runs CPU torch tensors with torch's foreach operations; installing numba "
            "(pip install numba, or treeopt's fast extra: pip install -e '.[fast]') makes an optimizer step "
            "several times faster",
            UserWarning,
        )


def _flags(owner, like, backend, static):
    values = owner.scalars.coefficients(like, backend)
    return tuple(bool(values[n]) for n in static)


def _static_names(owner, like, backend):
    """The coefficients of ``owner``'s rule that are switches rather than numbers."""
    values = owner.scalars.coefficients(like, backend)
    return tuple(n for n, v in values.items() if isinstance(v, (bool, np.bool_)))


def _pointer(array):
    return array.ctypes.data if isinstance(array, np.ndarray) else array.data_ptr()


def _float(value):
    return float(value)


def _numba_eligible(owner, backend, param):
    if not numba_available() or not owner.scalars.rule.elementwise:
        return False
    if backend.name == "numpy":  # the loop reads 64-bit NumPy array objects (numba_support.STRUCT_OK)
        return sys.maxsize > 2**32 and param.dtype.name in ("float32", "float64")
    return (
        backend.name == "torch" and param.device.type == "cpu" and backend.dtype_name(param) in ("float32", "float64")
    )


def _stored_kinds(pair: Pair) -> tuple[str, ...] | None:
    """How numba's loop reads the slots of ``pair`` when its group keeps them in another form
    (``state_dtype``): ``None`` when they are kept as the parameter (or as float32 slots of a
    float32 parameter: the plain loop), ``()`` when only the engine's rule runner reads them,
    else one kind of :data:`.numba_precision.KINDS` per slot."""
    store = pair.group.store
    if store.precision is None:
        return None
    layout = store.layout(pair.shape, pair.dtype, pair.keys)
    if layout is None:
        return None
    if pair.dtype != "float32" or pair.options or not _numba_eligible(pair.group, pair.backend, pair.param):
        return ()
    # numba is optional (treeopt[fast]): loaded when a loop is planned
    from treeopt.kernels.numba_precision import kind_of

    rule = pair.group.scalars.rule
    assert rule is not None and not callable(rule.slots)  # an elementwise rule: _numba_eligible
    kinds = tuple(kind_of(layout.forms[name]) for name in rule.slots)
    if all(kind == "f32" for kind in kinds):
        return None
    return () if None in kinds else kinds  # type: ignore[return-value]


def _by_stored_form(buckets: Iterable[list[Pair]]) -> Iterable[tuple[list[Pair], tuple[str, ...] | None]]:
    """Each bucket split by how its slots are stored (an int8 state keeps small tensors in
    float32), with that: see :func:`_stored_kinds`."""
    for bucket in buckets:
        if bucket[0].group.store.precision is None:
            yield bucket, None
            continue
        split: dict[Any, list[Pair]] = {}
        for pair in bucket:
            split.setdefault(_stored_kinds(pair), []).append(pair)
        yield from ((pairs, kinds) for kinds, pairs in split.items())


class CompiledStep:
    """The buckets of a step taken, kept while what they were planned on holds: the routes and
    the stores (their versions: any change re-plans), the settings of the scalars (a change
    re-plans only when it flips a switch compiled into a loop), the tree's structure and
    the parameter objects."""

    def __init__(self, params: list[Array], buckets: list[Any], stepping: list[Group], router: Direct | Router) -> None:
        self.params, self.buckets, self.stepping, self.router = params, buckets, stepping, router
        groups = [member.group for member in router.groups()]
        self.stores = [group.store for group in groups]
        self.scalars = [group.scalars for group in groups]
        self.versions = self._versions()
        self.settings = [scalars.version for scalars in self.scalars]

    def _versions(self) -> list[Any]:
        return [self.router.version, *(store.version for store in self.stores)]

    @classmethod
    def build(cls, router: Direct | Router, gradients: Tree, model: Tree, taken: Taken) -> CompiledStep | None:
        """The plan of the step just taken, or ``None`` when it cannot be reused."""
        pairs, active = taken.pairs, taken.active
        if not active or any(pair.grad is None for pair in pairs):
            return None
        for pair in active:
            group, backend, param = pair.group, pair.backend, pair.param
            if not group.runs_rule or not backend.mutable or not pair.owned:
                return None
            if not backend.writable(param) or (backend.name == "numpy" and not param.flags.c_contiguous):
                return None
            if backend.name == "torch" and not param.is_contiguous():
                return None
        for backend in {pair.backend for pair in active}:
            _LEAF_TYPES.update(backend.array_types)
        grads: list[Array] = []
        params: list[Array] = []
        try:
            _flatten_pair(gradients, model, grads, params)
        except (KeyError, IndexError, TypeError):
            return None
        if len(params) != len(pairs) or not all(map(_is, params, [pair.param for pair in pairs])):
            return None  # e.g. numbers in the tree: the engine made arrays of them
        position = {id(pair): k for k, pair in enumerate(pairs)}
        groups: dict[tuple[Any, ...], list[Pair]] = {}
        for pair in active:
            key: tuple[Any, ...] = (
                id(pair.group),
                pair.backend.name,
                pair.backend.dtype_name(pair.param),
                pair.backend.device(pair.param),
                pair.options,
            )
            groups.setdefault(key, []).append(pair)
        buckets: list[Any] = []
        fused: dict[tuple[Any, ...], list[tuple[Group, list[Pair], list[int]]]] = {}
        for bucket, kinds in _by_stored_form(groups.values()):
            first = bucket[0]
            positions = [position[id(pair)] for pair in bucket]
            stored = first.group.store.layout(first.shape, first.dtype, first.keys) is not None
            # slots kept in another form run in numba's loop of stored forms (kinds) or the rule runner
            compiled = None if stored else _torch_runner(first.group, first.backend, first.param)
            if (
                first.options
                or kinds == ()
                or (not kinds and not compiled and not _numba_eligible(first.group, first.backend, first.param))
            ):
                # per-parameter options (a layout...) are the rule runner's: a loop shares one set
                stacked = (
                    not first.options and not stored and _stacked_eligible(first.group, first.backend, first.param)
                )
                buckets.append(
                    (_StackedBucket if stacked else _RuleBucket)(first.group, first.backend, bucket, positions)
                )
                continue
            # groups that share a rule, dtype and switches run in one loop
            static = _static_names(first.group, first.param, first.backend)
            flags = _flags(first.group, first.param, first.backend, static)
            key = (
                first.group.scalars.rule,
                first.backend.name,
                first.backend.dtype_name(first.param),
                first.backend.device(first.param),
                static,
                flags,
                compiled,
                kinds,
            )
            fused.setdefault(key, []).append((first.group, bucket, positions))
        for key, members in fused.items():
            try:  # compiled now, so that a rule that cannot compile falls back before any write
                backend = members[0][1][0].backend
                if key[7]:
                    buckets.append(_StoredBucket(members, backend, key[4], key[5], key[7]).compiled())
                elif key[6]:
                    buckets.append(_TorchBucket(members, backend, key[4], key[5], key[6]).compiled())
                elif kernels.load_in_background and not _loops_ready:
                    buckets.append(_LoadingBucket(members, backend, key[4], key[5]))
                else:
                    buckets.append(_NumbaBucket(members, backend, key[4], key[5]).compiled())
            except Exception as error:
                fallback = "torch's foreach operations" if key[6] == "triton" else "per tensor"
                _warn_fallback(key[0], error, fallback)
                if key[6] == "triton":
                    buckets.append(_TorchBucket(members, members[0][1][0].backend, key[4], key[5], "foreach"))
                    continue
                buckets.extend(
                    _RuleBucket(owner, group[0].backend, group, positions) for owner, group, positions in members
                )
        return cls(params, buckets, taken.stepping, router)

    def run(self, gradients: Tree, model: Tree) -> bool:
        """Take the step if ``gradients`` and ``model`` fit the plan; ``False`` otherwise
        (nothing has changed then)."""
        if self._versions() != self.versions:
            return False
        settings = [scalars.version for scalars in self.scalars]
        if settings != self.settings:  # a hyper-parameter changed: a switch (momentum 0?) may have too
            if not all(bucket.switches_hold() for bucket in self.buckets if isinstance(bucket, _FusedBucket)):
                return False
            self.settings = settings
        grads: list[Array] = []
        params: list[Array] = []
        try:
            _flatten_pair(gradients, model, grads, params)
        except (KeyError, IndexError, TypeError, AttributeError):
            return False
        if len(params) != len(self.params) or not all(map(_is, params, self.params)):
            return False
        prepared = [bucket.prepare(grads) for bucket in self.buckets]
        if any(p is None for p in prepared):
            return False
        due = [(group, group.scalars.due()) for group in self.stepping]  # may raise
        for group, values in due:
            group.scalars.advance(values)
        for bucket, ready in zip(self.buckets, prepared):
            bucket.run(ready)
        return True
