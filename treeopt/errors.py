"""Errors that name the parameter path and what was wrong."""


class TreeoptError(Exception):
    """Base class of treeopt's own errors."""


class ParameterError(TreeoptError, ValueError):
    """A parameter, gradient or state entry does not fit, at ``path``."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path


class MissingParameterError(ParameterError, KeyError):
    """A gradient (or state entry) has no parameter at its path."""

    def __str__(self):  # KeyError would quote the whole message
        return self.args[0]


def describe(path) -> str:
    return "the root" if path in ("", None) else repr(path)
