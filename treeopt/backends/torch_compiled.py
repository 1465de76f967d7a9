"""An elementwise rule run over a list of torch tensors as one ``torch.compile``d step.

The step calls the rule's own ``update`` once per tensor and copies the results back in place;
TorchDynamo traces it into one graph and Inductor fuses the whole list: on CUDA into a few
Triton kernels (with ``combo_kernels``, tensors of one step share kernels), on CPU into C++
loops. It is the accelerator runner of :mod:`treeopt.kernels.compiled_step` (on CPU, numba's
loops are the default; this runner is used there when asked, e.g. to test it).

Numeric coefficients (learning rate, bias corrections...) come in as a tensor with one row per
optimizer, so a new learning rate or step does not recompile; switches (booleans) and the list's
shapes and dtypes are part of the compiled step. Float32 results equal the per-tensor rule's up
to the compiler's fusion of multiply-adds (a rounding or two).
"""

from collections.abc import Callable, Sequence

import torch

#: torch.compile's backend: Inductor generates the fused kernels ("aot_eager" traces the same
#: graph without generating code: quick, for tests of the tracing)
COMPILER = "inductor"


def compile_step(
    update: Callable, slot_count: int, numeric: Sequence[str], switches: dict[str, bool], rows: list[int]
) -> Callable:
    """``step(grads, params, slots, table)``: ``update`` on every tensor, written in place.

    ``slots`` holds one list of tensors per slot; ``table[rows[i]]`` are tensor ``i``'s numeric
    coefficients, named ``numeric``; ``switches`` are passed as they are."""

    def step(grads, params, slots, table):
        for i in range(len(params)):
            row = table[rows[i]]
            values = {name: row[k] for k, name in enumerate(numeric)}
            new_param, *new_slots = update(grads[i], params[i], *(s[i] for s in slots), **values, **switches)
            for old, new in zip((s[i] for s in slots), new_slots):
                old.copy_(new)
            params[i].copy_(new_param)

    options = _options() if COMPILER == "inductor" else None
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=COMPILER, options=options)

    def run(grads, params, slots, table):
        with torch.no_grad():
            compiled(grads, params, slots, table)

    return run


class CoefficientTable:
    """The numeric coefficients of a compiled step: one row per optimizer, one column per
    coefficient, a tensor of ``like``'s dtype on its device (``tensor``)."""

    def __init__(self, rows: int, columns: int, like: torch.Tensor) -> None:
        self.tensor = torch.zeros((rows, columns), dtype=like.dtype, device=like.device)

    def write(self, values: Sequence[Sequence[float]]) -> None:
        """Put ``values`` (Python numbers, one list per row) in, each rounded once to the
        table's dtype: one copy to the device per step, queued behind the previous step."""
        host = torch.tensor(values, dtype=self.tensor.dtype)
        if self.tensor.device.type == "cuda":
            # From pageable memory, copy_ waits until the device has finished all queued work
            # (the previous step, the forward and backward): the host could not run ahead. From
            # pinned memory the copy is queued like a kernel; torch's pinned-memory cache keeps
            # ``host`` alive until the copy is done.
            self.tensor.copy_(host.pin_memory(), non_blocking=True)
        else:
            self.tensor.copy_(host)


def _options():
    # Inductor loads only when a step is compiled
    import torch._inductor.config as inductor

    # horizontal fusion of the tensors' kernels into few launches (Triton only). A combo kernel
    # takes 8 tensors' kernels by default: GPT-2's 148 tensors took 19 launches on an H200 (torch
    # 2.11, where 8 is fixed), each 45-95 us of the host's time, which is more than the device's
    # whole step. Where torch lets it be set, 32 per kernel keeps each kernel's arguments under
    # Inductor's limit (250 buffers; an AdamW tensor has 4 to 5). Not measured on a GPU yet.
    options: dict[str, bool | int] = {"combo_kernels": True} if hasattr(inductor, "combo_kernels") else {}
    if hasattr(inductor, "combo_kernel_max_num_nodes"):
        options["combo_kernel_max_num_nodes"] = 32
    return options
