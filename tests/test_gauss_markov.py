"""The Gauss–Markov Girsanov posterior: the parallel scan, its law and its densities.

The parallel sampler must give exactly the path the sequential Euler–Maruyama simulation gives
with the same noise (for every noise type, rank-deficient ones included), and the densities
recorded while sampling must equal the densities evaluated from scratch, values and gradients.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_nsde import EulerMaruyama, GaussMarkovEulerMaruyama, LinearControl
from pyro_nsde.posterior.gauss_markov import check_linear_family
from pyro_nsde.posterior.girsanov import path_gradient_surrogate
from pyro_nsde.posterior.scan import affine_scan
from pyro_nsde.sde.euler_maruyama import simulate


def _loop(A, b, x0, diagonal=False):
    x, out = x0, []
    for k in range(b.shape[0]):
        x = (A[k] * x if diagonal else (A[k] @ x.unsqueeze(-1)).squeeze(-1)) + b[k]
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 64, 101])
@pytest.mark.parametrize("diagonal", [False, True], ids=["matrix", "diagonal"])
def test_affine_scan_matches_the_loop(num_steps, diagonal):
    generator = torch.Generator().manual_seed(num_steps)
    d = 3
    shape = (num_steps, 2, d) if diagonal else (num_steps, 2, d, d)
    noise = 0.2 * torch.randn(shape, generator=generator, dtype=torch.float64)
    A = (1.0 if diagonal else torch.eye(d, dtype=torch.float64)) + noise
    b = torch.randn(num_steps, 2, d, generator=generator, dtype=torch.float64)
    x0 = torch.randn(d, generator=generator, dtype=torch.float64)  # broadcast over the batch
    expected = _loop(A, b, x0.expand(2, d), diagonal)
    assert torch.allclose(affine_scan(A, b, x0), expected, atol=1e-12)


def test_affine_scan_is_accurate_on_long_float32_chains():
    """K = 10⁴ steps in float32 of a contracting and of a nearly neutral chain: products of the
    transitions underflow to zero instead of being divided out, so the scan stays as accurate
    as the loop (compared in float64)."""
    generator = torch.Generator().manual_seed(0)
    num_steps, d = 10_000, 2
    for rate in (-5.0, -1e-3):
        A = (
            torch.eye(d)
            + 0.01 * rate * torch.eye(d)
            + 1e-3 * torch.randn(num_steps, d, d, generator=generator)
        )
        b = 0.1 * torch.randn(num_steps, d, generator=generator)
        x0 = torch.ones(d)
        scanned = affine_scan(A, b, x0)
        assert torch.isfinite(scanned).all()
        exact = _loop(A.double(), b.double(), x0.double())
        error = (scanned.double() - exact).abs().max() / exact.abs().max()
        assert error < 1e-4


def _oscillator_drift(t, x):
    return torch.stack([x[..., 1], -4.0 * x[..., 0] - 0.3 * x[..., 1] + torch.cos(t[..., 0])], -1)


def _pendulum_drift(t, x):
    return torch.stack([x[..., 1], -torch.sin(x[..., 0])], -1)


CASES = {
    "diagonal": (_pendulum_drift, torch.tensor([0.5, 0.8]), "diagonal", "full"),
    "rank_deficient": (_oscillator_drift, torch.tensor([[0.0], [0.8]]), "general", "full"),
    "general": (_oscillator_drift, torch.tensor([[0.3, 0.1], [0.2, 0.8]]), "general", "diagonal"),
    "scalar": (_oscillator_drift, torch.tensor([[0.0], [1.0]]), "scalar", "prior"),
    "more_noise": (
        _pendulum_drift,
        torch.tensor([[0.3, 0.1, 0.2], [0.2, 0.8, 0.1]]),
        "general",
        "prior",
    ),
}


def _posterior(case, times, gain="full"):
    drift, diffusion, noise_type, covariance = CASES[case]
    dtype = times.dtype
    prior = EulerMaruyama(
        drift,
        diffusion.to(dtype),
        dist.Normal(torch.zeros(2, dtype=dtype), 1.0).to_event(1),
        times,
        noise_type=noise_type,
    )
    control = LinearControl(
        prior.num_steps, 2, prior.noise_dim, covariance=covariance, gain=gain
    ).to(dtype)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        control.loc = torch.randn(control.loc.shape, generator=generator, dtype=dtype)
        control.gain = torch.randn(control.gain.shape, generator=generator, dtype=dtype)
        if covariance == "full":
            m = prior.noise_dim
            factor = torch.eye(m, dtype=dtype) + 0.3 * torch.ones(m, m, dtype=dtype).tril(-1)
            control.scale = factor.expand(control.scale.shape).clone()
        elif covariance == "diagonal":
            control.scale = 0.5 + torch.rand(control.scale.shape, generator=generator, dtype=dtype)
    return prior, control


@pytest.mark.parametrize("gain", ["full", "diagonal"])
@pytest.mark.parametrize("case", list(CASES))
def test_parallel_sampler_is_the_sequential_chain(case, gain):
    times = torch.cat([torch.zeros(1), torch.cumsum(0.01 + 0.09 * torch.rand(40), 0)]).double()
    prior, control = _posterior(case, times, gain)
    check_linear_family(prior)
    posterior = GaussMarkovEulerMaruyama(prior, control)
    pyro.set_rng_seed(1)
    path = posterior.rsample((5,))
    pyro.set_rng_seed(1)
    x0 = posterior.init.expand((5,)).rsample()
    eps = torch.randn(40, 5, prior.noise_dim, dtype=times.dtype)
    sequential, _ = simulate(prior, x0, eps, control=posterior.control)
    assert torch.allclose(path, sequential, atol=1e-10)


@pytest.mark.parametrize("gain", ["full", "diagonal"])
@pytest.mark.parametrize("case", list(CASES))
def test_recorded_densities_equal_densities_from_scratch(case, gain):
    times = torch.linspace(0.0, 2.0, 31, dtype=torch.float64)
    prior, control = _posterior(case, times, gain)
    posterior = GaussMarkovEulerMaruyama(prior, control)
    for law in (posterior, prior):
        path = posterior.rsample((4,))
        recorded = law.log_prob(path)  # read from what the sampler recorded
        scratch = law.log_prob(path.detach() + (path - path.detach()))  # no record
        assert torch.allclose(recorded, scratch, atol=1e-9)
        for parameter in (control.loc, control.gain):
            (grad_recorded,) = torch.autograd.grad(recorded.sum(), parameter, retain_graph=True)
            (grad_scratch,) = torch.autograd.grad(scratch.sum(), parameter, retain_graph=True)
            assert torch.allclose(grad_recorded, grad_scratch, atol=1e-8)


def test_path_follows_the_coefficients_not_the_diffusion():
    """With a state-space step factor the law of the path does not depend on the prior's
    diffusion: doubling the diffusion leaves samples unchanged."""
    times = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)
    paths = []
    for scale in (1.0, 2.0):
        prior = EulerMaruyama(
            _pendulum_drift,
            scale * torch.tensor([0.5, 0.8], dtype=torch.float64),
            torch.zeros(2, dtype=torch.float64),
            times,
        )
        control = LinearControl(20, 2, covariance="diagonal", state_scale=True).double()
        pyro.set_rng_seed(0)
        paths.append(GaussMarkovEulerMaruyama(prior, control).rsample((3,)))
    assert torch.equal(paths[0], paths[1])


def test_unsupported_families_raise_clear_errors():
    times = torch.linspace(0.0, 1.0, 11)
    x0 = torch.zeros(2)
    velocity_noise = torch.tensor([[0.0], [1.0]])
    # the noise-free row dq = p dt is affine, the noisy one need not be: accepted
    check_linear_family(
        EulerMaruyama(_pendulum_drift, velocity_noise, x0, times, noise_type="general")
    )
    nonlinear_noise_free = EulerMaruyama(
        lambda t, x: torch.stack([torch.sin(x[..., 1]), -x[..., 0]], -1),
        velocity_noise,
        x0,
        times,
        noise_type="general",
    )
    with pytest.raises(ValueError, match=r"affine in the state.*control='affine' or 'mlp'"):
        check_linear_family(nonlinear_noise_free)
    state_dependent = EulerMaruyama(
        _oscillator_drift,
        lambda t, x: torch.stack([0.1 + x[..., 0] ** 2, 0.2 + 0 * x[..., 1]], -1),
        x0,
        times,
    )
    check_linear_family(state_dependent, state_scale=True)  # diagonal: a learned factor
    with pytest.raises(ValueError, match="depends on x: use control='affine' or 'mlp'"):
        check_linear_family(state_dependent)


def test_amortized_linear_guide_learns_the_posterior_of_many_series():
    """``control="linear"`` with a GRU encoder: the coefficients ``(a_k, B_k, S_k)`` come from
    the per-step context, so one network serves every series, trained without a loop over
    steps. On 64 OU series (40 steps, every 4th observed with noise 0.1) its posterior mean
    path moves from the prior's to within a small fraction of the exact posterior mean."""
    from pyro.infer import SVI, Trace_ELBO
    from reference import LinearGaussianPath

    from pyro_nsde import GirsanovGuide, GRUEncoder
    from pyro_nsde.zoo.series import GriddedSeries

    generator = torch.Generator().manual_seed(3)
    num, steps, every = 64, 40, 4
    times = torch.linspace(0.0, 2.0, steps + 1)
    obs = torch.arange(every, steps + 1, every)
    x = torch.zeros(num, steps + 1)
    x[:, 0] = torch.randn(num, generator=generator)
    for k in range(steps):
        x[:, k + 1] = x[:, k] * 0.95 + 0.5 * 0.05**0.5 * torch.randn(num, generator=generator)
    values = torch.zeros(num, steps + 1, 1)
    mask = torch.zeros(num, steps + 1, 1, dtype=torch.bool)
    values[:, obs, 0] = x[:, obs] + 0.1 * torch.randn(num, len(obs), generator=generator)
    mask[:, obs] = True
    data = GriddedSeries(times, values, mask)

    def model(data):
        init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
        with pyro.plate("series", num, dim=-1):
            path = pyro.sample(
                "x", EulerMaruyama(lambda t, x: -x, torch.tensor([0.5]), init, data.times)
            )
            likelihood = dist.Normal(path, 0.1).mask(data.mask).to_event(2)
            pyro.sample("y", likelihood, obs=data.values)

    exact = torch.stack(
        [
            LinearGaussianPath([[-1.0]], [0.0], [[0.5]], [0.0], [[1.0]], times)
            .observe([[1.0]], obs.tolist(), [[0.01]], values[i, obs].double())
            .marginals()[0][:, 0]
            for i in range(num)
        ]
    )

    guide = GirsanovGuide(model, control="linear", covariance="full", encoder=GRUEncoder(1, 8, 16))

    def mean_path_error():
        with torch.no_grad(), pyro.plate("draws", 200, dim=-2):
            paths = guide(data)["x"]
        return float((paths.mean(0)[..., 0].double() - exact).abs().mean())

    with torch.no_grad():
        site = pyro.poutine.trace(guide).get_trace(data).nodes["x"]
    fn = site["fn"]
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    assert isinstance(fn, GaussMarkovEulerMaruyama)
    before = mean_path_error()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(300):
        svi.step(data)
    after = mean_path_error()
    assert after < 0.25 * before, (before, after)


