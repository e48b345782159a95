"""``subsample_steps``: an unbiased estimate of a path's log density from a few of its steps.

On a nonlinear SDE with a state-dependent diffusion, per-series batch and a non-uniform grid,
the mean of many estimates equals the exact Euler–Maruyama log density, and the mean of their
gradients (in a drift parameter and in the path) equals the exact gradient, within Monte Carlo
error; likewise with a constant diffusion (whose drift-free part is computed exactly), a known
``x_0`` and in the ELBO of a model under ``SVI``.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_nsde import EulerMaruyama, GirsanovGuide, fit_svi, subsample_steps
from pyro_nsde.sde import records
from pyro_nsde.sde.subsample import SubsampledEulerMaruyama, strata
from pyro_nsde.zoo.nn import PosteriorDriftControl

NUM_DRAWS = 3000


def nonlinear_law(weight, diffusion, init=None, batch=5, num_steps=200):
    generator = torch.Generator().manual_seed(0)
    times = torch.cumsum(torch.rand(num_steps + 1, generator=generator) * 0.02 + 0.005, 0)

    def drift(t, x):
        return weight * torch.sin(x) - 0.5 * x + torch.cos(3 * t)

    if init is None:
        init = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    return EulerMaruyama(drift, diffusion, init, times).expand([batch])


def state_dependent(t, x):
    return 0.3 + 0.2 * torch.tanh(x)


def mean_and_error(samples):
    stacked = torch.stack(samples)
    return stacked.mean(0), stacked.std(0) / math.sqrt(len(samples))


@pytest.mark.parametrize(
    "diffusion, known_init",
    [(state_dependent, False), (torch.tensor([0.4, 0.3]), False), (state_dependent, True)],
    ids=["state-dependent", "constant", "known-x0"],
)
def test_the_estimate_and_its_gradients_are_unbiased(diffusion, known_init):
    weight = torch.tensor(1.3, requires_grad=True)
    init = torch.tensor([0.2, -0.1]) if known_init else None
    law = nonlinear_law(weight, diffusion, init)
    with torch.no_grad():
        path = law.sample().clone()
    path.requires_grad_()
    exact = law.log_prob(path)
    exact_weight, exact_path = torch.autograd.grad(exact.sum(), [weight, path])
    subsampled = SubsampledEulerMaruyama(law, 20)
    values, weights, paths = [], [], []
    for _ in range(NUM_DRAWS):
        estimate = subsampled.log_prob(path)
        grad_weight, grad_path = torch.autograd.grad(estimate.sum(), [weight, path])
        values.append(estimate.detach())
        weights.append(grad_weight)
        paths.append(grad_path[0, 50])  # one state's gradient, series 0
    for estimates, target in (
        (values, exact.detach()),
        (weights, exact_weight),
        (paths, exact_path[0, 50]),
    ):
        mean, error = mean_and_error(estimates)
        assert (error > 0).all()  # the estimate is random
        assert ((mean - target).abs() < 4.5 * error + 1e-4).all(), (mean, target, error)


def test_all_steps_give_the_exact_density():
    law = nonlinear_law(1.0, state_dependent, num_steps=30)
    path = law.sample().clone()
    assert torch.equal(SubsampledEulerMaruyama(law, 30).log_prob(path), law.log_prob(path))


def test_strata_cover_every_step_once():
    bounds = strata(1000, 7)
    assert bounds[0] == 0 and bounds[-1] == 1000
    sizes = bounds[1:] - bounds[:-1]
    assert sizes.min() >= 142 and sizes.max() <= 143


def test_each_stratum_draws_every_one_of_its_steps():
    law = nonlinear_law(1.0, state_dependent, batch=2000, num_steps=10)
    _, upper, index = SubsampledEulerMaruyama(law, 3)._draw(10, torch.Size([2000]), "cpu")
    assert (index < upper).all()
    counts = torch.bincount(index.reshape(-1), minlength=10)
    assert (counts > 0).all()  # 3 strata of sizes 3, 3, 4: all 10 steps drawn


# ----------------------------------------------------------------------------- in a model

TIMES = torch.linspace(0.0, 5.0, 501)
OBS = torch.arange(10, 501, 10)


def ou_model(y, series=4, subsample=None):
    theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
    with pyro.plate("series", series, subsample_size=subsample, dim=-1) as index:
        init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
        drift = lambda t, x: -theta[..., None] * torch.sin(x)  # noqa: E731
        x = pyro.sample("x", EulerMaruyama(drift, torch.tensor([0.5]), init, TIMES))
        pyro.sample("y", dist.Normal(x[..., OBS, 0], 0.1).to_event(1), obs=y[index])


def simulated(series=4):
    pyro.set_rng_seed(0)
    data = torch.zeros(series, len(OBS))
    trace = poutine.trace(poutine.condition(ou_model, {"theta": torch.tensor(1.5)})).get_trace(
        data, series
    )
    return trace.nodes["y"]["fn"].sample()


def test_the_elbo_of_a_subsampled_model_is_unbiased():
    """Replaying the same guide draws, the subsampled model's ELBO averages to the full one."""
    y = simulated()
    guide = GirsanovGuide(ou_model, control="linear")
    guide(y)
    pyro.set_rng_seed(1)
    guide_trace = poutine.trace(guide).get_trace(y)
    replayed = poutine.replay(ou_model, trace=guide_trace)
    full = poutine.trace(replayed).get_trace(y).log_prob_sum()
    estimates = []
    for _ in range(400):
        model = poutine.replay(subsample_steps(ou_model, 25), trace=guide_trace)
        estimates.append(poutine.trace(model).get_trace(y).log_prob_sum().detach())
    mean, error = mean_and_error(estimates)
    full = float(full.detach())
    assert abs(float(mean) - full) < 4.5 * float(error), (float(mean), full, float(error))


