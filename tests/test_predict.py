import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torchsde
from pyro.infer import SVI, Trace_ELBO

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.analysis.predict import predictive_paths, solve_sde
from pyro_nsde.zoo.nn import DiffusionNet, DriftNet


@pytest.fixture(autouse=True)
def _seed():
    pyro.clear_param_store()
    torch.manual_seed(0)


THETA, SIGMA = 1.5, 0.7


def _ou_moments(x0_mean, x0_var, elapsed):
    """Exact mean and variance of an Ornstein–Uhlenbeck state after ``elapsed``."""
    decay = math.exp(-THETA * elapsed)
    stationary = SIGMA**2 / (2 * THETA)
    return decay * x0_mean, decay**2 * x0_var + stationary * (1 - decay**2)


@pytest.mark.parametrize("method", ["srk", "milstein", "euler"])
def test_ou_marginals_match_the_exact_law(method):
    n = 4000
    times = torch.tensor([0.0, 0.5, 1.0])
    paths = solve_sde(
        lambda t, x: -THETA * x,
        torch.tensor([SIGMA]),
        torch.full((n, 1), 2.0),
        times,
        dt=0.01,
        method=method,
    )
    assert paths.shape == (n, 3, 1)
    torch.testing.assert_close(paths[:, 0], torch.full((n, 1), 2.0))
    for j in (1, 2):
        mean, var = _ou_moments(2.0, 0.0, float(times[j]))
        x = paths[:, j, 0].double()
        assert abs(float(x.mean()) - mean) < 4 * math.sqrt(var / n)
        assert abs(float(x.var()) / var - 1) < 4 * math.sqrt(2 / n)


def _gbm_strong_error(method, dt):
    """Mean absolute error at ``t = 1`` against the exact geometric Brownian motion
    ``x_t = x_0 exp((μ - σ²/2) t + σ W_t)`` driven by the same Brownian path."""
    mu, sigma, n = 0.5, 0.8, 500
    x0 = torch.ones(n, 1, dtype=torch.float64)
    times = torch.tensor([0.0, 1.0], dtype=torch.float64)
    bm = torchsde.BrownianInterval(
        t0=0.0,
        t1=1.0,
        size=(n, 1),
        dtype=torch.float64,
        entropy=1,
        dt=dt,
        levy_area_approximation="space-time",
    )
    paths = solve_sde(
        lambda t, x: mu * x, lambda t, x: sigma * x, x0, times, method=method, dt=dt, bm=bm
    )
    exact = torch.exp((mu - sigma**2 / 2) + sigma * bm(0.0, 1.0))
    return float((paths[:, -1] - exact).abs().mean().detach())


def test_higher_order_schemes_converge_faster_on_multiplicative_noise():
    methods = ("euler", "milstein", "srk")
    errors = {m: [_gbm_strong_error(m, dt) for dt in (0.04, 0.01)] for m in methods}
    # Strong orders 0.5 (Euler), 1 (Milstein), 1.5 (SRK): a 4x smaller step cuts the error
    # by about 2, 4 and 8.
    assert errors["euler"][0] / errors["euler"][1] == pytest.approx(2, rel=0.35)
    assert errors["milstein"][0] / errors["milstein"][1] == pytest.approx(4, rel=0.35)
    assert errors["srk"][0] / errors["srk"][1] > 6
    assert errors["srk"][1] < errors["milstein"][1] < errors["euler"][1]


def test_batched_parameters_broadcast_against_the_states():
    """Each batch element keeps its own parameters (states are flattened for torchsde)."""
    theta = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1)
    x0 = torch.randn(3, 4, 2)
    times = torch.linspace(0, 1, 5)
    paths = solve_sde(
        lambda t, x: -theta * x, torch.full((2,), 1e-6), x0, times, dt=1e-2, method="srk"
    )
    assert paths.shape == (3, 4, 5, 2)
    exact = x0.unsqueeze(-2) * torch.exp(-theta.unsqueeze(-1) * times.reshape(5, 1))
    torch.testing.assert_close(paths, exact, rtol=1e-3, atol=1e-4)


def test_neural_diffusions_of_both_heads_are_solved():
    x0 = torch.randn(2, 3, 2)
    times = torch.linspace(0, 1, 4)
    for diffusion, noise_type in (
        (DiffusionNet(2), "diagonal"),
        (DiffusionNet(2, "general"), "general"),
    ):
        paths = solve_sde(DriftNet(2), diffusion, x0, times, noise_type=noise_type)
        assert paths.shape == (2, 3, 4, 2) and torch.isfinite(paths).all()


def test_predictive_paths_continue_each_posterior_draw_with_the_exact_transition_law():
    times = torch.linspace(0, 1, 11)
    y = torch.tensor([[0.5, 1.0, 0.8], [-0.3, -0.6, -1.0]])
    obs = torch.tensor([0, 5, 10])

    def model(y):
        with pyro.plate("series", 2):
            init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
            law = EulerMaruyama(lambda t, x: -THETA * x, torch.tensor([SIGMA]), init, times)
            x = pyro.sample("x", law)
            pyro.sample("y", dist.Normal(x[..., obs, 0], 0.1).to_event(1), obs=y)

    guide = GirsanovGuide(model, control="affine")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(30):
        svi.step(y)
    n = 2000
    horizon = torch.tensor([1.0, 1.5, 2.0])
    paths = predictive_paths(model, guide, y, site="x", times=horizon, num_samples=n, dt=0.01)
    assert paths.shape == (n, 2, 3, 1)
    end = paths[:, :, 0, 0].double()  # the posterior state at the last grid time
    for j, elapsed in ((1, 0.5), (2, 1.0)):
        for i in range(2):
            mean, var = _ou_moments(float(end[:, i].mean()), float(end[:, i].var()), elapsed)
            x = paths[:, i, j, 0].double()
            assert abs(float(x.mean()) - mean) < 4 * math.sqrt(var / n)
            assert abs(float(x.var()) / var - 1) < 4 * math.sqrt(2 / n) + 0.02
    later = predictive_paths(model, guide, y, site="x", times=horizon[1:], num_samples=5)
    assert later.shape == (5, 2, 2, 1)
    fine = predictive_paths(
        model, guide, y, site="x", times=torch.linspace(0, 1, 41), num_samples=5, start=0
    )
    assert fine.shape == (5, 2, 41, 1)


def test_invalid_requests_name_the_problem():
    x0, times = torch.zeros(3, 2), torch.linspace(0, 1, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        solve_sde(lambda t, x: x, torch.eye(2), x0, times, noise_type="general", method="srk")
    with pytest.raises(ValueError, match="strictly increasing"):
        solve_sde(lambda t, x: x, torch.ones(2), x0, times.flip(0))
