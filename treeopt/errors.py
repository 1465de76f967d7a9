"""Errors that name the parameter path and what was wrong, and warnings that point at the
caller's line."""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


class TreeoptError(Exception):
    """Base class of treeopt's own errors."""


class ParameterError(TreeoptError, ValueError):
    """A parameter, gradient or state entry does not fit, at ``path``."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class MissingParameterError(ParameterError, KeyError):
    """A gradient (or state entry) has no parameter at its path."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


def describe(path: str | None) -> str:
    return "the root" if path in ("", None) else repr(path)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside treeopt."""
    frame: FrameType | None = sys._getframe(1)  # 1 is this function, 2 its caller
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
