"""Path sites inside Pyro models: plates, conditioning, masks, Predictive, vectorized ELBOs and
NUTS, checked against hand-written densities, an exact ELBO and the exact posterior of a
linear-Gaussian model (tests/reference.py)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_value
from pyro.ops.stats import effective_sample_size
from reference import LinearGaussianPath

from pyro_nsde import EulerMaruyama, GirsanovGuide

F64 = torch.float64
TIMES = torch.tensor([0.0, 0.1, 0.2, 0.35, 0.5, 0.6, 0.8, 0.9, 1.0])
K = TIMES.shape[0] - 1
OBS = torch.tensor([2, 5, 8])
N = 3
NOISE_SD = 0.1
SIGMA = 0.7


def ou_law(theta, times, init_scale=1.0):
    """``dX = -θ X dt + 0.7 dW`` with ``x_0 ~ N(0, init_scale²)``; ``θ`` broadcasts from the
    right against the batch (a plate-batched ``θ`` of shape ``(N,)`` is used as
    ``θ[..., None]``)."""
    zeros = torch.zeros(1, dtype=times.dtype)
    return EulerMaruyama(
        lambda t, x: -theta[..., None] * x,
        torch.full((1,), SIGMA, dtype=times.dtype),
        dist.Normal(zeros, init_scale).to_event(1),
        times,
    )


def global_theta_model(y=None, times=TIMES):
    theta = pyro.sample("theta", dist.LogNormal(torch.zeros((), dtype=times.dtype), 0.5))
    with pyro.plate("series", N, dim=-1):
        x = pyro.sample("x", ou_law(theta, times))
        pyro.sample("y", dist.Normal(x[..., OBS, 0], NOISE_SD).to_event(1), obs=y)
    return x


def per_series_theta_model(y=None, times=TIMES):
    with pyro.plate("series", N, dim=-1):
        theta = pyro.sample("theta", dist.LogNormal(torch.zeros((), dtype=times.dtype), 0.5))
        x = pyro.sample("x", ou_law(theta, times))
        pyro.sample("y", dist.Normal(x[..., OBS, 0], NOISE_SD).to_event(1), obs=y)
    return x


def observations(model, times=TIMES):
    with torch.no_grad():
        return Predictive(model, num_samples=1)(times=times)["y"][0]


def hand_path_terms(trace, hand_log_prob, times):
    """The hand-written density of the path site given the trace's ``θ``, shape ``(N,)``."""
    theta = trace.nodes["theta"]["value"]
    law = ou_law(theta, times)
    return hand_log_prob(
        trace.nodes["x"]["value"], law.drift, law.diffusion, "diagonal", law.init, times
    )


def hand_observation_terms(trace, y):
    x = trace.nodes["x"]["value"]
    return dist.Normal(x[..., OBS, 0], NOISE_SD).log_prob(y).sum(-1)


# ------------------------------------------------------------------------ traces and plates


@pytest.mark.parametrize("model", [global_theta_model, per_series_theta_model])
def test_path_site_in_plate_scores_hand_written_density(model, hand_log_prob):
    times = TIMES.to(F64)
    y = observations(model, times)
    trace = poutine.trace(model).get_trace(y, times=times)
    trace.compute_log_prob()
    site = trace.nodes["x"]
    assert site["value"].shape == (N, K + 1, 1)
    assert site["fn"].batch_shape == (N,)
    expected = hand_path_terms(trace, hand_log_prob, times)
    assert torch.allclose(site["log_prob"], expected, rtol=1e-10)
    theta = trace.nodes["theta"]["value"]
    total = (
        dist.LogNormal(0.0, 0.5).log_prob(theta).sum()
        + expected.sum()
        + hand_observation_terms(trace, y).sum()
    )
    assert torch.allclose(trace.log_prob_sum(), total, rtol=1e-10)


def test_conditioned_path_site_scores_the_observed_path(hand_log_prob):
    times = TIMES.to(F64)
    path = 0.3 * torch.randn(N, K + 1, 1, dtype=F64).cumsum(-2)  # any path, not a sample
    conditioned = poutine.condition(global_theta_model, data={"x": path})
    trace = poutine.trace(conditioned).get_trace(times=times)
    trace.compute_log_prob()
    site = trace.nodes["x"]
    assert site["is_observed"]
    assert site["value"] is path
    assert torch.allclose(
        site["log_prob"], hand_path_terms(trace, hand_log_prob, times), rtol=1e-10
    )


