"""Joint posteriors of an SDE's parameters and its path: ``q(path | θ)`` follows the drawn ``θ``.

An OU model with a prior on its rate ``θ``, precise observations. For each guide family the
guide is conditioned on two values of ``θ`` (``poutine.condition`` on the guide, as any Pyro
guide) and its posterior mean path is compared with the exact conditional posterior
``p(path | θ, y)`` (the dense Gaussian reference of ``tests/reference.py``). The Laplace start is
fitted at the prior median ``θ = 1``:

- ``conditional="kalman"`` (affine control): the smoother of the (linear) model at each drawn
  ``θ`` — exact at every ``θ``;
- ``conditional="taylor"`` (linear control, the parallel-in-time family): coefficients affine in
  ``log θ`` with slopes from the Laplace fit — exact to first order around ``θ = 1``;
- ``conditional=None``: the coefficients do not depend on ``θ``, so the path misses the change
  (the mean-field behaviour the issue describes).

The guide's ``q(x_0)`` follows ``θ`` too (from the smoother, or with its own slopes).
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from reference import LinearGaussianPath

from pyro_nsde import EulerMaruyama, GirsanovGuide

TIMES = torch.linspace(0.0, 2.0, 41, dtype=torch.float64)
OBS = list(range(5, 41, 5))
SIGMA, NOISE = 0.7, 0.1
Y = torch.sin(3 * TIMES[OBS])


def model(y):
    theta = pyro.sample("theta", dist.LogNormal(torch.tensor(0.0, dtype=torch.float64), 0.5))
    init = dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0).to_event(1)
    diffusion = torch.tensor([SIGMA], dtype=torch.float64)
    x = pyro.sample("x", EulerMaruyama(lambda t, x: -theta[..., None] * x, diffusion, init, TIMES))
    pyro.sample("y", dist.Normal(x[..., OBS, 0], NOISE).to_event(1), obs=y)


def exact_mean_path(theta: float) -> torch.Tensor:
    path = LinearGaussianPath([[-theta]], [0.0], [[SIGMA]], [0.0], [[1.0]], TIMES)
    mean, _ = path.observe([[1.0]], OBS, [[NOISE**2]], Y.unsqueeze(-1)).marginals()
    return mean[:, 0]


def guide_mean_path(guide, theta: float, num_samples: int = 4000) -> torch.Tensor:
    conditioned = poutine.condition(guide, data={"theta": torch.tensor(theta, dtype=torch.float64)})
    predictive = Predictive(
        model, guide=conditioned, num_samples=num_samples, return_sites=["x"], parallel=True
    )
    with torch.no_grad():
        return predictive(Y)["x"].reshape(num_samples, -1).mean(0)


@pytest.mark.parametrize(
    "control, conditional, theta, tolerance",
    [
        ("affine", "kalman", 0.5, 0.02),
        ("affine", "kalman", 2.5, 0.02),
        ("linear", "taylor", 0.5, 0.03),
        ("linear", "taylor", 1.4, 0.03),
    ],
)
def test_conditional_path_follows_the_drawn_rate(control, conditional, theta, tolerance):
    guide = GirsanovGuide(model, control=control, covariance="full", conditional=conditional)
    guide(Y)
    error = (guide_mean_path(guide, theta) - exact_mean_path(theta)).abs().max()
    # What following θ is worth: the conditional mean moves by more than the tolerance.
    shift = (exact_mean_path(theta) - exact_mean_path(1.0)).abs().max()
    assert shift > 2 * tolerance
    assert error < tolerance, (float(error), float(shift))


@pytest.mark.parametrize("control", ["affine", "linear"])
def test_without_conditioning_the_path_misses_the_rate(control):
    """The coefficients fitted at the prior median do not follow θ = 2.5: the guide's mean path
    is further from the exact conditional one than the exact one moved."""
    guide = GirsanovGuide(model, control=control, covariance="full", conditional=None)
    guide(Y)
    error = (guide_mean_path(guide, 2.5) - exact_mean_path(2.5)).abs().max()
    shift = (exact_mean_path(2.5) - exact_mean_path(1.0)).abs().max()
    assert error > 0.8 * shift, (float(error), float(shift))
