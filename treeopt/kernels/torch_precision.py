"""The accelerator runner of an elementwise rule whose slots are stored compactly
(``state_dtype``): the formats' own array code (:mod:`treeopt.precision.formats`) around the
rule's ``update``, for every tensor of a group, as one ``torch.compile``d step. Inductor fuses
reading the codes, the rule, the block maximum and writing the codes and scales into a few
kernels per tensor (and horizontally across tensors). The step count enters as a tensor, so
stochastic rounding's bits change every step without a new compile.
"""

from __future__ import annotations

from typing import Any

import torch

from treeopt.backends import torch_compiled
from treeopt.backends.torch_compiled import CoefficientTable
from treeopt.kernels.compiled_step import _fuse, _numeric_names, _settings, _TorchCompiledBucket
from treeopt.precision import Layout, Noise


def compile_stored_step(
    update: Any,
    names: tuple[str, ...],
    layouts: list[Layout],
    noises: list[tuple[int, str]],
    numeric: list[str],
    switches: dict[str, bool],
    rows: list[int],
) -> Any:
    """``step(grads, params, entries, table, count)``: ``update`` on every tensor with its
    slots read from and stored back into ``entries[i]`` (``{key: tensor}``) as ``layouts[i]``
    says; ``noises[i]`` is its ``(seed, path)``; ``count`` the step (a 0-d int64 tensor)."""
    from treeopt.backends import get_backend

    backend = get_backend("torch")
    starts = [{n: Noise(seed, path, 0).start(n) for n in names} for seed, path in noises]  # hashes of names: not traced

    def step(grads, params, entries, table, count):
        for i in range(len(params)):
            row = table[rows[i]]
            values = {name: row[k] for k, name in enumerate(numeric)}
            layout, stored = layouts[i], entries[i]
            loaded = [layout.forms[n].load(backend, stored, n, layout.compute) for n in names]
            new_param, *new_slots = update(grads[i], params[i], *loaded, **values, **switches)
            noise = Noise(noises[i][0], noises[i][1], count, starts=starts[i])
            for name, value in zip(names, new_slots):
                for key, array in layout.forms[name].encode(backend, name, value, noise).items():
                    stored[key].copy_(array)
            params[i].copy_(new_param)

    options = torch_compiled._options() if torch_compiled.COMPILER == "inductor" else None
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=torch_compiled.COMPILER, options=options)

    def run(grads, params, entries, table, count):
        with torch.no_grad():
            compiled(grads, params, entries, table, count)

    return run


class TorchStoredBucket(_TorchCompiledBucket):
    """Leaves of one elementwise rule, dtype and device (torch) whose slots are stored
    compactly, from one or more optimizers, run as one compiled step."""

    def __init__(
        self,
        groups: list[tuple[Any, list[Any], list[int]]],
        backend: Any,
        static: tuple[str, ...],
        flags: tuple[Any, ...],
    ) -> None:
        leaves, rows, rule = _fuse(self, groups, backend, static, flags)
        self.numeric = _numeric_names(rule, static)
        self.hyper = [_settings(owner) for owner in self.owners]
        self.params = [leaf.param for leaf in leaves]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.strides = [p.stride() for p in self.params]
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.entries = [dict(leaf.slots) for leaf in leaves]
        owners = [self.owners[r] for r in rows]
        layouts = [o.state_layout(s, backend.dtype_name(p)) for o, s, p in zip(owners, self.shapes, self.params)]
        noises = [(o.precision.seed, leaf.path) for o, leaf in zip(owners, leaves)]
        self.table = CoefficientTable(len(self.owners), len(self.numeric), self.params[0])
        self.count = torch.zeros((), dtype=torch.int64, device=self.device)
        self.step = compile_stored_step(
            rule.update, tuple(rule.slots), layouts, noises, self.numeric, dict(zip(static, flags)), rows
        )

    def run(self, grads: list[torch.Tensor]) -> None:
        values = []
        for owner in self.owners:
            coefficients = owner.coefficients(self.params[0], self.backend)
            values.append([float(coefficients[n]) for n in self.numeric])
        self.table.write(values)
        self.count.fill_(self.owners[0].noise_step())  # the optimizers of a fused group step together
        self.step(grads, self.params, self.entries, self.table.tensor, self.count)
