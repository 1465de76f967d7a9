"""The version of treeopt (``treeopt.__version__``), which checkpoints record."""

__version__ = "0.1.0"