def test_observed_path_is_scored_for_every_vectorized_particle(hand_log_prob):
    """A fully observed path site scored under a particle plate, as
    ``Trace_ELBO(vectorize_particles=True)`` does: ``θ`` is ``(P, 1)``, the law's batch is
    ``(P, N)`` and the observed value ``(N, K+1, 1)`` broadcasts. ``P = K`` on purpose."""
    times = TIMES.to(F64)
    path = 0.3 * torch.randn(N, K + 1, 1, dtype=F64).cumsum(-2)
    conditioned = poutine.condition(global_theta_model, data={"x": path})
    with pyro.plate("particles", K, dim=-2):
        trace = poutine.trace(conditioned).get_trace(times=times)
    trace.compute_log_prob()
    theta = trace.nodes["theta"]["value"]
    assert theta.shape == (K, 1)
    law = ou_law(theta, times)
    expected = hand_log_prob(
        path.expand(K, N, K + 1, 1), law.drift, law.diffusion, "diagonal", law.init, times
    )
    assert torch.allclose(trace.nodes["x"]["log_prob"], expected, rtol=1e-10)


def test_poutine_mask_on_path_site_drops_masked_series(hand_log_prob):
    times = TIMES.to(F64)
    keep = torch.tensor([True, False, True])

    def model():
        theta = pyro.sample("theta", dist.LogNormal(torch.zeros((), dtype=F64), 0.5))
        with pyro.plate("series", N, dim=-1), poutine.mask(mask=keep):
            pyro.sample("x", ou_law(theta, times))

    trace = poutine.trace(model).get_trace()
    trace.compute_log_prob()
    expected = hand_path_terms(trace, hand_log_prob, times)
    assert torch.allclose(trace.nodes["x"]["log_prob"], expected * keep, rtol=1e-10)


MISSING = torch.tensor([[True, False, True], [False, False, True], [True, True, True]])


def masked_method_model(y, times=TIMES):
    """Missing points masked with ``Distribution.mask``."""
    theta = pyro.sample("theta", dist.LogNormal(torch.zeros((), dtype=times.dtype), 0.5))
    with pyro.plate("series", N, dim=-1):
        x = pyro.sample("x", ou_law(theta, times))
        pyro.sample("y", dist.Normal(x[..., OBS, 0], NOISE_SD).mask(MISSING).to_event(1), obs=y)


def masked_handler_model(y, times=TIMES):
    """Missing points masked with ``poutine.mask``, one site per (point, series)."""
    theta = pyro.sample("theta", dist.LogNormal(torch.zeros((), dtype=times.dtype), 0.5))
    series = pyro.plate("series", N, dim=-1)
    with series:
        x = pyro.sample("x", ou_law(theta, times))
    with pyro.plate("points", len(OBS), dim=-2), series:
        with poutine.mask(mask=MISSING.T):
            pyro.sample("y", dist.Normal(x[..., OBS, 0].transpose(-1, -2), NOISE_SD), obs=y.T)


@pytest.mark.parametrize("model", [masked_method_model, masked_handler_model])
def test_masked_observations_score_only_observed_points(model, hand_log_prob):
    times = TIMES.to(F64)
    y = torch.where(MISSING, torch.randn(N, len(OBS), dtype=F64), torch.tensor(1e3, dtype=F64))
    trace = poutine.trace(model).get_trace(y, times=times)
    trace.compute_log_prob()
    expected = (
        dist.Normal(trace.nodes["x"]["value"][..., OBS, 0], NOISE_SD).log_prob(y) * MISSING
    ).sum()
    assert torch.allclose(trace.nodes["y"]["log_prob"].sum(), expected, rtol=1e-10)
    assert torch.allclose(
        trace.nodes["x"]["log_prob"], hand_path_terms(trace, hand_log_prob, times), rtol=1e-10
    )


@pytest.mark.parametrize("model", [masked_method_model, masked_handler_model])
def test_elbo_with_girsanov_guide_ignores_values_at_missing_points(model):
    y = torch.randn(N, len(OBS))
    guide = GirsanovGuide(model, control="affine")
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    elbo.loss(model, guide, y)  # sets the guide up
    losses = []
    for filler in (0.0, 1e3):
        pyro.set_rng_seed(3)
        losses.append(elbo.loss(model, guide, torch.where(MISSING, y, torch.tensor(filler))))
    assert math.isfinite(losses[0])
    assert losses[0] == losses[1]


# ------------------------------------------------------------------------------ Predictive


