"""Many series with their own parameters: ``log θ_i ~ N(m, s²)`` in the paths' plate.

A hierarchical Ornstein–Uhlenbeck model (each series ``dx = -θ_i x dt + σ dW``, observed with
noise) whose population posterior ``p(m, s | y)`` is computed exactly by a Kalman filter per
series and quadrature (``tests/reference.py``), and whose conditional path posteriors
``p(x_i | θ_i, y_i)`` are exact Gaussians. Checked:

- each series' path follows its own drawn ``θ_i`` under every conditional strategy;
- ``GirsanovGuide(model)`` + ``fit_svi`` defaults (the hierarchical family and its start) give
  the population's posterior: its start alone, after SVI, and with a subsampled plate;
- every control, conditional and latent family runs with per-series parameters;
- unsupported combinations raise errors that name the site and the alternative.
"""

import math
import os
import pathlib
import re
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.autoguide import init_to_value
from reference import LinearGaussianPath, hierarchical_posterior, ou_series_log_likelihoods

from pyro_nsde import EulerMaruyama, GirsanovGuide, fit_svi
from pyro_nsde.app.training import LOCATION_RATE
from pyro_nsde.guide import sweep
from pyro_nsde.guide.hierarchical import PiecewiseUniform
from pyro_nsde.zoo.hierarchical import HierarchicalOU

SIGMA, TAU = 0.5, 0.2
S_PRIOR = (math.log(0.5), 0.5)


def hierarchical_ou(num_series, num_steps, h, every, *, subsample=None, dtype=torch.float32):
    """``(model, y, info)``: the zoo's model (``σ = 0.5``, ``τ = 0.2``, ``m ~ N(0, 1)``,
    ``log s ~ N(log 0.5, 0.5²)``), data from ``m = 0, s = 0.5``."""
    zoo = HierarchicalOU(num_series, num_steps, h, every, subsample_size=subsample, dtype=dtype)
    y, _ = zoo.simulate(m=0.0, s=0.5, seed=0)
    info = {"times": zoo.times, "obs": zoo.obs_steps, "h": h, "num_steps": num_steps}
    return zoo.model, y, info


def exact_population(y, info):
    grid = torch.linspace(-4.0, 3.0, 281, dtype=torch.float64)
    log_lik = ou_series_log_likelihoods(
        y, info["obs"], info["h"], info["num_steps"], SIGMA, TAU, grid
    )

    def log_prior(m, log_s):
        return -0.5 * m**2 - 0.5 * ((log_s - S_PRIOR[0]) / S_PRIOR[1]) ** 2

    m_grid = torch.linspace(-2.0, 2.0, 161, dtype=torch.float64)
    log_s_grid = torch.linspace(math.log(0.05), math.log(3.0), 161, dtype=torch.float64)
    return hierarchical_posterior(log_lik, grid, m_grid, log_s_grid, log_prior)


def test_the_zoo_population_posterior_matches_the_reference():
    """The zoo's filter (from observation to observation) and quadrature against the
    reference's (step by step)."""
    zoo = HierarchicalOU(30, 200, 0.05, 10)
    y, _ = zoo.simulate(seed=3)
    grid = torch.linspace(-4.0, 3.0, 281, dtype=torch.float64)
    info = {"obs": zoo.obs_steps, "h": zoo.h, "num_steps": zoo.num_steps}
    reference = ou_series_log_likelihoods(y, info["obs"], zoo.h, zoo.num_steps, SIGMA, TAU, grid)
    assert torch.allclose(zoo.series_log_likelihoods(y, grid), reference, atol=1e-9)
    exact = exact_population(y, info)
    for name, (mean, sd) in zoo.population_posterior(y).items():
        assert abs(mean - exact[name][0]) < 0.01 * sd and abs(sd - exact[name][1]) < 0.01 * sd


def population_draws(guide, num_samples=4000):
    """Draws of ``(m, s)`` from the guide's hyperparameter family."""
    with torch.no_grad():
        z = guide.latent_guide.global_guide.get_posterior().sample((num_samples,))
    return {"m": z[:, 0].double(), "s": z[:, 1].exp().double()}


def assert_matches(draws, exact, z_max=0.5):
    for name, (mean, sd) in exact.items():
        z = (float(draws[name].mean()) - mean) / sd
        ratio = float(draws[name].std()) / sd
        assert abs(z) < z_max and 0.75 < ratio < 1.33, (name, z, ratio)


