"""treeopt: the optimizers of ``mlx.optimizers`` on NumPy, PyTorch, JAX and MLX arrays.

    import treeopt as optim

gives the names, signatures, defaults and state layout of ``mlx.optimizers``; the tree
helpers of ``mlx.utils`` are in :mod:`treeopt.tree`.
"""

from treeopt import filters, precision, schedules, tree
from treeopt._version import __version__ as __version__
from treeopt.clip import clip_grad_norm
from treeopt.errors import MissingParameterError, ParameterError, TreeoptError
from treeopt.multi import MultiOptimizer, RoutingError, RoutingWarning
from treeopt.optimizer import Optimizer
from treeopt.optimizers import (
    SGD,
    AdaDelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    Adan,
    Lion,
    Muon,
    RMSprop,
    ScheduleFreeAdamW,
)
from treeopt.plan import Plan
from treeopt.precision import StatePrecision
from treeopt.presets import muon_adamw
from treeopt.schedules import cosine_decay, exponential_decay, join_schedules, linear_schedule, step_decay

schedulers = schedules  # the name mlx.optimizers uses


__all__ = [
    "Optimizer",
    "MultiOptimizer",
    "SGD",
    "RMSprop",
    "Adagrad",
    "AdaDelta",
    "Adam",
    "AdamW",
    "Adamax",
    "Lion",
    "Adafactor",
    "Muon",
    "ScheduleFreeAdamW",
    "Adan",
    "clip_grad_norm",
    "exponential_decay",
    "step_decay",
    "cosine_decay",
    "linear_schedule",
    "join_schedules",
    "muon_adamw",
    "StatePrecision",
    "Plan",
    "TreeoptError",
    "ParameterError",
    "MissingParameterError",
    "RoutingError",
    "RoutingWarning",
    "tree",
    "schedules",
    "filters",
    "precision",
]
