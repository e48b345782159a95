"""The warped Gauss–Markov family (``GirsanovGuide(control="linear", warp="spline")``): an
exact density by the change of variables (checked by integrating it over the plane and against
an autograd Jacobian), the identity at its start, and the guide's options, subsampled ELBO and
training with it."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from test_gauss_markov import gauss_markov_law

from pyro_nsde import EulerMaruyama, GirsanovGuide, subsample_steps
from pyro_nsde.posterior.warped import PathWarp, WarpedEulerMaruyama


def shaped_warp(state_dim, seed=0, size=1.0):
    """A warp far from the identity."""
    warp = PathWarp(state_dim).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in warp.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.copy_(size * noise / warp.step_scale)
    return warp


def test_the_warp_starts_at_the_identity_and_inverts():
    warp = PathWarp(2).double()
    y = 3 * torch.randn(4, 7, 2, dtype=torch.float64)
    warp.calibrate(y)
    x, log_det = warp(y)
    assert torch.allclose(x, y, atol=1e-3 * float(y.std()))
    assert log_det.abs().max() < 1e-2
    warp = shaped_warp(2)
    warp.calibrate(y)
    x, log_det = warp(y)
    assert (x - y).abs().max() > 0.1  # not the identity any more
    back, inverse_log_det = warp.inverse(x)
    assert torch.allclose(back, y, atol=1e-8)
    assert torch.allclose(inverse_log_det, log_det, atol=1e-8)
    point = y.clone().requires_grad_()
    (slope,) = torch.autograd.grad(warp(point)[0].sum(), point)  # elementwise: the diagonal
    assert torch.allclose(slope.log(), log_det, atol=1e-8)


def test_the_warped_density_integrates_to_one():
    """One step of a scalar chain: ``∫∫ q(x_0, x_1) dx_0 dx_1 = 1`` on a fine grid."""
    law = WarpedEulerMaruyama(gauss_markov_law(1, 1), shaped_warp(1, seed=4, size=0.5))
    law.warp.calibrate(torch.tensor([[-1.0], [1.0]], dtype=torch.float64))
    grid = torch.linspace(-12, 12, 2401, dtype=torch.float64)
    assert (law.warp(grid.unsqueeze(-1))[0].squeeze(-1) - grid).abs().max() > 0.5
    x0, x1 = torch.meshgrid(grid, grid, indexing="ij")
    paths = torch.stack([x0, x1], -1).unsqueeze(-1)  # (n, n, 2, 1)
    with torch.no_grad():
        density = law.log_prob(paths).exp()
    step = float(grid[1] - grid[0])
    assert float(density.sum()) * step**2 == pytest.approx(1.0, abs=1e-3)


def test_the_density_of_a_draw_is_the_change_of_variables():
    base = gauss_markov_law(30, 2, batch=(3,))
    warp = shaped_warp(2, seed=1)
    law = WarpedEulerMaruyama(base, warp)
    x = law.rsample((2,))
    assert x.shape == (2, 3, 31, 2)
    cached = law.log_prob(x)  # reuses the draw's chain and Jacobian
    recomputed = law.log_prob(x.detach().clone())  # inverts the warp
    assert torch.allclose(cached, recomputed, atol=1e-6)
    y = warp.inverse(x.detach())[0].requires_grad_()
    (slope,) = torch.autograd.grad(warp(y)[0].sum(), y)
    expected = base.log_density(y.detach()) - slope.log().sum((-1, -2))
    assert torch.allclose(cached, expected, atol=1e-6)
    assert torch.allclose(law.log_density(x), expected, atol=1e-6)
    assert law.skeleton().shape == (3, 31, 2)


def sin_model(y, series=3):
    with pyro.plate("series", series):
        init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
        times = torch.linspace(0.0, 4.0, 81)
        drift = lambda t, x: torch.sin(2 * x) - 0.3 * x  # noqa: E731
        x = pyro.sample("x", EulerMaruyama(drift, torch.tensor([0.5]), init, times))
        pyro.sample("y", dist.Normal(x[..., ::10, :], 0.1).to_event(2), obs=y)


DATA = torch.linspace(-1, 1, 9).reshape(1, 9, 1) * torch.tensor([1.0, -1.0, 0.5]).reshape(3, 1, 1)


def test_options_with_a_warp():
    guide = GirsanovGuide(sin_model, control="linear", covariance="diagonal", warp="spline")
    assert guide.options.estimator == "stl"  # the model scores the warped path
    guide(DATA)
    assert guide.options.conditional is None
    assert any(name.startswith("warps.") for name, _ in guide.named_parameters())
    with pytest.raises(ValueError, match="control='linear'"):
        GirsanovGuide(sin_model, control="affine", warp="spline")(DATA)
    with pytest.raises(ValueError, match="conditional"):
        GirsanovGuide(sin_model, control="linear", warp="spline", conditional="kalman")(DATA)
    with pytest.raises(ValueError, match="warp"):
        GirsanovGuide(sin_model, control="linear", warp="flow")


def test_at_its_start_the_warped_guide_is_the_gauss_markov_guide():
    losses = []
    for warp in (None, "spline"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = GirsanovGuide(
            sin_model, control="linear", covariance="diagonal", estimator="plain", warp=warp
        )
        guide(DATA)
        pyro.set_rng_seed(1)
        elbo = Trace_ELBO(num_particles=64, vectorize_particles=True)
        losses.append(elbo.loss(sin_model, guide, DATA))
    assert losses[1] == pytest.approx(losses[0], abs=0.05)


def test_the_subsampled_elbo_with_a_warp_is_unbiased_and_it_trains():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="all steps"):
        guide = GirsanovGuide(
            sin_model, control="linear", covariance="diagonal", warp="spline", subsample_steps=8
        )
    guide(DATA)
    with torch.no_grad():  # a warp far from the identity
        for param in guide.warps.x.parameters():
            param.add_(0.5 * torch.randn_like(param) / guide.warps.x.step_scale)
    guide_trace = poutine.trace(guide).get_trace(DATA)
    replayed = poutine.trace(poutine.replay(sin_model, guide_trace)).get_trace(DATA)
    full = float(replayed.log_prob_sum().detach())
    estimates = []
    for _ in range(300):
        model = poutine.replay(subsample_steps(sin_model, 8), trace=guide_trace)
        estimates.append(float(poutine.trace(model).get_trace(DATA).log_prob_sum().detach()))
    estimates = torch.tensor(estimates)
    error = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - full) < 4.5 * error + 1e-3

    before = {n: p.detach().clone() for n, p in guide.warps.named_parameters()}
    svi = SVI(subsample_steps(sin_model, 8), guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(DATA) for _ in range(30)]
    assert all(math.isfinite(loss) for loss in losses)
    moved = max(float((p - before[n]).abs().max()) for n, p in guide.warps.named_parameters())
    assert moved > 1e-3  # the warp is trained with the rest


def test_sticking_the_landing_drops_the_score_at_the_fixed_path():
    """``estimator="stl"``: the value is the exact density and the gradient is the plain one
    less ``∂ log q / ∂φ`` at the path held fixed."""
    base = gauss_markov_law(15, 2, batch=(2,), seed=4)
    warp = shaped_warp(2, seed=5, size=0.5)
    params = list(warp.parameters())
    torch.manual_seed(0)
    law = WarpedEulerMaruyama(base, warp, "stl")
    x = law.rsample()
    stl = law.log_prob(x)
    assert torch.allclose(stl, law.log_density(x))
    (got,) = torch.autograd.grad(stl.sum(), params[:1], retain_graph=True)
    (plain,) = torch.autograd.grad(law.log_density(x).sum(), params[:1], retain_graph=True)
    (direct,) = torch.autograd.grad(law._exact_log_prob(x.detach()).sum(), params[:1])
    assert direct.abs().max() > 1e-3
    assert torch.allclose(got, plain - direct, atol=1e-6)


def test_the_warp_takes_the_dtype_of_the_path():
    def model(y):
        with pyro.plate("series", 2):
            init = dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0).to_event(1)
            times = torch.linspace(0.0, 2.0, 41, dtype=torch.float64)
            drift = lambda t, x: x - x**3  # noqa: E731
            diffusion = torch.tensor([0.5], dtype=torch.float64)
            x = pyro.sample("x", EulerMaruyama(drift, diffusion, init, times))
            pyro.sample("y", dist.Normal(x[..., ::10, :], 0.1).to_event(2), obs=y)

    y = torch.randn(2, 5, 1, dtype=torch.float64)
    guide = GirsanovGuide(model, control="linear", covariance="diagonal", warp="spline")
    assert math.isfinite(Trace_ELBO().loss(model, guide, y))
    assert guide.warps.x.widths.dtype == torch.float64
