"""Variational EM of a diffusion in the hard regime: no collapse of the learned diffusion.

A local-level model (a random walk observed with noise) on the Nile flow 1871–1970 (in hundreds
of 10⁸ m³), 2 Euler–Maruyama steps per year: the observation noise (variance ≈ 1.7) is far
larger than a step's signal (≈ 0.29), the prior of ``x_0`` (``N(0, 1)``) is ten prior sds from
the data, and both scales are ``pyro.param`` initialised at 1. The exact maximum-likelihood
estimate comes from the Kalman filter of the discretized model (the Euler–Maruyama chain of a
random walk is exact). Before issue 14, ``covariance="full"`` learned 0.17× the MLE process
variance after 3000 steps; the guide now starts at the exact conditional posterior (Laplace =
Kalman smoother for this linear model) and follows it as the scales move.
"""

from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_nsde import EulerMaruyama, GirsanovGuide, fit_svi

NILE = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "nile.csv"
STEPS_PER_YEAR = 2


def nile() -> torch.Tensor:
    flow = np.loadtxt(NILE, delimiter=",", skiprows=1)[:, 1]
    return torch.tensor(flow / 100.0, dtype=torch.float64)


def kalman_log_likelihood(y, process_var, obs_var):
    """``log p(y)`` of the local-level model with ``x_0 ~ N(0, 1)``, unit gaps (exact)."""
    mean, var, total = torch.zeros(()), torch.ones(()), torch.zeros(())
    for n in range(len(y)):
        if n > 0:
            var = var + process_var
        s = var + obs_var
        r = y[n] - mean
        total = total - 0.5 * (torch.log(2 * torch.pi * s) + r * r / s)
        gain = var / s
        mean, var = mean + gain * r, var * (1 - gain)
    return total


def mle(y):
    """The exact MLE of ``(process variance, observation variance)`` by L-BFGS on log scales."""
    log_vars = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_vars], max_iter=200, tolerance_grad=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = -kalman_log_likelihood(y, *log_vars.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_vars.detach().exp()


def local_level_model(y):
    times = torch.linspace(0.0, len(y) - 1.0, (len(y) - 1) * STEPS_PER_YEAR + 1)
    obs = torch.arange(0, len(times), STEPS_PER_YEAR)

    def model(data):
        sigma = pyro.param("sigma", torch.tensor(1.0), constraint=dist.constraints.positive)
        tau = pyro.param("tau", torch.tensor(1.0), constraint=dist.constraints.positive)
        init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
        x = pyro.sample(
            "x", EulerMaruyama(lambda t, x: torch.zeros_like(x), sigma.reshape(1), init, times)
        )
        pyro.sample("y", dist.Normal(x[..., obs, 0], tau).to_event(1), obs=data)

    return model


@pytest.mark.slow
def test_learned_diffusion_reaches_the_mle_with_a_full_covariance_guide():
    y = nile()
    process_var, obs_var = mle(y)
    model = local_level_model(y.float())
    guide = GirsanovGuide(model, control="affine", covariance="full")
    fit_svi(model, guide, y.float(), steps=600, warmup=0, progress=False)
    sigma2 = pyro.param("sigma").item() ** 2
    tau2 = pyro.param("tau").item() ** 2
    assert sigma2 == pytest.approx(float(process_var), rel=0.05)
    assert tau2 == pytest.approx(float(obs_var), rel=0.05)


def mean_shift_optimum(y):
    """The ``(process variance, observation variance)`` that a mean-shift guide's variational
    EM converges to: the maximum of ``log p(y) - mean_shift_gap`` (exact dense reference)."""
    from reference import LinearGaussianPath
    from scipy.optimize import minimize

    times = torch.linspace(0.0, len(y) - 1.0, (len(y) - 1) * STEPS_PER_YEAR + 1)
    obs = list(range(0, len(times), STEPS_PER_YEAR))

    def objective(log_vars):
        sigma, tau2 = np.exp(0.5 * log_vars[0]), np.exp(log_vars[1])
        path = LinearGaussianPath([[0.0]], [0.0], [[sigma]], [0.0], [[1.0]], times)
        posterior = path.observe([[1.0]], obs, [[tau2]], y)
        return -(posterior.log_py - posterior.mean_shift_gap())

    result = minimize(objective, np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-4})
    return np.exp(result.x)


@pytest.mark.slow
def test_mean_shift_guide_reaches_its_own_optimum():
    """With ``covariance="prior"`` the learned scales are biased (the mean-shift family cannot
    narrow the steps), but EM must reach that family's own optimum, not collapse below it."""
    y = nile()
    process_var, obs_var = mean_shift_optimum(y)
    model = local_level_model(y.float())
    guide = GirsanovGuide(model, control="affine", covariance="prior")
    with pytest.warns(UserWarning, match="covariance='prior'"):
        fit_svi(model, guide, y.float(), steps=600, warmup=0, progress=False)
    sigma2 = pyro.param("sigma").item() ** 2
    tau2 = pyro.param("tau").item() ** 2
    assert sigma2 == pytest.approx(float(process_var), rel=0.10)
    assert tau2 == pytest.approx(float(obs_var), rel=0.10)
