"""pyro-nsde: neural stochastic differential equations as Pyro models.

Public API (see ``API.md``): :class:`EulerMaruyama`, :class:`GirsanovGuide`,
:class:`ControlNet`, :class:`AffineControl`.
"""

from .controls import AffineControl, ControlNet
from .euler_maruyama import EulerMaruyama
from .girsanov import GirsanovEulerMaruyama
from .guide import GirsanovGuide

__version__ = "0.1.0"

__all__ = [
    "AffineControl",
    "ControlNet",
    "EulerMaruyama",
    "GirsanovEulerMaruyama",
    "GirsanovGuide",
]