# ----------------------------------------------------------------------------- paths follow θ_i


def exact_mean_path(info, theta, y):
    times = info["times"].double()
    path = LinearGaussianPath([[-theta]], [0.0], [[SIGMA]], [0.0], [[1.0]], times)
    observed = path.observe([[1.0]], info["obs"].tolist(), [[TAU**2]], y.double().unsqueeze(-1))
    mean, _ = observed.marginals()
    return mean[:, 0]


@pytest.mark.parametrize(
    "control, conditional, thetas, tolerance, fraction",
    [
        ("affine", "kalman", (2.5, 1.0, 0.4), 0.03, 0.0),
        ("linear", "kalman", (2.5, 1.0, 0.4), 0.03, 0.0),
        ("linear", "taylor", (1.4, 1.0, 0.7), 0.015, 0.35),
        ("affine", "taylor", (1.4, 1.0, 0.7), 0.015, 0.35),
    ],
)
def test_each_series_path_follows_its_own_drawn_rate(
    control, conditional, thetas, tolerance, fraction
):
    """Conditioned on a different ``θ_i`` per series, the guide's mean path of each series is
    its exact conditional posterior mean (the fit is at ``θ_i = 1``): exactly for the Kalman
    conditional, to first order in ``log θ_i`` for the Taylor one (within ``fraction`` of
    how far the exact mean moved)."""
    model, y, info = hierarchical_ou(3, 40, 0.1, 20, dtype=torch.float64)
    start = {"theta": torch.ones(3, dtype=torch.float64), "m": 0.0, "s": 0.5}
    init_loc_fn = init_to_value(values={k: torch.as_tensor(v) for k, v in start.items()})
    guide = GirsanovGuide(model, control=control, conditional=conditional, init_loc_fn=init_loc_fn)
    guide(y)
    theta = torch.tensor(thetas, dtype=torch.float64)
    data = {"theta": theta, "m": theta.new_tensor(0.0), "s": theta.new_tensor(0.5)}
    predictive = Predictive(
        model,
        guide=poutine.condition(guide, data=data),
        num_samples=4000,
        return_sites=["x"],
        parallel=True,
    )
    with torch.no_grad():
        mean = predictive(y)["x"].mean(0)[..., 0]
    for i, value in enumerate(thetas):
        exact = exact_mean_path(info, value, y[i])
        error = (mean[i] - exact).abs().max()
        shift = (exact - exact_mean_path(info, 1.0, y[i])).abs().max()
        if value != 1.0:  # following θ_i is worth more than the tolerance
            assert shift > 2 * tolerance
        assert error < tolerance + fraction * shift, (i, float(error), float(shift))


# ----------------------------------------------------------------------------- the population


@pytest.fixture(scope="module")
def many_series():
    model, y, info = hierarchical_ou(40, 200, 0.05, 10)
    return model, y, info, exact_population(y, info)


def test_defaults_choose_the_hierarchical_family_and_its_start(many_series):
    model, y, _, exact = many_series
    pyro.set_rng_seed(0)
    guide = GirsanovGuide(model)
    guide(y)
    assert guide.options.latents == "hierarchical"
    assert guide.options.init_latents == "laplace"
    assert guide.options.conditional == "kalman"
    # The start alone is the population's posterior (series' likelihoods on their nodes,
    # the hyperparameters' marginal Laplace approximation).
    assert_matches(population_draws(guide), exact, z_max=0.25)


def test_fit_svi_defaults_keep_the_population_posterior(many_series):
    model, y, _, exact = many_series
    pyro.set_rng_seed(1)
    guide = GirsanovGuide(model)
    losses = fit_svi(model, guide, y, progress=False)
    assert losses.converged
    assert_matches(population_draws(guide), exact)


def test_a_subsampled_plate_gives_the_same_population_posterior(many_series):
    """With ``subsample_size=10`` of 40 series the start sweeps every series (a subsample at
    a time) and SVI sees 10 series per step."""
    _, y, _, exact = many_series
    model, _, _ = hierarchical_ou(40, 200, 0.05, 10, subsample=10)
    pyro.set_rng_seed(2)
    guide = GirsanovGuide(model)
    guide(y)
    assert guide.options.latents == "hierarchical" and guide.options.init_latents == "laplace"
    assert_matches(population_draws(guide), exact, z_max=0.25)
    fit_svi(model, guide, y, progress=False)
    assert_matches(population_draws(guide), exact)