def test_a_guide_with_diagonal_gains_starts_at_the_exact_posterior_mean(default_dtype):
    """``GirsanovGuide(model, gain="diagonal")`` on a linear SDE whose coordinates interact
    (an oscillator with noise on both): the Laplace start projected onto diagonal gains keeps
    the exact posterior mean path (its spread is only approximate)."""
    from pyro import poutine
    from test_guide import LinearProblem

    from pyro_nsde import GirsanovGuide

    default_dtype(torch.float64)
    problem = LinearProblem(
        ((0.0, 1.0), (-4.0, -0.2)), ((0.3, 0.0), (0.1, 0.8)), ((1.0, 0.0),), "general", 60, 3, 0.05
    )
    guide = GirsanovGuide(problem.model, gain="diagonal")
    guide(problem.y)
    assert guide.controls.x.gain.shape == (60, 2)
    pyro.set_rng_seed(0)
    with pyro.plate("draws", 2000, dim=-1), torch.no_grad():
        paths = poutine.trace(guide).get_trace(problem.y).nodes["x"]["value"]
    mean, sd = problem.posterior.marginals()
    error = (paths.mean(0) - mean).abs() / (sd / 2000**0.5)
    assert error.max() < 4.5


def test_diagonal_gains_are_for_the_linear_control():
    from test_guide import LinearProblem

    from pyro_nsde import GirsanovGuide

    problem = LinearProblem(((-1.0,),), ((0.5,),), ((1.0,),), "diagonal", 20, 2, 0.1)
    guide = GirsanovGuide(problem.model, control="affine", gain="diagonal")
    with pytest.raises(ValueError, match="gain='diagonal' is for control='linear'"):
        guide(problem.y)
    with pytest.raises(ValueError, match="gain must be one of"):
        GirsanovGuide(problem.model, gain="banded")


