"""The path law and its numerics: :class:`EulerMaruyama` (the Euler–Maruyama discretization of
an Itô SDE as a Pyro distribution), its time grid, noise types, simulation, the path sites of
Pyro models and argument checks."""

from .euler_maruyama import EulerMaruyama

__all__ = ["EulerMaruyama"]
