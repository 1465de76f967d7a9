"""``python -m treeopt.demo``: see :mod:`treeopt.demo.harness.cli`."""

from treeopt.demo.harness.cli import main

if __name__ == "__main__":  # not on import (pytest --doctest-modules imports every module)
    main()