def gauss_markov_law(num_steps, state_dim, batch=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    times = torch.cumsum(
        torch.rand(num_steps + 1, generator=generator, dtype=torch.float64) * 0.2 + 0.05, 0
    )
    prior = EulerMaruyama(
        lambda t, x: torch.sin(x) - 0.5 * x,
        torch.full((state_dim,), 0.7, dtype=torch.float64),
        dist.Normal(torch.zeros(state_dim, dtype=torch.float64), 1.0).to_event(1),
        times,
    )
    control = LinearControl(num_steps, state_dim, batch_shape=batch, covariance="diagonal").double()
    with torch.no_grad():
        for param in control.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return GaussMarkovEulerMaruyama(prior, control)


@pytest.mark.parametrize("noise", ["diagonal", "general"])
def test_sticking_the_landing_without_the_prior_drift(noise):
    """Where the noise reaches every direction the prior's drift cancels from the Gauss–Markov
    chain's ``log q``: the surrogate of ``estimator="stl"`` evaluated without it has the same
    value and the same gradients as with it."""
    law = gauss_markov_law(20, 2, batch=(3,), seed=2)
    if noise == "general":
        prior = law.prior
        g = torch.tensor([[0.7, 0.2], [-0.1, 0.5]], dtype=torch.float64)
        prior = EulerMaruyama(prior.drift, g, prior.init, prior.times, noise_type="general")
        law = GaussMarkovEulerMaruyama(prior, law.control)
    x = law.rsample().detach()
    assert torch.allclose(law.chain_log_density(x), law._exact_log_prob(x), atol=1e-9)
    # The surrogate is (score · x) less its value: its gradient in x is the score.
    point = x.clone().requires_grad_()
    with_drift = path_gradient_surrogate(law._exact_log_prob, point)
    (expected,) = torch.autograd.grad(with_drift.sum(), point)
    (got,) = torch.autograd.grad(law._path_gradient_surrogate(point).sum(), point)
    assert expected.abs().max() > 0.1
    assert torch.allclose(got, expected, atol=1e-8)