def test_mean_field_over_the_population_is_too_narrow(many_series):
    """What the hierarchical family is for: mean field over ``(m, s)`` and the ``θ_i`` shrinks
    the population's spread (the issue's finding)."""
    model, y, _, exact = many_series
    pyro.set_rng_seed(3)
    guide = GirsanovGuide(model, latents="normal")
    fit_svi(model, guide, y, progress=False)
    scale = guide.latent_guide.scales.s.detach()  # the sd of log s
    assert float(scale) < 0.75 * exact["s"][1] / exact["s"][0]


@pytest.mark.parametrize(
    "control, conditional, latents, subsample",
    [
        ("affine", "kalman", "auto", None),
        ("affine", "taylor", "auto", None),
        ("affine", None, "auto", None),
        ("linear", "kalman", "auto", None),
        ("linear", "taylor", "normal", None),
        ("linear", None, "multivariate", None),
        ("mlp", None, "auto", None),
        ("linear", "kalman", "auto", 3),
        ("affine", "taylor", "auto", 3),
        ("mlp", None, "normal", 3),
    ],
)
def test_every_family_runs_with_per_series_parameters(control, conditional, latents, subsample):
    model, y, _ = hierarchical_ou(6, 30, 0.1, 5, subsample=subsample)
    pyro.set_rng_seed(0)
    guide = GirsanovGuide(model, control=control, conditional=conditional, latents=latents)
    losses = fit_svi(model, guide, y, steps=4, progress=False)
    assert all(math.isfinite(loss) for loss in losses)


# ----------------------------------------------------------------------------- errors


def test_a_joint_laplace_start_with_per_series_sites_is_refused():
    model, y, _ = hierarchical_ou(5, 20, 0.1, 5)
    guide = GirsanovGuide(model, latents="multivariate", init_latents="laplace")
    with pytest.raises(ValueError, match=r"'theta'.*latents='hierarchical'"):
        guide(y)


def per_series_gamma_model(event: bool = False):
    """Per-series rates with a ``Gamma`` population law (or, with ``event``, a vector of two
    rates per series); each series observed at its last step."""
    times = torch.linspace(0.0, 1.0, 11)

    def model(y):
        rate = pyro.sample("rate", dist.Gamma(4.0, 2.0))
        with pyro.plate("series", 4, dim=-1):
            law = dist.Gamma(rate, 2.0)
            theta = pyro.sample("theta", law.expand([4, 2]).to_event(1) if event else law)
            if event:
                theta = theta.sum(-1)
            init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
            drift = lambda t, x: -theta[..., None] * x  # noqa: E731
            x = pyro.sample("x", EulerMaruyama(drift, torch.tensor([0.3]), init, times))
            pyro.sample("y", dist.Normal(x[..., -1, 0], 0.1), obs=y)

    return model, torch.tensor([0.5, -0.2, 0.1, 0.8])


def test_the_hierarchical_family_takes_any_univariate_population_law():
    model, y = per_series_gamma_model()
    pyro.set_rng_seed(0)
    guide = GirsanovGuide(model)
    losses = fit_svi(model, guide, y, steps=5, progress=False)
    assert guide.options.latents == "hierarchical"
    assert all(math.isfinite(loss) for loss in losses)


def test_the_hierarchical_family_names_a_site_it_cannot_take():
    model, y = per_series_gamma_model(event=True)
    guide = GirsanovGuide(model)
    guide(y)
    assert guide.options.latents != "hierarchical"
    with pytest.raises(ValueError, match=r"site 'theta'.*event_dim 1.*latents='normal'"):
        GirsanovGuide(model, latents="hierarchical")(y)


def test_taylor_names_a_per_series_site_with_batch_dims_beyond_the_plates():
    times = torch.linspace(0.0, 1.0, 11)

    def model():
        with pyro.plate("series", 4, dim=-1):
            theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5).expand([2, 4]))
            init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
            drift = lambda t, x: -theta.sum(-2)[..., None] * x  # noqa: E731
            pyro.sample("x", EulerMaruyama(drift, torch.tensor([0.3]), init, times))

    guide = GirsanovGuide(model, control="linear", conditional="taylor", latents="normal")
    with pytest.raises(ValueError, match=r"follow site 'theta'.*conditional='kalman'"):
        guide()


