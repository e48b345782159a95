"""Inference accuracy of :class:`~pyro_nsde.GirsanovGuide` against exact Gaussian references.

For a linear SDE observed with Gaussian noise everything is known in closed form
(``tests/reference.py``): ``log p(y)``, the smoother's marginals, the best ELBO a mean-shift guide
can reach on the grid (``log p(y) - mean_shift_gap()``) and the marginals of that best guide. The
tests train the guide with SVI as a user would and compare. Models are float32 (torch's default);
references are float64.
"""

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.importance import vectorized_importance_weights
from reference import (
    AffineGaussianChain,
    LinearGaussianPath,
    init_posterior,
    mean_field_init_gap,
    observation_law,
    step_noise_regressions,
)

from pyro_nsde import EulerMaruyama, GirsanovGuide


@dataclass(frozen=True)
class LinearProblem:
    """``dX = A X dt + G dW`` on ``num_steps`` equal steps of ``[0, end_time]``, ``x_0 ~ N(0, I)``,
    observed every ``obs_every`` steps as ``y_j ~ N(H x_{k_j}, noise² I)`` with fixed data
    ``y_j = sin(3 t_j)``: as a Pyro model (site ``"x"``, event ``(K+1, d)``; site ``"y"``,
    ``(J, p)``) and as its exact reference.

    :param A: ``(d, d)``; :param G: ``(d, m)``; :param H: ``(p, d)``.
    :param str noise_type: how the model passes ``G``: ``"diagonal"`` (its diagonal),
        ``"scalar"`` (``m = 1``), ``"general"`` or ``"additive"``.
    """

    A: tuple
    G: tuple
    H: tuple
    noise_type: str
    num_steps: int
    obs_every: int
    noise: float
    end_time: float = 1.0

    @cached_property
    def times(self) -> torch.Tensor:
        return torch.linspace(0.0, self.end_time, self.num_steps + 1)

    @cached_property
    def obs_steps(self) -> list:
        return list(range(self.obs_every, self.num_steps + 1, self.obs_every))

    @cached_property
    def y(self) -> torch.Tensor:
        t = self.times[self.obs_steps]
        return torch.sin(3 * t).unsqueeze(-1).expand(-1, len(self.H)).clone()

    @cached_property
    def _tensors(self):
        G = torch.tensor(self.G)
        diffusion = G.diagonal() if self.noise_type == "diagonal" else G
        return torch.tensor(self.A), diffusion, torch.tensor(self.H)

    def model(self, y=None):
        A, diffusion, H = self._tensors
        d = A.shape[0]
        prior = EulerMaruyama(
            lambda t, x: x @ A.T,
            diffusion,
            dist.Normal(torch.zeros(d), 1.0).to_event(1),
            self.times,
            noise_type=self.noise_type,
        )
        x = pyro.sample("x", prior)
        pyro.sample(
            "y", dist.Normal(x[..., self.obs_steps, :] @ H.T, self.noise).to_event(2), obs=y
        )

    @cached_property
    def path(self) -> LinearGaussianPath:
        d = len(self.A)
        return LinearGaussianPath(self.A, [0.0] * d, self.G, [0.0] * d, torch.eye(d), self.times)

    @property
    def noise_cov(self) -> torch.Tensor:
        return self.noise**2 * torch.eye(len(self.H), dtype=torch.float64)

    @cached_property
    def posterior(self):
        return self.path.observe(self.H, self.obs_steps, self.noise_cov, self.y)

    def chain(self, loc, gain, scale, init_loc, init_cov) -> AffineGaussianChain:
        """The exact law of an affine guide with these coefficients (any float dtype)."""
        scale = None if scale is None else scale.double()
        return AffineGaussianChain(
            self.path, loc.double(), gain.double(), scale, init_loc.double(), init_cov.double()
        )

    def exact_elbo(self, chain: AffineGaussianChain) -> torch.Tensor:
        return chain.elbo(self.H, self.obs_steps, self.noise_cov, self.y)

    def optimum(self, step_covariance: bool) -> AffineGaussianChain:
        """The best affine guide with a mean-field ``q(x_0)`` (as ``GirsanovGuide`` has):
        transitions with the smoother's means and, with ``step_covariance``, its step
        covariances (else the prior's)."""
        loc, gain, cov = step_noise_regressions(self.posterior)
        init_loc, init_cov = init_posterior(self.posterior)
        init_cov = torch.diag(1 / torch.linalg.inv(init_cov).diagonal())
        scale = torch.linalg.cholesky(cov) if step_covariance else None
        return self.chain(loc, gain, scale, init_loc, init_cov)


