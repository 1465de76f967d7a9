"""treeopt in PyTorch: :class:`Optimizer` is a ``torch.optim.Optimizer`` whose step is a
treeopt optimizer (see ``docs/torch.md``).

    import treeopt, treeopt.torch

    opt = treeopt.torch.Optimizer(model, treeopt.muon_adamw())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 3e-4, 3e-4], total_steps=1000,
                                                    cycle_momentum=False)
    for x, y in data:
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
"""

from treeopt.torch.names import WRAPPER_SEGMENTS, canonical_name, module_kinds, named_parameters
from treeopt.torch.optimizer import Optimizer

__all__ = ["Optimizer", "canonical_name", "named_parameters", "module_kinds", "WRAPPER_SEGMENTS"]
