"""The 8x8 handwritten digits shipped with the demo, and a seeded train/test split.

The data set lives in ``data/digits.npz`` next to this module (see ``data/README.md`` for
its source and licence); nothing is downloaded.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

NUM_CLASSES = 10
NUM_PIXELS = 64


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digit images and their labels.

    Returns:
        ``(images, labels)``: uint8 arrays of shape ``(1797, 8, 8)`` (pixel values 0..16)
        and ``(1797,)`` (digits 0..9).
    """
    with resources.files(__package__).joinpath("data").joinpath("digits.npz").open("rb") as file:
        with np.load(file) as archive:
            return archive["images"], archive["labels"]


def train_test_split(
    seed: int = 0, test_fraction: float = 0.2, dtype: DTypeLike = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded, shuffled split of the digits into inputs ready for the model.

    Pixels become ``dtype`` features of shape ``(n, 64)``, centred by the training set's
    per-pixel mean and scaled by its overall standard deviation (per-pixel scaling would
    blow up the border pixels that are almost always 0).

    Returns:
        ``(x_train, y_train, x_test, y_test)``; labels are int64.
    """
    images, labels = load_digits()
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    x = images.reshape(len(images), NUM_PIXELS).astype(np.float64)
    mean = x[train].mean(axis=0)
    std = (x[train] - mean).std()
    x = ((x - mean) / std).astype(dtype)
    y = labels.astype(np.int64)
    return x[train], y[train], x[test], y[test]
