"""Posterior path families and their Gaussian machinery: the Girsanov posterior
(:class:`GirsanovEulerMaruyama`), its controls, the Gauss–Markov posterior sampled by a parallel
scan (:class:`GaussMarkovEulerMaruyama`), Kalman smoothing and Laplace approximations."""

from .controls import AffineControl, ControlNet
from .gauss_markov import GaussMarkovEulerMaruyama, LinearControl
from .girsanov import GirsanovEulerMaruyama

__all__ = [
    "AffineControl",
    "ControlNet",
    "GaussMarkovEulerMaruyama",
    "GirsanovEulerMaruyama",
    "LinearControl",
]