# ----------------------------------------------------------------------------- parts


def test_piecewise_uniform_moments_density_and_median():
    start, step = torch.tensor([[-1.0]]), torch.tensor([[0.5]])
    log_weights = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    law = PiecewiseUniform(start, step, log_weights)
    probs = log_weights.softmax(-1)[0]
    centres = -1.0 + 0.5 * (torch.arange(4) + 0.5)
    mean = float((probs * centres).sum())
    var = float((probs * (centres - mean) ** 2).sum()) + 0.5**2 / 12
    draws = law.rsample((200_000,))
    assert abs(float(draws.mean()) - mean) < 0.005
    assert abs(float(draws.var()) - var) < 0.005
    grid = torch.linspace(-1.0, 1.0, 40_001)[1:-1].unsqueeze(-1)
    integral = float(law.log_prob(grid).exp().mean() * 2.0)
    assert abs(integral - 1.0) < 1e-3
    assert float(law.log_prob(torch.tensor([[1.5]]))) == -math.inf
    median = law.median()
    below = float((draws < median).double().mean())
    assert abs(below - 0.5) < 0.005


def test_piecewise_uniform_gradient_of_the_entropy_is_exact():
    """``log_prob``'s gradient is that of ``E_q[log q]`` (the pathwise gradient alone would
    miss the mass crossing the cell edges)."""
    log_weights = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    law = PiecewiseUniform(torch.tensor([0.0]), torch.tensor([1.0]), log_weights)
    value = law.rsample((50_000,))
    estimate = torch.autograd.grad(law.log_prob(value).mean(), log_weights)[0]
    probs = log_weights.softmax(-1)
    exact = torch.autograd.grad((probs * probs.log()).sum(), log_weights)[0]
    assert torch.allclose(estimate, exact, atol=1e-6)


def test_sweep_chunks_cover_every_series_and_put_takes_back():
    frame = pyro.poutine.indep_messenger.CondIndepStackFrame("series", -1, 3, 0, full_size=7)
    chunks = sweep.chunks({"series": frame})
    assert torch.equal(torch.cat([c["series"] for c in chunks]), torch.arange(7))
    full = None
    for data in chunks:
        plates = {"series": pyro.plate("series", 7, subsample=data["series"])}
        part = data["series"].double()[:, None, None].expand(-1, 5, 2)
        full = sweep.put(full, part, [frame], plates, event_dims=2)
        assert torch.equal(sweep.take(full, [frame], plates, event_dims=2), part)
    assert torch.equal(full[:, 0, 0], torch.arange(7).double())


def test_laplace_started_locations_step_in_units_of_the_start_sd(many_series):
    """``fit_svi`` steps a Laplace-started family's locations by at most
    :data:`LOCATION_RATE` of its smallest start sd per step (Adam's steps are as large as
    its rate whatever the gradient)."""
    model, y, _, _ = many_series
    pyro.set_rng_seed(4)
    guide = GirsanovGuide(model)
    guide(y)
    family = guide.latent_guide.global_guide
    start = family.loc.detach().clone()
    fit_svi(model, guide, y, steps=10, progress=False)
    moved = (family.loc.detach() - start).abs().max()
    assert 0 < float(moved) <= 10 * LOCATION_RATE * family.start_scale * 1.01


def test_the_tutorial_runs_in_fast_mode_and_matches_the_exact_posterior(tmp_path):
    script = pathlib.Path(__file__).resolve().parents[1] / "tutorials" / "hierarchical_ou.py"
    env = {**os.environ, "PYRO_NSDE_FAST": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    zs = [float(z) for z in re.findall(r"z ([+-][0-9.]+)", result.stdout)]
    ratios = [float(r) for r in re.findall(r"sd x([0-9.]+)", result.stdout)]
    assert len(zs) == 4 and len(ratios) == 4, result.stdout
    assert all(abs(z) < 0.5 for z in zs) and all(0.75 < r < 1.33 for r in ratios), result.stdout
    assert (tmp_path / "hierarchical_ou.png").stat().st_size > 0
