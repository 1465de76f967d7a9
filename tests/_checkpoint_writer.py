"""Saves checkpoints to one path in a loop, for test_checkpoint_files' SIGKILL test.

    python _checkpoint_writer.py PATH ELEMENTS START

Save number ``i`` (from START) holds every slot filled with ``i`` and learning rate ``i``;
after each save returns it prints ``i``, so the test knows which saves completed.
"""

import sys

import numpy as np

import treeopt as optim
from treeopt import checkpoint


def state_for(elements):
    params = {
        "big": {"a": np.zeros(elements, np.float32), "b": np.zeros((elements // 64, 64), np.float32)},
        "small": np.zeros(3, np.float32),
    }
    opt = optim.SGD(1.0, momentum=0.9)
    opt.init(params)
    return opt


def fill(opt, value):
    for _, slots in opt.store.items():
        for array in slots.values():
            array[...] = value
    opt.learning_rate = float(value)


def main():
    path, elements, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    opt = state_for(elements)
    i = start
    while True:
        fill(opt, i)
        checkpoint.save(opt, path)
        print(i, flush=True)
        i += 1


if __name__ == "__main__":
    main()
