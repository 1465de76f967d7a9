"""The examples' data: 1,797 handwritten digits of 8x8 pixels (``digits.npz``, beside this
file; its source and licence are in README.md), split into training and test sets."""

import pathlib

import numpy as np

FILE = pathlib.Path(__file__).with_name("digits.npz")


def train_test_split(seed=0, test_fraction=0.2, dtype=np.float32):
    """``(x_train, y_train, x_test, y_test)``: the images as ``(n, 64)`` features, centred by
    the training set's per-pixel mean and scaled by its overall standard deviation, and the
    labels as int64; a shuffled split from ``seed``."""
    with np.load(FILE) as archive:
        images, labels = archive["images"], archive["labels"]
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = np.split(order, [round(len(labels) * test_fraction)])
    x = images.reshape(len(images), 64).astype(np.float64)
    mean = x[train].mean(axis=0)
    x = ((x - mean) / (x[train] - mean).std()).astype(dtype)
    y = labels.astype(np.int64)
    return x[train], y[train], x[test], y[test]