def test_prior_predictive_in_parallel_has_path_shapes():
    samples = Predictive(global_theta_model, num_samples=7, parallel=True)()
    assert samples["theta"].shape[0] == 7 and samples["theta"].numel() == 7
    assert samples["x"].shape == (7, N, K + 1, 1)
    assert samples["y"].shape == (7, N, len(OBS))
    assert torch.isfinite(samples["x"]).all()
    assert not torch.equal(samples["x"][0], samples["x"][1])


@pytest.mark.parametrize("control", ["affine", "mlp"])
def test_posterior_predictive_with_girsanov_guide_in_parallel_has_path_shapes(control):
    y = observations(global_theta_model)
    guide = GirsanovGuide(global_theta_model, control=control)
    svi = SVI(global_theta_model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(3):
        svi.step(y)
    predictive = Predictive(global_theta_model, guide=guide, num_samples=7, parallel=True)
    samples = predictive(y)
    assert samples["theta"].shape[0] == 7 and samples["theta"].numel() == 7
    assert samples["x"].shape == (7, N, K + 1, 1)
    assert samples["y"].shape == (7, N, len(OBS))
    assert torch.isfinite(samples["x"]).all()


# ------------------------------------------------------------------------------------ ELBO


@pytest.mark.parametrize("covariance", ["prior", "full"])
@pytest.mark.parametrize("control", ["affine", "mlp"])
def test_vectorized_trace_elbo_gives_finite_loss_and_gradients(control, covariance):
    y = observations(global_theta_model)
    guide = GirsanovGuide(global_theta_model, control=control, covariance=covariance)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    loss = elbo.differentiable_loss(global_theta_model, guide, y)
    assert loss.shape == () and torch.isfinite(loss)
    params = [p for p in guide.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


LIN_TIMES = torch.tensor([0.0, 0.1, 0.3, 0.4, 0.7, 1.0])
LIN_A, LIN_B, LIN_SIGMA, LIN_M0, LIN_S0 = -0.7, 0.2, 0.5, 0.3, 0.8
LIN_OBS, LIN_NOISE_SD = [2, 5], 0.2


def linear_model(y):
    init = dist.Normal(torch.tensor([LIN_M0]), LIN_S0).to_event(1)
    with pyro.plate("series", 2, dim=-1):
        x = pyro.sample(
            "x",
            EulerMaruyama(
                lambda t, x: LIN_A * x + LIN_B, torch.tensor([LIN_SIGMA]), init, LIN_TIMES
            ),
        )
        pyro.sample("y", dist.Normal(x[..., LIN_OBS, 0], LIN_NOISE_SD).to_event(1), obs=y)


def exact_initial_elbo(y, x0_loc, x0_scale):
    """ELBO of the Girsanov guide at initialisation (``u = 0``: the prior's transitions after
    ``x_0 ~ N(a, s²)``): ``Σ_i Σ_j E log N(y_ij; x_{k_j}, R) - KL(N(a_i, s²) ‖ p(x_0))``, with
    the moments of ``x_k`` from ``m ← (1 + hA) m + h b``, ``P ← (1 + hA)² P + h σ²``."""
    total = 0.0
    for i in range(y.shape[0]):
        m, P = float(x0_loc[i]), x0_scale**2
        moments = [(m, P)]
        for k in range(LIN_TIMES.shape[0] - 1):
            h = float(LIN_TIMES[k + 1] - LIN_TIMES[k])
            m, P = (1 + h * LIN_A) * m + h * LIN_B, (1 + h * LIN_A) ** 2 * P + h * LIN_SIGMA**2
            moments.append((m, P))
        for j, k in enumerate(LIN_OBS):
            m, P = moments[k]
            total += float(dist.Normal(m, LIN_NOISE_SD).log_prob(y[i, j])) - P / (
                2 * LIN_NOISE_SD**2
            )
        a = float(x0_loc[i])
        total -= (
            math.log(LIN_S0 / x0_scale) + (x0_scale**2 + (a - LIN_M0) ** 2) / (2 * LIN_S0**2) - 0.5
        )
    return total


def test_vectorized_elbo_of_initial_girsanov_guide_is_unbiased_for_exact_value():
    """20 independent estimates with 500 vectorized particles each; their mean must be within
    4.5 standard errors of the exact value (t with 19 degrees of freedom: false alarm rate
    about 2e-4)."""
    y = torch.tensor([[0.6, -0.1], [-0.3, 0.4]])
    x0_loc, x0_scale = torch.tensor([0.1, -0.4]), 0.3
    start = torch.zeros(2, LIN_TIMES.shape[0], 1)
    start[:, 0, 0] = x0_loc
    guide = GirsanovGuide(
        linear_model,
        control="affine",
        init_path="prior",  # the guide starts at the prior, whose ELBO is known in closed form
        init_scale=x0_scale,
        init_loc_fn=init_to_value(values={"x": start}),
    )
    elbo = Trace_ELBO(num_particles=500, vectorize_particles=True)
    losses = torch.tensor([elbo.loss(linear_model, guide, y) for _ in range(20)])
    exact_loss = -exact_initial_elbo(y, x0_loc, x0_scale)
    standard_error = losses.std() / math.sqrt(len(losses))
    assert standard_error > 0
    assert abs(losses.mean() - exact_loss) < 4.5 * standard_error, (losses.mean(), exact_loss)


def test_girsanov_guide_follows_float64_model():
    times = TIMES.to(F64)
    y = observations(global_theta_model, times)
    for control in ("affine", "mlp"):
        pyro.clear_param_store()
        guide = GirsanovGuide(global_theta_model, control=control)
        elbo = Trace_ELBO(num_particles=2, vectorize_particles=True)
        loss = elbo.differentiable_loss(global_theta_model, guide, y, times=times)
        assert loss.dtype == F64 and torch.isfinite(loss)
        samples = Predictive(global_theta_model, guide=guide, num_samples=3, parallel=True)(
            y, times=times
        )
        assert samples["x"].dtype == F64


# ------------------------------------------------------------------------------------ NUTS

NUTS_TIMES = torch.tensor([0.0, 0.2, 0.5, 0.6, 0.9, 1.2], dtype=F64)
NUTS_A, NUTS_B, NUTS_SIGMA, NUTS_M0, NUTS_S0 = -0.8, 0.3, 0.6, 0.5, 0.8
NUTS_OBS, NUTS_R = [2, 5], 0.3**2
NUTS_Y = torch.tensor([1.0, -0.2], dtype=F64)


def short_path_model():
    init = dist.Normal(torch.tensor([NUTS_M0], dtype=F64), NUTS_S0).to_event(1)
    law = EulerMaruyama(
        lambda t, x: NUTS_A * x + NUTS_B,
        torch.tensor([NUTS_SIGMA], dtype=F64),
        init,
        NUTS_TIMES,
    )
    x = pyro.sample("x", law)
    pyro.sample("y", dist.Normal(x[..., NUTS_OBS, 0], NUTS_R**0.5).to_event(1), obs=NUTS_Y)


def check_nuts_against_exact_posterior(warmup_steps, num_samples, z_tol=4.5):
    """Posterior means and variances of ``x_k`` from NUTS against the exact ones, in units of
    their Monte Carlo standard errors: ``sd / sqrt(ESS)`` for a mean, ``sqrt(2) sd² /
    sqrt(ESS)`` for the variance estimate ``mean((x - μ)²)`` (Gaussian posterior). 12 z-scores
    below 4.5: a correct sampler fails with probability below 1e-4."""
    posterior = LinearGaussianPath(
        [[NUTS_A]], [NUTS_B], [[NUTS_SIGMA]], [NUTS_M0], [[NUTS_S0**2]], NUTS_TIMES
    ).observe([[1.0]], NUTS_OBS, [[NUTS_R]], NUTS_Y)
    mean, sd = (v[:, 0] for v in posterior.marginals())
    mcmc = MCMC(
        NUTS(short_path_model, full_mass=True),
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        disable_progbar=True,
    )
    mcmc.run()
    x = mcmc.get_samples()["x"][..., 0]  # (S, K+1)
    assert x.shape == (num_samples, NUTS_TIMES.shape[0])
    ess = effective_sample_size(x.unsqueeze(0))
    z_mean = (x.mean(0) - mean) / (sd / ess.sqrt())
    squares = (x - mean) ** 2
    ess_squares = effective_sample_size(squares.unsqueeze(0))
    z_var = (squares.mean(0) - sd**2) / (math.sqrt(2) * sd**2 / ess_squares.sqrt())
    assert z_mean.abs().max() < z_tol, z_mean
    assert z_var.abs().max() < z_tol, z_var


def test_nuts_on_short_path_site_matches_exact_posterior():
    check_nuts_against_exact_posterior(warmup_steps=100, num_samples=200)


@pytest.mark.slow
def test_nuts_on_short_path_site_matches_exact_posterior_long_run():
    check_nuts_against_exact_posterior(warmup_steps=300, num_samples=1500)
