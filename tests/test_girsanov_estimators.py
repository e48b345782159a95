"""The gradient estimators of :class:`~pyro_nsde.GirsanovGuide` (``"girsanov"``, ``"plain"``,
``"stl"``): the same exact loss, unbiased ELBO gradients, and their variances.

For an affine control on a linear SDE the guide's path law is Gaussian, so its ELBO is known in
closed form as a differentiable function of the guide's parameters
(:class:`reference.AffineGaussianChain`). Each estimator's gradient is averaged over many
independent batches of particles and compared with the exact gradient, coordinate by coordinate,
at a Bonferroni-corrected level computed from the batch-to-batch variance.
"""

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from reference import init_posterior, step_noise_regressions
from scipy.stats import norm
from test_guide import OSCILLATOR, OU, LinearProblem, affine_chain_of, estimate_elbo

from pyro_nsde import ControlNet, GirsanovGuide

ESTIMATORS = ("girsanov", "plain", "stl")

# The same oscillator with its (2, 1) diffusion passed as scalar noise, and 2-D problems with
# diagonal and full-rank additive noise, both coordinates observed.
SCALAR_OSCILLATOR = LinearProblem(OSCILLATOR.A, OSCILLATOR.G, OSCILLATOR.H, "scalar", 10, 2, 0.3)
COUPLED = ((-1.0, 0.5), (0.0, -0.5))
DIAGONAL_2D = LinearProblem(
    COUPLED, ((0.6, 0.0), (0.0, 0.4)), ((1.0, 0.0), (0.0, 1.0)), "diagonal", 10, 2, 0.3
)
ADDITIVE_2D = LinearProblem(
    COUPLED, ((0.5, 0.2), (0.1, 0.4)), ((1.0, 0.0), (0.0, 1.0)), "additive", 10, 2, 0.3
)
NOISE_TYPES = {
    "diagonal-1d": OU,
    "general-rank-deficient": OSCILLATOR,
    "scalar": SCALAR_OSCILLATOR,
    "diagonal-2d": DIAGONAL_2D,
    "additive-2d": ADDITIVE_2D,
}


def random_affine_guide(problem, covariance="prior", estimator="girsanov", seed=0):
    """An affine ``GirsanovGuide`` with random coefficients, increment scales and ``q(x_0)``."""
    pyro.clear_param_store()
    # init_path="prior": the control's parameters are the coefficients themselves, not
    # corrections to a Laplace fit, so that the reference reads them as they are.
    guide = GirsanovGuide(
        problem.model,
        control="affine",
        covariance=covariance,
        estimator=estimator,
        init_path="prior",
    )
    guide(problem.y)
    generator = torch.Generator().manual_seed(seed)

    def noise(like, scale):
        return scale * torch.randn(like.shape, generator=generator, dtype=like.dtype)

    control = guide.controls.x
    with torch.no_grad():
        control.loc = noise(control.loc, 0.4)
        control.gain = noise(control.gain, 0.4)
        if covariance == "diagonal":
            control.scale = noise(control.scale, 0.2).exp()
        elif covariance == "full":
            raw = noise(control.scale, 0.2)
            control.scale = raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
        guide.x0_locs.x = noise(guide.x0_locs.x, 0.5)
        raw = noise(guide.x0_scales.x, 0.2)
        if covariance == "full":  # a full-rank q(x_0): a lower-triangular scale
            guide.x0_scales.x = 0.5 * (
                raw.tril(-1) + torch.diag_embed(raw.diagonal(0, -2, -1).exp())
            )
        else:
            guide.x0_scales.x = 0.5 * raw.exp()
    return guide


def parameters(guide):
    """The guide's (unconstrained) parameters, in a fixed order."""
    return [p for _, p in sorted(guide.named_parameters())]


def gradient_batches(model, guide, *args, num_batches=200, batch_size=50):
    """ELBO gradients, each averaged over ``batch_size`` vectorized particles:
    ``(num_batches, P)`` float64 (``P`` parameters, flattened)."""
    elbo = Trace_ELBO(num_particles=batch_size, vectorize_particles=True, max_plate_nesting=1)
    params = parameters(guide)
    rows = []
    for _ in range(num_batches):
        loss = elbo.differentiable_loss(model, guide, *args)
        grads = torch.autograd.grad(-loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).double()


def exact_gradient(problem, guide):
    exact = problem.exact_elbo(affine_chain_of(problem, guide))
    grads = torch.autograd.grad(exact, parameters(guide))
    return torch.cat([g.reshape(-1) for g in grads]).double()


def max_z_score(batches, expected, other=None):
    """``max_j |mean_j - expected_j| / se_j`` (and the two-sample version against ``other``
    batches), with the Bonferroni two-sided threshold for a family-wise level of 1e-3.

    ``se_j`` has a float32 round-off floor ``1e-5 (1 + |expected_j|)``: some coordinates have
    deterministic gradients (e.g. the scale of a last step no observation sees).
    """
    mean, var = batches.mean(0), batches.var(0) / len(batches)
    if other is not None:
        expected = other.mean(0)
        var = var + other.var(0) / len(other)
    var = var + (1e-5 * (1 + expected.abs())) ** 2
    z = (mean - expected).abs() / var.sqrt()
    return float(z.max()), float(norm.isf(1e-3 / (2 * len(z))))


def per_particle_variance(batches, batch_size=50):
    """Total (trace) variance of one particle's gradient estimate."""
    return float(batch_size * batches.var(0).sum())


