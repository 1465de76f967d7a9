"""``python -m treeopt.demo`` (the GPT) and ``python -m treeopt.demo digits`` (the NumPy MLP):
see :mod:`treeopt.demo.cli`."""

from treeopt.demo.cli import main

if __name__ == "__main__":  # not on import (pytest --doctest-modules imports every module)
    main()
