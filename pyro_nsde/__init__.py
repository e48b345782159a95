"""pyro-nsde: neural stochastic differential equations as Pyro models.

Public API: the path law :class:`EulerMaruyama` and its Girsanov posterior
:class:`GirsanovEulerMaruyama`, the guide :class:`GirsanovGuide`, the controls
:class:`ControlNet` and :class:`AffineControl`, ArviZ conversion :func:`to_inference_data`,
forecasting, diagnostics and checkpoints. Plots live in :mod:`pyro_nsde.plots`.
"""

from . import datasets as datasets
from .checkpoint import load_checkpoint, save_checkpoint
from .controls import AffineControl, ControlNet
from .diagnostics import VariationalDiagnostics, to_inference_data, variational_diagnostics
from .euler_maruyama import EulerMaruyama
from .forecast import forecast
from .girsanov import GirsanovEulerMaruyama
from .guide import GirsanovGuide
from .numerics import CheckedSVI, find_nonfinite_site

__version__ = "0.1.0"

__all__ = [
    "AffineControl",
    "CheckedSVI",
    "ControlNet",
    "EulerMaruyama",
    "GirsanovEulerMaruyama",
    "GirsanovGuide",
    "VariationalDiagnostics",
    "find_nonfinite_site",
    "forecast",
    "load_checkpoint",
    "save_checkpoint",
    "to_inference_data",
    "variational_diagnostics",
]
