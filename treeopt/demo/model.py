"""A small multi-layer perceptron in pure NumPy, with a hand-written backward pass.

The parameters are a nested dict, laid out like an ``mlx.nn`` model so that their dotted
paths read ``embed.weight``, ``layers.0.weight``, ``head.bias``::

    {"embed":  {"weight": (hidden, inputs), "bias": (hidden,)},
     "layers": [{"weight": (hidden, hidden), "bias": (hidden,)}, ...],
     "head":   {"weight": (classes, hidden), "bias": (classes,)}}

Each layer computes ``x @ weight.T + bias`` (weights are ``(out, in)``, as in
``mlx.nn.Linear``), every layer but the head is followed by a GELU, and the loss is the
mean softmax cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from treeopt.tree import tree_flatten
from treeopt.types import Tree

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

#: inputs, hidden widths, classes: 64 pixels -> three hidden layers of 128 -> 10 digits
DEFAULT_SIZES = (64, 128, 128, 128, 10)

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def init_mlp(sizes: Sequence[int] = DEFAULT_SIZES, seed: int = 0, dtype: DTypeLike = np.float32) -> dict[str, Any]:
    """New parameters for an MLP with layer widths ``sizes`` (at least 3: inputs, one
    hidden width, classes).

    Weights and biases are drawn from U(-1/sqrt(in), 1/sqrt(in)), the initialisation of
    ``mlx.nn.Linear``, so the model starts as an MLX user's would.
    """
    if len(sizes) < 3:
        raise ValueError(f"an MLP needs at least 3 sizes (inputs, hidden, classes), got {sizes}")
    rng = np.random.default_rng(seed)

    def linear(n_in, n_out):
        scale = 1.0 / math.sqrt(n_in)
        return {
            "weight": rng.uniform(-scale, scale, (n_out, n_in)).astype(dtype),
            "bias": rng.uniform(-scale, scale, (n_out,)).astype(dtype),
        }

    pairs = list(zip(sizes[:-1], sizes[1:]))
    return {"embed": linear(*pairs[0]), "layers": [linear(*pair) for pair in pairs[1:-1]], "head": linear(*pairs[-1])}


def linear_layers(params: Tree) -> list[dict[str, np.ndarray]]:
    """The model's linear layers in the order the input meets them."""
    return [params["embed"], *params["layers"], params["head"]]


def gelu(z: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (``mlx.nn.gelu_approx``); smooth, which keeps the
    finite-difference check exact up to rounding (ReLU's kink would not)."""
    return 0.5 * z * (1.0 + np.tanh(_GELU_K * (z + _GELU_C * z**3)))


def gelu_grad(z: np.ndarray) -> np.ndarray:
    """The derivative of :func:`gelu`."""
    t = np.tanh(_GELU_K * (z + _GELU_C * z**3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _GELU_K * (1.0 + 3.0 * _GELU_C * z * z)


def forward(params: Tree, x: np.ndarray) -> tuple[np.ndarray, tuple[list[np.ndarray], list[np.ndarray]]]:
    """The logits for inputs ``x`` of shape ``(batch, inputs)``, and what the backward pass
    needs: each layer's input and each hidden layer's pre-activation."""
    layers = linear_layers(params)
    inputs: list[np.ndarray] = []
    preacts: list[np.ndarray] = []
    h = x
    for i, layer in enumerate(layers):
        inputs.append(h)
        z = h @ layer["weight"].T + layer["bias"]
        if i == len(layers) - 1:
            return z, (inputs, preacts)
        preacts.append(z)
        h = gelu(z)
    raise AssertionError("unreachable: the head returns")  # linear_layers gives at least two


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """The mean softmax cross-entropy, and the softmax probabilities."""
    shifted = logits - logits.max(axis=1, keepdims=True)  # no overflow in exp
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    log_likelihood = shifted[np.arange(len(labels)), labels] - np.log(total[:, 0])
    return float(-log_likelihood.mean()), exp / total


def loss(params: Tree, x: np.ndarray, labels: np.ndarray) -> float:
    """The mean cross-entropy of the model on ``(x, labels)``."""
    return cross_entropy(forward(params, x)[0], labels)[0]


def loss_and_grads(params: Tree, x: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, Any]]:
    """The mean cross-entropy and its gradient with respect to every parameter.

    Returns:
        ``(loss, grads)``: a float, and a tree with the structure, shapes and dtypes of
        ``params``.
    """
    logits, (inputs, preacts) = forward(params, x)
    value, probs = cross_entropy(logits, labels)
    # d loss / d logits of a mean softmax cross-entropy: (softmax - one_hot) / batch
    delta = probs
    delta[np.arange(len(labels)), labels] -= 1.0
    delta /= len(labels)

    layers = linear_layers(params)
    grads: list[Any] = [None] * len(layers)
    for i in reversed(range(len(layers))):
        grads[i] = {"weight": delta.T @ inputs[i], "bias": delta.sum(axis=0)}
        if i > 0:  # back through this layer's weight and the previous layer's GELU
            delta = (delta @ layers[i]["weight"]) * gelu_grad(preacts[i - 1])
    return value, {"embed": grads[0], "layers": grads[1:-1], "head": grads[-1]}


def accuracy(params: Tree, x: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of ``x`` whose most likely class is its label."""
    return float((forward(params, x)[0].argmax(axis=1) == labels).mean())


def check_gradients(
    sizes: Sequence[int] = (6, 5, 5, 5, 4), batch: int = 7, seed: int = 0, eps: float = 1e-6
) -> dict[str, float]:
    """Compare :func:`loss_and_grads` with central finite differences on a tiny float64
    model, entry by entry.

    Returns:
        ``{dotted path: relative error}`` with the error
        ``|analytic - numeric| / (|analytic| + |numeric|)`` (norms over the parameter); a
        correct backward pass gives about 1e-9 or less. Takes a few milliseconds.
    """
    rng = np.random.default_rng(seed)
    params = init_mlp(sizes, seed=seed, dtype=np.float64)
    x = rng.standard_normal((batch, sizes[0]))
    labels = rng.integers(0, sizes[-1], batch)
    _, grads = loss_and_grads(params, x, labels)

    errors = {}
    analytic = dict(tree_flatten(grads))
    for path, param in tree_flatten(params):
        numeric = np.zeros_like(param)
        for index in np.ndindex(param.shape):
            saved = param[index]
            param[index] = saved + eps
            above = loss(params, x, labels)
            param[index] = saved - eps
            below = loss(params, x, labels)
            param[index] = saved
            numeric[index] = (above - below) / (2 * eps)
        difference = np.linalg.norm(analytic[path] - numeric)
        scale = np.linalg.norm(analytic[path]) + np.linalg.norm(numeric)
        errors[path] = float(difference / scale) if scale > 0 else 0.0
    return errors
