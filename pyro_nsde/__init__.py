"""pyro-nsde: neural stochastic differential equations as Pyro models.

Public API: the path law :class:`EulerMaruyama` and its Girsanov posterior
:class:`GirsanovEulerMaruyama` (and its Gauss–Markov form :class:`GaussMarkovEulerMaruyama`), the
guide :class:`GirsanovGuide`, the controls :class:`ControlNet`, :class:`AffineControl` and
:class:`LinearControl`, ArviZ conversion :func:`to_inference_data`, forecasting, diagnostics,
training and checkpoints. The packages name the architecture (``docs/architecture.md``):

- :mod:`pyro_nsde.sde`: the path law and its numerics;
- :mod:`pyro_nsde.posterior`: posterior path families and Gaussian machinery;
- :mod:`pyro_nsde.guide`: the guide, composed of parts;
- :mod:`pyro_nsde.analysis`: ArviZ, importance sampling, forecasts, prediction, plots;
- :mod:`pyro_nsde.zoo`: ready-made models, networks, encoders, data;
- :mod:`pyro_nsde.app`: the command line, the training loop, checkpoints, distributed SVI.
"""

from .analysis.diagnostics import VariationalDiagnostics, variational_diagnostics
from .analysis.forecast import forecast
from .analysis.inference_data import to_inference_data
from .analysis.predict import predictive_paths, solve_sde
from .app.checkpoint import load_checkpoint, save_checkpoint
from .app.numerics import CheckedSVI, find_nonfinite_site
from .app.training import fit_svi
from .guide.guide import GirsanovGuide
from .posterior.controls import AffineControl, ControlNet
from .posterior.gauss_markov import GaussMarkovEulerMaruyama, LinearControl
from .posterior.girsanov import GirsanovEulerMaruyama
from .sde.euler_maruyama import EulerMaruyama
from .sde.subsample import subsample_steps
from .zoo import datasets as datasets
from .zoo.encoders import GRUEncoder
from .zoo.nn import DiffusionNet, DriftNet, PosteriorDriftControl, TimeFeatures
from .zoo.series import GriddedSeries, common_grid, series_grids

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
    "subsample_steps",
    "to_inference_data",
    "variational_diagnostics",
]