# Ornstein–Uhlenbeck, d = m = 1: the mean shift stays 0.55 nats below log p(y) at h = 0.1.
OU = LinearProblem(((-1.0,),), ((0.7,),), ((1.0,),), "diagonal", 10, 2, 0.3)
# Position–velocity oscillator with noise on the velocity only: G is (2, 1), rank-deficient.
OSCILLATOR = LinearProblem(
    ((0.0, 1.0), (-4.0, -0.5)), ((0.0,), (1.0,)), ((1.0, 0.0),), "general", 10, 2, 0.3
)
PRECISE_OSCILLATOR = LinearProblem(
    ((0.0, 1.0), (-4.0, -0.5)), ((0.0,), (1.0,)), ((1.0, 0.0),), "general", 10, 2, 0.1
)
PROBLEMS = {"ou": OU, "oscillator": OSCILLATOR}


def fit(model, *args, steps, lr=0.05, decay=0.05, seed=0, num_particles=16, **guide_options):
    """Train a ``GirsanovGuide`` (affine control unless given) with Adam whose learning rate
    decays geometrically to ``decay * lr`` over ``steps``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide_options.setdefault("control", "affine")
    guide_options.setdefault("covariance", "prior")  # the mean shift of the paper
    guide = GirsanovGuide(model, **guide_options)
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay ** (1 / steps)})
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    svi = SVI(model, guide, optim, elbo)
    for _ in range(steps):
        svi.step(*args)
    return guide


@dataclass
class ElboEstimate:
    """Monte Carlo summary of the log importance weights ``log p(x, y) - log q(x)``, ``x ~ q``."""

    log_weights: torch.Tensor

    @property
    def mean(self) -> float:
        """The ELBO estimate."""
        return float(self.log_weights.mean())

    @property
    def stderr(self) -> float:
        return float(self.log_weights.std() / math.sqrt(len(self.log_weights)))

    @property
    def log_evidence(self) -> float:
        """The importance-sampling estimate ``log mean exp(log w)`` of ``log p(y)``."""
        return float(self.log_weights.logsumexp(0) - math.log(len(self.log_weights)))

    @property
    def log_evidence_stderr(self) -> float:
        """Delta-method standard error of :attr:`log_evidence`."""
        w = (self.log_weights - self.log_weights.max()).exp()
        return float(w.std() / w.mean() / math.sqrt(len(w)))


def estimate_elbo(model, guide, *args, num_samples=4000) -> ElboEstimate:
    with torch.no_grad():
        log_weights, _, _ = vectorized_importance_weights(
            model, guide, *args, num_samples=num_samples, max_plate_nesting=1
        )
    return ElboEstimate(log_weights.double())


def sample_paths(model, guide, *args, num_samples=10000) -> torch.Tensor:
    """Paths ``(num_samples, K+1, d)`` from the guide, float64."""
    predictive = Predictive(
        model, guide=guide, num_samples=num_samples, return_sites=["x"], parallel=True
    )
    with torch.no_grad():
        return predictive(*args)["x"].double()


def affine_chain_of(problem: LinearProblem, guide: GirsanovGuide) -> AffineGaussianChain:
    """The exact law of a trained affine ``GirsanovGuide`` on ``problem``."""
    control = guide.controls.x
    scale = None if control.covariance == "prior" else control.scale
    if control.covariance == "diagonal":
        scale = torch.diag_embed(scale)
    init_scale = guide.x0_scales.x  # lower-triangular for covariance="full", else diagonal
    init_cov = init_scale @ init_scale.T if init_scale.dim() == 2 else torch.diag(init_scale**2)
    return problem.chain(control.loc, control.gain, scale, guide.x0_locs.x, init_cov)


@dataclass
class TrainedGuide:
    problem: LinearProblem
    elbo: ElboEstimate
    paths: torch.Tensor


def train_and_measure(problem, steps, **options) -> TrainedGuide:
    """:func:`fit` (``options`` as there), then 4000 log weights and 10 000 paths."""
    guide = fit(problem.model, problem.y, steps=steps, **options)
    elbo = estimate_elbo(problem.model, guide, problem.y)
    return TrainedGuide(problem, elbo, sample_paths(problem.model, guide, problem.y))


def check_marginals(paths, mean, sd, *, tol=0.1):
    """Sample means of ``paths`` ``(n, K+1, d)`` within ``tol`` sds of ``mean`` ``(K+1, d)``,
    and sample sds within ``tol / 2`` relative error of ``sd``. The tolerances include the
    sampling error (10 000 samples: 0.01 sd for means, 0.7 % for sds)."""
    error = ((paths.mean(0) - mean).abs() / sd).max()
    assert error < tol, f"marginal means off by {error:.3f} sd"
    rel = ((paths.std(0) - sd).abs() / sd).max()
    assert rel < tol / 2, f"marginal sds off by {rel:.1%}"


# --------------------------------------------------------------------------- the bound itself


def test_mean_shift_gap_is_the_kl_of_the_best_affine_guide():
    """The reference's gap formula agrees with the ELBO of the guide it describes, computed
    independently as the ELBO of a Gaussian chain; perturbing that guide lowers its ELBO."""
    problem = OU
    post = problem.posterior
    loc, gain, _ = step_noise_regressions(post)
    init_loc, init_cov = init_posterior(post)
    best = problem.exact_elbo(problem.chain(loc, gain, None, init_loc, init_cov))
    assert abs(float(best) - (post.log_py - post.mean_shift_gap())) < 1e-8
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        dloc = 0.05 * torch.randn(loc.shape, generator=generator, dtype=torch.float64)
        dgain = 0.05 * torch.randn(gain.shape, generator=generator, dtype=torch.float64)
        chain = problem.chain(loc + dloc, gain + dgain, None, init_loc, init_cov)
        assert float(problem.exact_elbo(chain)) < float(best)


def test_mean_shift_gap_shrinks_linearly_as_the_grid_is_refined():
    """Same observations (times 0.2, 0.4, ..., 1), grids of 10, 20 and 40 steps: the gap halves
    with the step (0.55, 0.24, 0.11 nats)."""
    gaps = []
    for num_steps in (10, 20, 40):
        problem = LinearProblem(OU.A, OU.G, OU.H, "diagonal", num_steps, num_steps // 5, OU.noise)
        gaps.append(problem.posterior.mean_shift_gap())
    for coarse, fine in itertools.pairwise(gaps):
        assert 1.8 < coarse / fine < 2.5, gaps


# ------------------------------------------------------------------- trained mean-shift guides


@pytest.fixture(scope="module", params=list(PROBLEMS))
def mean_shift_guide(request) -> TrainedGuide:
    return train_and_measure(PROBLEMS[request.param], steps=800)


def test_elbo_stays_below_log_evidence_at_initial_and_random_guides():
    for problem in PROBLEMS.values():
        for control in ("affine", "mlp"):
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            guide = GirsanovGuide(problem.model, control=control, covariance="prior")
            estimates = [estimate_elbo(problem.model, guide, problem.y)]
            with torch.no_grad():
                if control == "affine":
                    guide.controls.x.loc = 0.3 * torch.randn_like(guide.controls.x.loc)
                    guide.controls.x.gain = 0.3 * torch.randn_like(guide.controls.x.gain)
                else:
                    torch.nn.init.normal_(guide.controls.x.head.weight, std=0.3)
            estimates.append(estimate_elbo(problem.model, guide, problem.y))
            for estimate in estimates:
                assert estimate.mean < problem.posterior.log_py + 3 * estimate.stderr


def test_trained_elbo_stays_below_log_evidence(mean_shift_guide):
    elbo, post = mean_shift_guide.elbo, mean_shift_guide.problem.posterior
    assert elbo.mean < post.log_py + 3 * elbo.stderr


def test_affine_guide_reaches_the_best_mean_shift_elbo(mean_shift_guide):
    """Within 0.1 nats of ``log p(y) - mean_shift_gap()`` (less the mean-field ``q(x_0)``
    gap, 0.17 nats for the oscillator) after 800 steps at lr 0.05."""
    problem, elbo = mean_shift_guide.problem, mean_shift_guide.elbo
    post = problem.posterior
    bound = post.log_py - post.mean_shift_gap() - mean_field_init_gap(post)
    assert abs(elbo.mean - bound) < 0.1 + 3 * elbo.stderr
    assert elbo.mean < bound + 3 * elbo.stderr


def test_importance_sampling_with_trained_guide_recovers_log_evidence(mean_shift_guide):
    elbo, post = mean_shift_guide.elbo, mean_shift_guide.problem.posterior
    assert abs(elbo.log_evidence - post.log_py) < 4 * elbo.log_evidence_stderr + 0.01


def test_affine_guide_marginals_match_the_mean_shift_optimum(mean_shift_guide):
    """The best mean-shift guide has the smoother's means but larger sds (each step keeps the
    prior's covariance); the trained guide matches it, not the smoother."""
    problem, paths = mean_shift_guide.problem, mean_shift_guide.paths
    mean, sd = problem.optimum(step_covariance=False).marginals()
    _, smoother_sd = problem.posterior.marginals()
    check_marginals(paths, mean, sd)
    assert ((sd - smoother_sd) / smoother_sd).max() > 0.1  # the two are distinguishable