@pytest.mark.parametrize("subsample", [None, 2])
def test_fit_svi_on_a_subsampled_model_learns_the_rate(subsample):
    """``fit_svi(subsample_steps(model, R), GirsanovGuide(model, control="linear"))`` with
    vectorized particles, and with a subsampled plate of series."""
    y = simulated()
    pyro.set_rng_seed(2)
    guide = GirsanovGuide(ou_model, control="linear", subsample_steps=25)
    model = subsample_steps(ou_model, 25)
    losses = fit_svi(model, guide, y, 4, subsample, steps=150, num_particles=4, progress=False)
    assert all(math.isfinite(loss) for loss in losses)
    theta = guide.latent_guide.median(y, 4, subsample)["theta"]
    assert 0.9 < float(theta) < 2.4


def test_only_path_sites_are_replaced():
    trace = poutine.trace(subsample_steps(ou_model, 5)).get_trace(simulated())
    assert isinstance(trace.nodes["x"]["fn"], SubsampledEulerMaruyama)
    assert isinstance(trace.nodes["theta"]["fn"], dist.LogNormal)
    with pytest.raises(ValueError, match="num_steps"):
        subsample_steps(ou_model, 0)


def test_the_subsampled_guide_does_not_see_the_replacement():
    """The guide is built on the plain model: its priors are exact path laws."""
    y = simulated()
    guide = GirsanovGuide(ou_model, control="linear")
    loss = Trace_ELBO().loss(subsample_steps(ou_model, 10), guide, y)
    assert math.isfinite(loss)
    assert isinstance(
        guide.prior("x", {"theta": torch.tensor(1.0)}, guide._create_plates(y), y), EulerMaruyama
    )


def test_the_guide_argument_keeps_the_gradient_estimator_off_the_drift():
    y = simulated()

    def estimator(**options):
        guide = GirsanovGuide(ou_model, subsample_steps=25, **options)
        guide(y)
        return guide.options.estimator

    assert estimator() == "stl"  # its surrogate does not call the drift of a Gauss-Markov path
    assert estimator(control="mlp") == "plain"  # a network control: the plain estimator
    assert estimator(estimator="plain") == "plain"
    assert GirsanovGuide(ou_model).options.estimator == "girsanov"
    with pytest.raises(ValueError, match="subsample_steps"):
        GirsanovGuide(ou_model, subsample_steps=0)


@pytest.mark.parametrize("state_dependent", [False, True], ids=["constant-G", "state-G"])
def test_a_posterior_drift_control_is_simulated_without_the_prior_drift(state_dependent):
    """``drift_free=True``: the same chain (``f + G G⁻¹ (v - f) = v``) and the same densities
    and Girsanov terms, with the prior's drift not evaluated while sampling."""
    calls = []

    def drift(t, x):
        calls.append(x.shape)
        return torch.sin(2 * x) - 0.3 * x

    diffusion = (lambda t, x: 0.3 + 0.1 * torch.tanh(x)) if state_dependent else None
    if diffusion is None:
        diffusion = torch.tensor([0.4, 0.3], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    times = torch.cumsum(torch.rand(41, generator=generator, dtype=torch.float64) * 0.05 + 0.01, 0)
    init = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    prior = EulerMaruyama(drift, diffusion, init, times).expand([3])
    control = PosteriorDriftControl(drift, diffusion, 2, 0, (16,), "diagonal").double()
    with torch.no_grad():
        for parameter in control.parameters():
            parameter.add_(
                0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            )
    paths, laws = [], []
    for drift_free in (False, True):
        law = prior.girsanov(control, drift_free=drift_free)
        torch.manual_seed(1)
        calls.clear()
        paths.append(law.rsample((2,)))
        laws.append(law)
        if drift_free:
            assert not calls  # the prior's drift is not evaluated while sampling
    assert torch.allclose(paths[0], paths[1], atol=1e-10)
    for name in ("posterior_log_prob", "prior_log_prob", "kl"):
        a, b = (getattr(records.find(x).steps, name)() for x in paths)
        assert torch.allclose(a, b, atol=1e-8), name
    assert torch.allclose(laws[1].log_prob(paths[1]), laws[0].log_prob(paths[0]), atol=1e-8)
