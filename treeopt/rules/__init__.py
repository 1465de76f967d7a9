"""The update math of every optimizer, each written once (see :mod:`treeopt.rules.base`)."""

from treeopt.rules.adadelta import ADADELTA
from treeopt.rules.adafactor import ADAFACTOR
from treeopt.rules.adagrad import ADAGRAD
from treeopt.rules.adam import ADAM, ADAMAX, ADAMW
from treeopt.rules.adan import ADAN
from treeopt.rules.base import Rule
from treeopt.rules.lion import LION
from treeopt.rules.muon import MUON
from treeopt.rules.rmsprop import RMSPROP
from treeopt.rules.schedule_free import SCHEDULE_FREE_ADAMW
from treeopt.rules.sgd import SGD

__all__ = [
    "Rule",
    "SGD",
    "RMSPROP",
    "ADAGRAD",
    "ADADELTA",
    "ADAM",
    "ADAMW",
    "ADAMAX",
    "LION",
    "ADAFACTOR",
    "MUON",
    "ADAN",
    "SCHEDULE_FREE_ADAMW",
]
