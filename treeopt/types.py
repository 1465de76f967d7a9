"""Names for the types of the public API, for readers and type checkers.

treeopt works on the arrays of four libraries, none of which it imports, so an array is
``Any`` here; the names say what is expected.
"""

from collections.abc import Callable
from typing import Any

#: an array of NumPy, torch, JAX or MLX, or a Python number
Array = Any
#: dicts, lists and tuples of arrays and sub-trees (for ``update``, also an ``mlx.nn.Module``)
Tree = Any
#: a function of the step count (a scalar array) giving a hyper-parameter's value
Schedule = Callable[[Any], Any]
#: a hyper-parameter: a number, a scalar array, or a schedule (``Any``: the constructors check it)
Scalar = Any
#: ``filter(path, parameter) -> bool``: the dotted path (``"layers.0.weight"``) and the parameter
Filter = Callable[[str, Any], Any]
#: where a leaf sits in a tree: the dict keys and list indices from the root (``("layers", 0, "weight")``)
Keys = tuple[Any, ...]
#: an array's shape
Shape = tuple[int, ...]
#: an optimizer's state: ``step``, scalars, and one dict of slots per parameter, nested as the parameters
State = dict[str, Any]
#: hyper-parameters a route gives its rule for one parameter alone, on top of the optimizer's
#: (Muon's ``layout`` of a ``Conv1D``): ``(name, value)`` pairs, sorted by name
Options = tuple[tuple[str, Any], ...]

__all__ = ["Array", "Tree", "Schedule", "Scalar", "Filter", "Keys", "Shape", "State", "Options"]