@pytest.mark.slow
def test_affine_guide_reaches_the_best_mean_shift_elbo_with_precise_observations():
    """Observation noise 0.1: the optimal gains on the position are large and nearly collinear
    with the offsets (the position's posterior sd is 0.06-0.1); from the prior, Adam needed
    ~3000 steps at lr 0.05 to get within 0.1 nats (vs 200 for noise 0.3) and the marginals
    (whose sds differ from the smoother's by up to 34 % here) longer still (4000 steps with 64
    particles before issue 14). From the Laplace start (the best mean shift's coefficients)
    500 steps must keep it there: within 0.1 nats, marginals within 0.15 sd and 7.5 %."""
    problem = PRECISE_OSCILLATOR
    trained = train_and_measure(problem, steps=500, num_particles=16, decay=0.1)
    post, elbo = problem.posterior, trained.elbo
    bound = post.log_py - post.mean_shift_gap() - mean_field_init_gap(post)
    assert abs(elbo.mean - bound) < 0.1 + 3 * elbo.stderr
    mean, sd = problem.optimum(step_covariance=False).marginals()
    check_marginals(trained.paths, mean, sd, tol=0.15)


# ------------------------------------------------------------------- parameters and plates


def test_guide_recovers_ou_rate_with_lognormal_prior_across_series():
    """``θ ~ LogNormal(0, 0.5)``, 8 series of an OU with rate θ (true 1.5) in a plate, each
    observed 10 times. The guide's posterior median of θ matches the exact posterior median
    (quadrature over θ of the exact marginal likelihood) within 0.3 posterior sds, and the
    truth lies within 2 posterior sds. ``covariance="full"`` makes the path part exact given θ;
    the mean-shift guide puts the median 1.7 posterior sds too high here (its gap, 17 nats per
    series, shrinks as θ grows and so pulls θ up)."""
    true_rate, sigma, noise, num_series = 1.5, 0.5, 0.1, 8
    times = torch.linspace(0.0, 4.0, 21)
    obs_steps = list(range(2, 21, 2))

    def law(rate):
        path = LinearGaussianPath([[-rate]], [0.0], [[sigma]], [0.0], [[1.0]], times)
        return observation_law(path, [[1.0]], obs_steps, [[noise**2]])

    generator = torch.Generator().manual_seed(0)
    truth = law(true_rate)
    white = torch.randn(num_series, len(obs_steps), generator=generator, dtype=torch.float64)
    y = truth.loc + white @ torch.linalg.cholesky(truth.covariance_matrix).T

    rates = torch.linspace(0.2, 5.0, 481, dtype=torch.float64)
    prior = dist.LogNormal(torch.tensor(0.0, dtype=torch.float64), 0.5)
    log_post = torch.stack([prior.log_prob(r) + law(float(r)).log_prob(y).sum() for r in rates])
    weights = (log_post - log_post.max()).exp()
    weights = weights / weights.sum()
    exact_median = float(rates[(weights.cumsum(0) >= 0.5).nonzero()[0, 0]])
    exact_mean = float((weights * rates).sum())
    exact_sd = float((weights * (rates - exact_mean) ** 2).sum().sqrt())

    def model(y):
        rate = pyro.sample("rate", dist.LogNormal(0.0, 0.5))

        def drift(t, x):
            return -rate[..., None] * x

        init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
        with pyro.plate("series", num_series, dim=-1):
            x = pyro.sample("x", EulerMaruyama(drift, torch.tensor([sigma]), init, times))
            pyro.sample("y", dist.Normal(x[..., obs_steps, 0], noise).to_event(1), obs=y)

    guide = fit(model, y.float(), steps=800, lr=0.1, covariance="full")
    median = float(guide.median(y.float())["rate"])
    assert abs(exact_median - true_rate) < 2 * exact_sd
    assert abs(median - exact_median) < 0.3 * exact_sd, (median, exact_median, exact_sd)


def test_guide_follows_the_model_dtype():
    """A float64 model trains under torch's float32 default: the lazily built controls take
    the model's dtype."""
    times = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)

    def model(y):
        init = dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0).to_event(1)
        prior = EulerMaruyama(
            lambda t, x: -x, torch.tensor([0.7], dtype=torch.float64), init, times
        )
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x[..., -1, 0], 0.3), obs=y)

    y = torch.tensor(1.0, dtype=torch.float64)
    for control in ("affine", "mlp"):
        guide = fit(model, y, steps=2, control=control)
        assert guide(y)["x"].dtype == torch.float64