@pytest.mark.parametrize("covariance", ["prior", "diagonal", "full"])
@pytest.mark.parametrize("name", list(NOISE_TYPES))
def test_elbo_estimate_matches_exact_elbo_of_affine_guide(name, covariance):
    """At random guide parameters the mean log weight ``log p(x, y) - log q(x)`` equals the
    closed-form ELBO: the guide's and the model's path densities are exact for every noise
    type, including the rank-deficient one."""
    problem = NOISE_TYPES[name]
    guide = random_affine_guide(problem, covariance)
    exact = problem.exact_elbo(affine_chain_of(problem, guide)).item()
    estimate = estimate_elbo(problem.model, guide, problem.y, num_samples=4000)
    assert abs(estimate.mean - exact) < 4 * estimate.stderr, (estimate.mean, exact)


@pytest.mark.parametrize("covariance", ["prior", "full"])
def test_estimators_report_the_same_exact_loss(covariance):
    """Same seed, same particles: the loss ``Trace_ELBO`` reports (what ``SVI.step`` returns)
    is the same number for all three estimators, and equals the no-grad ``loss``."""
    values = []
    for estimator in ESTIMATORS:
        guide = random_affine_guide(OU, covariance, estimator)
        elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
        pyro.set_rng_seed(1)
        values.append(elbo.loss_and_grads(OU.model, guide, OU.y))
        pyro.set_rng_seed(1)
        values.append(elbo.loss(OU.model, guide, OU.y))
    assert max(values) - min(values) < 1e-5 * abs(values[0]), values


@pytest.mark.parametrize("covariance", ["prior", "full"])
@pytest.mark.parametrize("name", ["ou", "oscillator"])
def test_estimators_give_the_exact_elbo_gradient(name, covariance):
    """10 000 particles per estimator (200 batches of 50): the mean gradient with respect to
    every unconstrained parameter (control, increment scale, ``q(x_0)``) agrees with the
    gradient of the closed-form ELBO at a Bonferroni level of 1e-3."""
    problem = {"ou": OU, "oscillator": OSCILLATOR}[name]
    for estimator in ESTIMATORS:
        guide = random_affine_guide(problem, covariance, estimator)
        expected = exact_gradient(problem, guide)
        pyro.set_rng_seed(2)
        batches = gradient_batches(problem.model, guide, problem.y)
        z, threshold = max_z_score(batches, expected)
        assert z < threshold, (estimator, z, threshold)


@pytest.mark.parametrize("covariance", ["prior", "diagonal"])
def test_estimators_agree_for_a_random_control_net(covariance):
    """A ``ControlNet`` with random weights (no closed form): ``"girsanov"`` and ``"stl"`` have
    the same expected gradient as ``"plain"`` (two-sample test per parameter)."""
    batches = {}
    for estimator in ESTIMATORS:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        net = ControlNet(1, hidden_dims=(8,), covariance=covariance)
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
        guide = GirsanovGuide(OU.model, control=net, estimator=estimator)
        pyro.set_rng_seed(3)
        batches[estimator] = gradient_batches(OU.model, guide, OU.y, num_batches=100)
    for estimator in ("girsanov", "stl"):
        z, threshold = max_z_score(batches[estimator], None, other=batches["plain"])
        assert z < threshold, (estimator, z, threshold)


def test_girsanov_estimator_has_lower_gradient_variance_than_plain():
    """Per-particle gradient variance (trace over all parameters) on the OU problem, at random
    parameters and at the exact optimum of the ``"full"`` family. At the optimum
    ``log p(x, y) - log q(x)`` is constant in ``x``, so ``"stl"`` has zero variance."""
    variances = {}
    for estimator in ESTIMATORS:
        guide = random_affine_guide(OU, "full", estimator)
        pyro.set_rng_seed(4)
        variances["random", estimator] = per_particle_variance(
            gradient_batches(OU.model, guide, OU.y, num_batches=100)
        )
        set_to_optimum(OU, guide)
        exact = OU.exact_elbo(affine_chain_of(OU, guide)).item()
        assert math.isclose(exact, OU.posterior.log_py, abs_tol=1e-4)
        pyro.set_rng_seed(4)
        variances["optimum", estimator] = per_particle_variance(
            gradient_batches(OU.model, guide, OU.y, num_batches=100)
        )
    for point in ("random", "optimum"):
        assert variances[point, "girsanov"] < variances[point, "plain"], variances
    assert variances["optimum", "stl"] < 1e-8 * variances["optimum", "plain"], variances


def set_to_optimum(problem, guide):
    """Set an affine guide to the best member of its family: the smoother's transition means
    ``α_k + β_k x``, its step covariances ``P_k`` for ``"full"`` (else ``I``), and the best
    mean-field ``q(x_0)`` (exact for ``d = 1``)."""
    loc, gain, cov = step_noise_regressions(problem.posterior)
    init_loc, init_cov = init_posterior(problem.posterior)
    control = guide.controls.x
    dtype = control.loc.dtype
    with torch.no_grad():
        control.loc = loc.to(dtype)
        control.gain = gain.to(dtype)
        if control.covariance == "full":
            control.scale = torch.linalg.cholesky(cov).to(dtype)
        guide.x0_locs.x = init_loc.to(dtype)
        if control.covariance == "full":  # q(x_0) is a full-rank normal
            guide.x0_scales.x = torch.linalg.cholesky(init_cov).to(dtype)
        else:  # the best diagonal q(x_0)
            guide.x0_scales.x = torch.linalg.inv(init_cov).diagonal().rsqrt().to(dtype)
