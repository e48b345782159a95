"""pyro-nsde: neural stochastic differential equations as Pyro models.

Public API: the path law :class:`EulerMaruyama` and its Girsanov posterior
:class:`GirsanovEulerMaruyama` (and its Gauss–Markov form :class:`GaussMarkovEulerMaruyama`), the
guide :class:`GirsanovGuide`, the controls :class:`ControlNet`, :class:`AffineControl` and
:class:`LinearControl`, ArviZ conversion :func:`to_inference_data`,
forecasting, diagnostics and checkpoints. Plots live in :mod:`pyro_nsde.plots`.
"""

from . import datasets as datasets
from .checkpoint import load_checkpoint, save_checkpoint
from .controls import AffineControl, ControlNet
from .diagnostics import VariationalDiagnostics, to_inference_data, variational_diagnostics
from .encoders import GRUEncoder
from .euler_maruyama import EulerMaruyama
from .forecast import forecast
from .gauss_markov import GaussMarkovEulerMaruyama, LinearControl
from .girsanov import GirsanovEulerMaruyama
from .guide import GirsanovGuide
from .nn import DiffusionNet, DriftNet, PosteriorDriftControl, TimeFeatures
from .numerics import CheckedSVI, find_nonfinite_site
from .predict import predictive_paths, solve_sde
from .series import GriddedSeries, common_grid, series_grids
from .training import fit_svi

__version__ = "0.1.0"

__all__ = [
    "AffineControl",
    "CheckedSVI",
    "ControlNet",
    "DiffusionNet",
    "DriftNet",
    "EulerMaruyama",
    "GRUEncoder",
    "GaussMarkovEulerMaruyama",
    "GirsanovEulerMaruyama",
    "GirsanovGuide",
    "GriddedSeries",
    "LinearControl",
    "PosteriorDriftControl",
    "TimeFeatures",
    "VariationalDiagnostics",
    "common_grid",
    "find_nonfinite_site",
    "fit_svi",
    "forecast",
    "load_checkpoint",
    "predictive_paths",
    "save_checkpoint",
    "series_grids",
    "solve_sde",
    "to_inference_data",
    "variational_diagnostics",
]
