"""Posterior forecasts (:func:`~pyro_nsde.analysis.forecast.forecast`) against exact predictive
laws.

For the Ornstein–Uhlenbeck SDE ``dX = -θ X dt + σ dW`` the Euler–Maruyama chain on a forecast
grid ``t_K = s_0 < s_1 < ...`` from ``x(s_0) ~ N(m_0, v_0)`` is Gaussian with

    ``m_{j+1} = (1 - θ h_j) m_j``,  ``v_{j+1} = (1 - θ h_j)² v_j + σ² h_j``,

and with ``(m_0, v_0)`` the exact posterior marginal of ``x_K`` (``tests/reference.py``) this is
the exact predictive law of the model. The forecasts are fed exact posterior draws, so they are
checked independently of any inference.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from reference import LinearGaussianPath

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.analysis import to_inference_data
from pyro_nsde.analysis.forecast import forecast

THETA, SIGMA, NOISE = 1.2, 0.6, 0.2
TIMES = torch.linspace(0.0, 2.0, 21)
OBS_STEPS = [5, 10, 15, 20]
Y = torch.tensor([0.8, 0.3, -0.4, 0.6])
FUTURE = torch.tensor([2.1, 2.25, 2.5, 3.0, 4.0])


def ou_model(y=None):
    init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
    prior = EulerMaruyama(lambda t, x: -THETA * x, torch.tensor([SIGMA]), init, TIMES)
    x = pyro.sample("x", prior)
    pyro.sample("y", dist.Normal(x[..., OBS_STEPS, 0], NOISE).to_event(1), obs=y)


def exact_posterior_paths(num_draws):
    path = LinearGaussianPath([[-THETA]], [0.0], [[SIGMA]], [0.0], [[1.0]], TIMES)
    posterior = path.observe([[1.0]], OBS_STEPS, [[NOISE**2]], Y)
    chol = torch.linalg.cholesky(posterior.cov_w)
    w = posterior.mu_w + torch.randn(num_draws, chol.shape[0], dtype=torch.float64) @ chol.T
    paths = (w @ path.T.T + path.c).reshape(num_draws, len(TIMES), 1)
    mean, sd = posterior.marginals()
    return paths.float(), float(mean[-1, 0]), float(sd[-1, 0]) ** 2


def test_ou_forecast_matches_the_exact_predictive_mean_and_variance():
    num_draws = 4000
    paths, mean, var = exact_posterior_paths(num_draws)
    result = forecast(ou_model, {"x": paths}, FUTURE, model_args=(Y,))
    assert result.dims == ("chain", "draw", "time", "state")
    assert result.shape == (1, num_draws, len(FUTURE), 1)
    np.testing.assert_allclose(result["time"].values, FUTURE.numpy())
    draws = result.values.reshape(num_draws, len(FUTURE)).astype(float)
    previous = TIMES[-1].item()
    for j, time in enumerate(FUTURE.tolist()):
        h = time - previous
        mean, var = (1 - THETA * h) * mean, (1 - THETA * h) ** 2 * var + SIGMA**2 * h
        previous = time
        assert abs(draws[:, j].mean() - mean) < 4 * math.sqrt(var / num_draws)
        assert abs(draws[:, j].var() / var - 1) < 4 * math.sqrt(2 / num_draws)


def test_each_draw_is_continued_with_its_own_parameters():
    """Half the draws have ``θ = 0.5``, half ``θ = 3``, all end at ``x_K = 1``: the conditional
    forecast means are ``Π_j (1 - θ h_j)`` for each half."""
    times = torch.linspace(0.0, 1.0, 5)

    def model():
        theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
        init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
        drift = lambda t, x: -theta[..., None] * x  # noqa: E731
        pyro.sample("x", EulerMaruyama(drift, torch.tensor([0.3]), init, times))

    half = 2000
    theta = torch.cat([torch.full((half,), 0.5), torch.full((half,), 3.0)])
    paths = torch.ones(2 * half, 5, 1)
    future = torch.tensor([1.1, 1.2, 1.3])
    result = forecast(model, {"theta": theta, "x": paths}, future)
    draws = result.values.reshape(2 * half, 3)
    for rows, rate in ((slice(0, half), 0.5), (slice(half, None), 3.0)):
        expected = (1 - rate * 0.1) ** np.arange(1, 4)
        sd = 0.3 * math.sqrt(0.3)
        np.testing.assert_allclose(draws[rows].mean(0), expected, atol=4 * sd / math.sqrt(half))


def test_forecast_of_series_from_an_arviz_fit_keeps_its_layout():
    series_times = torch.stack([torch.linspace(0.0, 1.0, 6), torch.linspace(0.0, 2.0, 6)])

    def model(y=None):
        theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
        with pyro.plate("series", 2, dim=-1):
            init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
            drift = lambda t, x: -theta[..., None] * x  # noqa: E731
            x = pyro.sample("x", EulerMaruyama(drift, torch.tensor([0.5]), init, series_times))
            pyro.sample("y", dist.Normal(x[..., -1, 0], 0.1), obs=y)

    y = torch.tensor([0.5, -0.5])
    guide = GirsanovGuide(model, control="affine")
    guide(y)
    idata = to_inference_data(
        model, guide=guide, model_args=(y,), num_samples=30, num_chains=2,
        coords={"series": ["a", "b"]},
    )  # fmt: skip
    future = torch.stack([torch.tensor([1.5, 2.0, 3.0]), torch.tensor([2.5, 3.0, 4.0])])
    result = forecast(model, idata, future, model_args=(y,))
    assert result.dims == ("chain", "draw", "series", "time", "state")
    assert result.shape == (2, 30, 2, 3, 1)
    assert list(result["series"].values) == ["a", "b"]
    np.testing.assert_allclose(result["time_value"].values, future.numpy())
    assert result["time_value"].dims == ("series", "time")


def test_future_times_must_follow_the_grid():
    paths, _, _ = exact_posterior_paths(10)
    with pytest.raises(ValueError, match="future_times must start after the last grid time"):
        forecast(ou_model, {"x": paths}, torch.tensor([1.5, 2.5]), model_args=(Y,))
    with pytest.raises(ValueError, match="future_times must be strictly increasing"):
        forecast(ou_model, {"x": paths}, torch.tensor([2.5, 2.4]), model_args=(Y,))
    with pytest.raises(ValueError, match="site must name one of the posterior's path sites"):
        forecast(ou_model, {"x": paths}, FUTURE, model_args=(Y,), site="y")
