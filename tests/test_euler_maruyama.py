"""The laws of :class:`pyro_nsde.EulerMaruyama` as a distribution: shapes, ``expand``, densities
against hand-written ones, the path record, moments and goodness of fit of samples against the
exact Euler–Maruyama recursion, pathwise gradients against finite differences, and dtypes.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro.distributions import constraints
from torch import nn

from pyro_nsde import ControlNet, EulerMaruyama

F64 = torch.float64
TIMES = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.6, 0.7], dtype=F64)
K = TIMES.shape[0] - 1
D = 2
DIAG_SCALE = torch.tensor([0.5, 0.8], dtype=F64)


def ou_drift(t, x):
    return -x + torch.sin(2 * t)


def standard_init(batch_shape=()):
    return dist.Normal(torch.zeros(batch_shape + (D,), dtype=F64), 1.0).to_event(1)


# ------------------------------------------------------------------------------------ shapes

SHIFTED_TIMES = torch.stack([TIMES, 2 * TIMES + 0.1])  # (2, K+1): one grid per series


def law_with_batch(source):
    """A law whose batch shape comes from ``source``; returns ``(law, batch_shape)``."""
    if source == "none":
        return EulerMaruyama(ou_drift, DIAG_SCALE, standard_init(), TIMES), ()
    if source == "init":
        return EulerMaruyama(ou_drift, DIAG_SCALE, standard_init((3,)), TIMES), (3,)
    if source == "times":
        return EulerMaruyama(ou_drift, DIAG_SCALE, standard_init(), SHIFTED_TIMES), (2,)
    if source == "init_and_times":
        law = EulerMaruyama(ou_drift, DIAG_SCALE, standard_init((3, 1)), SHIFTED_TIMES)
        return law, (3, 2)
    if source == "drift_plate":
        theta = torch.linspace(0.5, 2.5, K, dtype=F64)  # e.g. sampled in a plate of size K
        law = EulerMaruyama(lambda t, x: -theta[..., None] * x, DIAG_SCALE, standard_init(), TIMES)
        return law, (K,)
    if source == "diffusion":
        scale = DIAG_SCALE * torch.linspace(0.5, 1.5, 4, dtype=F64).unsqueeze(-1)  # (4, 2)
        return EulerMaruyama(ou_drift, scale, standard_init(), TIMES), (4,)
    if source == "expand":
        law = EulerMaruyama(ou_drift, DIAG_SCALE, standard_init((3,)), TIMES)
        return law.expand((5, 3)), (5, 3)
    raise ValueError(source)


BATCH_SOURCES = ["none", "init", "times", "init_and_times", "drift_plate", "diffusion", "expand"]


def test_event_shape_support_and_reparameterization():
    law = EulerMaruyama(ou_drift, DIAG_SCALE, standard_init(), TIMES)
    assert law.event_shape == (K + 1, D)
    assert law.batch_shape == ()
    assert law.has_rsample
    assert isinstance(law.support, constraints.independent)
    assert law.support.base_constraint is constraints.real
    assert law.support.reinterpreted_batch_ndims == 2
    assert law.num_steps == K and law.state_dim == D and law.noise_dim == D


@pytest.mark.parametrize("sample_shape", [(), (3,), (2, 4)])
@pytest.mark.parametrize("source", BATCH_SOURCES)
def test_rsample_and_log_prob_shapes(source, sample_shape, hand_log_prob):
    law, batch_shape = law_with_batch(source)
    assert law.batch_shape == batch_shape
    path = law.rsample(sample_shape)
    assert path.shape == sample_shape + batch_shape + (K + 1, D)
    assert law.log_prob(path).shape == sample_shape + batch_shape
    assert law.sample(sample_shape).shape == path.shape

    expected = hand_log_prob(path, law.drift, law.diffusion, "diagonal", law.init, law.times)
    assert torch.allclose(law.log_prob(path.clone()), expected, rtol=1e-10)


@pytest.mark.parametrize("source", BATCH_SOURCES)
def test_log_prob_broadcasts_a_value_without_batch_dims(source, hand_log_prob):
    """A single path ``(K+1, d)`` is scored against every batch member (as for any
    distribution: ``value`` broadcasts with ``batch_shape``). With ``source="drift_plate"``
    the batch size equals ``K``, where a mix-up of step and batch axes would go unnoticed."""
    law, batch_shape = law_with_batch(source)
    single = law.sample().reshape((-1, K + 1, D))[0]
    broadcast = single.expand(batch_shape + (K + 1, D))
    expected = hand_log_prob(broadcast, law.drift, law.diffusion, "diagonal", law.init, law.times)
    actual = law.log_prob(single)
    assert actual.shape == batch_shape
    assert torch.allclose(actual, expected, rtol=1e-10)


def test_expand_is_consistent_with_the_original(hand_log_prob):
    law = EulerMaruyama(ou_drift, DIAG_SCALE, standard_init((3,)), TIMES)
    expanded = law.expand((5, 3))
    assert expanded.batch_shape == (5, 3)
    assert expanded.event_shape == law.event_shape

    small = law.rsample((2,))  # (2, 3, K+1, D)
    expected = law.log_prob(small.clone()).unsqueeze(1).expand(2, 5, 3)
    assert torch.allclose(expanded.log_prob(small.unsqueeze(1)), expected, rtol=1e-12)

    paths = expanded.rsample((2,))
    assert paths.shape == (2, 5, 3, K + 1, D)
    assert not torch.equal(paths[:, 0], paths[:, 1])  # expanded members are independent
    reference = hand_log_prob(paths, ou_drift, DIAG_SCALE, "diagonal", law.init, TIMES)
    assert torch.allclose(expanded.log_prob(paths), reference, rtol=1e-10)
    assert torch.allclose(law.log_prob(paths.clone()), reference, rtol=1e-10)


def test_expand_to_incompatible_batch_shape_raises():
    law = EulerMaruyama(ou_drift, DIAG_SCALE, standard_init((3,)), TIMES)
    with pytest.raises(ValueError, match="expand"):
        law.expand((4,))


# --------------------------------------------------------------------- densities and records


def test_known_init_log_prob_takes_row_zero_to_equal_init(hand_log_prob):
    x0 = torch.tensor([0.3, -0.2], dtype=F64)
    law = EulerMaruyama(ou_drift, DIAG_SCALE, x0, TIMES)
    path = law.rsample((4,))
    assert torch.equal(path[..., 0, :], x0.expand(4, D))
    moved = path.clone()
    moved[..., 0, :] = 7.0
    expected = hand_log_prob(path, ou_drift, DIAG_SCALE, "diagonal", x0, TIMES)
    assert torch.allclose(law.log_prob(moved), expected, rtol=1e-10)
    assert torch.allclose(law.log_prob(path), expected, rtol=1e-10)


class CountingDrift(nn.Module):
    """``f(t, x) = -θ x + sin(2t)`` that counts its calls."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=F64))
        self.calls = 0

    def forward(self, t, x):
        self.calls += 1
        return -self.theta * x + torch.sin(2 * t)


def test_log_prob_evaluates_drift_once_for_all_steps():
    drift = CountingDrift(1.0)
    law = EulerMaruyama(drift, DIAG_SCALE, standard_init(), TIMES)
    path = law.rsample((3,))
    drift.calls = 0
    law.log_prob(path.clone())
    assert drift.calls == 1


def test_log_prob_of_own_sample_does_not_evaluate_drift(hand_log_prob):
    drift = CountingDrift(1.0)
    law = EulerMaruyama(drift, DIAG_SCALE, standard_init(), TIMES)
    path = law.rsample((3,))
    drift.calls = 0
    actual = law.log_prob(path)
    assert drift.calls == 0
    expected = hand_log_prob(path, drift, DIAG_SCALE, "diagonal", law.init, TIMES)
    assert torch.allclose(actual, expected, rtol=1e-10)


def test_log_prob_of_path_from_another_law_is_recomputed(hand_log_prob):
    def make(theta):
        return EulerMaruyama(lambda t, x: -theta * x, DIAG_SCALE, standard_init(), TIMES)

    theta_a, theta_b = torch.tensor(0.5, dtype=F64), torch.tensor(2.0, dtype=F64)
    path = make(theta_a).rsample((3,))
    other = make(theta_b)
    expected = hand_log_prob(path, other.drift, DIAG_SCALE, "diagonal", other.init, TIMES)
    assert torch.allclose(other.log_prob(path), expected, rtol=1e-10)


def test_log_prob_after_in_place_change_of_drift_parameter_is_recomputed(hand_log_prob):
    drift = CountingDrift(1.0)
    law = EulerMaruyama(drift, DIAG_SCALE, standard_init(), TIMES)
    path = law.rsample((3,))
    with torch.no_grad():
        drift.theta.add_(1.5)  # e.g. an optimizer step between sampling and scoring
    expected = hand_log_prob(path, drift, DIAG_SCALE, "diagonal", law.init, TIMES)
    assert torch.allclose(law.log_prob(path), expected, rtol=1e-10)


def test_log_prob_after_in_place_change_of_path_is_recomputed(hand_log_prob):
    law = EulerMaruyama(ou_drift, DIAG_SCALE, standard_init(), TIMES)
    path = law.rsample((3,))
    path[..., 2, 0] += 0.5
    expected = hand_log_prob(path, ou_drift, DIAG_SCALE, "diagonal", law.init, TIMES)
    assert torch.allclose(law.log_prob(path), expected, rtol=1e-10)


# ------------------------------------------------------------------- samples of a linear SDE

LIN_TIMES = torch.tensor(
    [0.0, 0.05, 0.15, 0.2, 0.4, 0.45, 0.7, 0.8, 1.0, 1.3, 1.35, 1.6, 2.0], dtype=F64
)
LIN_A = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=F64)
LIN_B = torch.tensor([0.2, -0.1], dtype=F64)
LIN_M0 = torch.tensor([1.0, -0.5], dtype=F64)
LIN_S0 = torch.tensor([0.3, 0.6], dtype=F64)
LIN_G = {
    "wide": torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.0, 0.6]], dtype=F64),
    "velocity_only": torch.tensor([[0.0], [0.7]], dtype=F64),
}
NUM_SAMPLES = 40_000
Z_TOL = 4.5


def euler_maruyama_moments(F, offset, noise_cov, m0, P0, times):
    """``m_{k+1} = F_k m_k + o_k``, ``P_{k+1} = F_k P_k F_kᵀ + Q_k`` with ``F_k``, ``o_k``,
    ``Q_k`` given as functions of ``h_k``; returns means ``(K+1, d)``, covariances
    ``(K+1, d, d)``."""
    means, covs = [m0], [P0]
    for k in range(times.shape[0] - 1):
        h = times[k + 1] - times[k]
        means.append(F(h) @ means[-1] + offset(h))
        covs.append(F(h) @ covs[-1] @ F(h).T + noise_cov(h))
    return torch.stack(means), torch.stack(covs)


def assert_moments_match(paths, means, covs):
    """z-scores of the sample means and covariances at every step against the exact ones.

    With ``N`` samples the standard error of a mean is ``sqrt(P_ii / N)`` and that of a sample
    covariance ``sqrt((P_ii P_jj + P_ij²) / N)`` (Gaussian data). Each ``|z|`` must be below
    ``Z_TOL = 4.5``: with 65 z-scores the chance that a correct sampler fails is below
    ``65 · 6.8e-6 ≈ 4e-4``, while a 5% error in a variance at ``N = 40000`` is ``z ≈ 7``.
    """
    n = paths.shape[0]
    sample_mean = paths.mean(0)
    centred = paths - sample_mean
    sample_cov = torch.einsum("nki,nkj->kij", centred, centred) / (n - 1)
    var = covs.diagonal(dim1=-2, dim2=-1)
    z_mean = (sample_mean - means) / (var / n).sqrt()
    se_cov = ((var.unsqueeze(-1) * var.unsqueeze(-2) + covs**2) / n).sqrt()
    z_cov = (sample_cov - covs) / se_cov
    assert z_mean.abs().max() < Z_TOL, z_mean
    assert z_cov.abs().max() < Z_TOL, z_cov


def prior_moments(G):
    """Exact means and covariances of the linear test SDE's Euler–Maruyama chain."""
    eye = torch.eye(D, dtype=F64)
    return euler_maruyama_moments(
        lambda h: eye + h * LIN_A,
        lambda h: h * LIN_B,
        lambda h: h * G @ G.T,
        LIN_M0,
        torch.diag(LIN_S0**2),
        LIN_TIMES,
    )


@pytest.mark.parametrize("noise", list(LIN_G))
def test_samples_match_exact_euler_maruyama_moments(noise):
    G = LIN_G[noise]
    init = dist.Normal(LIN_M0, LIN_S0).to_event(1)
    law = EulerMaruyama(lambda t, x: x @ LIN_A.T + LIN_B, G, init, LIN_TIMES, noise_type="general")
    paths = law.sample((NUM_SAMPLES,))
    means, covs = prior_moments(G)
    assert_moments_match(paths, means, covs)


def test_girsanov_samples_match_controlled_moment_recursion():
    """With ``u(x) = c + B x`` and a constant ``S``, the controlled chain is linear:
    ``F = I + h(A + G B)``, offset ``h(b + G c)``, noise ``h G S Sᵀ Gᵀ``."""
    G = LIN_G["wide"]
    c = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
    B = torch.tensor([[0.2, -0.4], [0.0, 0.3], [-0.5, 0.1]], dtype=F64)
    S = torch.tensor([[0.8, 0.0, 0.0], [0.3, 0.5, 0.0], [-0.2, 0.1, 1.2]], dtype=F64)

    def control(t, x, context):
        return c + x @ B.T, S

    prior = EulerMaruyama(
        lambda t, x: x @ LIN_A.T + LIN_B,
        G,
        dist.Normal(LIN_M0, LIN_S0).to_event(1),
        LIN_TIMES,
        noise_type="general",
    )
    posterior = prior.girsanov(control, covariance="full")
    paths = posterior.sample((NUM_SAMPLES,))
    eye = torch.eye(D, dtype=F64)
    means, covs = euler_maruyama_moments(
        lambda h: eye + h * (LIN_A + G @ B),
        lambda h: h * (LIN_B + G @ c),
        lambda h: h * G @ S @ S.T @ G.T,
        LIN_M0,
        torch.diag(LIN_S0**2),
        LIN_TIMES,
    )
    assert_moments_match(paths, means, covs)


def test_late_marginal_passes_kolmogorov_smirnov_against_exact_normal():
    G = LIN_G["velocity_only"]
    init = dist.Normal(LIN_M0, LIN_S0).to_event(1)
    law = EulerMaruyama(lambda t, x: x @ LIN_A.T + LIN_B, G, init, LIN_TIMES, noise_type="general")
    paths = law.sample((NUM_SAMPLES,))
    means, covs = prior_moments(G)
    # Position, which carries no noise of its own, at the last step.
    loc, scale = float(means[-1, 0]), math.sqrt(float(covs[-1, 0, 0]))
    result = scipy.stats.kstest(paths[:, -1, 0].numpy(), scipy.stats.norm(loc, scale).cdf)
    assert result.pvalue > 1e-3
    # The test has power: a 5% error in the scale is rejected.
    wrong = scipy.stats.kstest(paths[:, -1, 0].numpy(), scipy.stats.norm(loc, 1.05 * scale).cdf)
    assert wrong.pvalue < 1e-3


# ------------------------------------------------------------------------------- gradients

GRAD_CASES = ["diagonal", "general_velocity_only", "general_wide"]
WIDE_G = torch.tensor([[0.5, 0.2, 0.1], [-0.1, 0.4, 0.3]], dtype=F64)


def gradient_case(case, theta, sigma, loc):
    """A nonlinear law with drift parameter ``theta``, diffusion parameter ``sigma`` and
    initial mean ``loc``."""
    init = dist.Normal(loc, 0.3).to_event(1)
    if case == "diagonal":

        def drift(t, x):
            return -theta * x**3 + torch.sin(2 * t)

        def diffusion(t, x):
            return sigma * (1 + 0.3 * torch.tanh(x))

        noise_type = "diagonal"
    elif case == "general_velocity_only":

        def drift(t, x):
            p, v = x[..., 0], x[..., 1]
            return torch.stack([v, -torch.sin(p) - theta * v], dim=-1)

        def diffusion(t, x):
            s = sigma * (1 + 0.3 * torch.tanh(x[..., 0]))
            return torch.stack([torch.zeros_like(s), s], dim=-1).unsqueeze(-1)

        noise_type = "general"
    else:

        def drift(t, x):
            return x @ LIN_A.T * theta - 0.1 * x**3

        def diffusion(t, x):
            return sigma * (1 + 0.3 * torch.tanh(x)).unsqueeze(-1) * WIDE_G

        noise_type = "general"
    law = EulerMaruyama(drift, diffusion, init, TIMES, noise_type=noise_type)
    return law, noise_type


def functional_and_gradient(fn, params):
    """``fn(*params)`` and its autograd gradient."""
    params = [p.detach().clone().requires_grad_() for p in params]
    value = fn(*params)
    return value.detach(), torch.autograd.grad(value, params)


def finite_differences(fn, params, eps=1e-6):
    """Central differences of ``fn`` in every entry of every parameter."""
    grads = []
    for i, p in enumerate(params):
        grad = torch.zeros_like(p)
        for j in range(p.numel()):
            step = torch.zeros_like(p).reshape(-1)
            step[j] = eps
            step = step.reshape(p.shape)
            up = [q + step if n == i else q for n, q in enumerate(params)]
            down = [q - step if n == i else q for n, q in enumerate(params)]
            grad.reshape(-1)[j] = (fn(*up) - fn(*down)) / (2 * eps)
        grads.append(grad)
    return grads


PARAMS = (
    torch.tensor(0.8, dtype=F64),
    torch.tensor(0.6, dtype=F64),
    torch.tensor([0.4, -0.2], dtype=F64),
)


@pytest.mark.parametrize("case", GRAD_CASES)
def test_rsample_gradients_match_finite_differences(case):
    def path_functional(theta, sigma, loc):
        pyro.set_rng_seed(1)  # common random numbers
        law, _ = gradient_case(case, theta, sigma, loc)
        path = law.rsample((4,))
        return (torch.sin(path) + 0.5 * path**2).sum()

    _, grads = functional_and_gradient(path_functional, PARAMS)
    expected = finite_differences(path_functional, PARAMS)
    for grad, fd in zip(grads, expected, strict=True):
        assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-8)
        assert fd.abs().max() > 1e-3  # every parameter matters


CONTROL_GAIN = torch.tensor([[0.5, -0.3], [0.2, 0.4], [-0.6, 0.1]], dtype=F64)


@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_girsanov_rsample_gradients_match_finite_differences(checkpoint_every):
    """Gradients in the prior's parameters and in the control's (``u = c tanh(M x)``,
    ``S = s I``), also when the simulation is checkpointed in blocks of steps."""

    def control(c, s):
        def law(t, x, context):
            return c * torch.tanh(x @ CONTROL_GAIN.T), s * torch.ones(3, dtype=F64)

        return law

    def path_functional(theta, sigma, loc, c, s):
        pyro.set_rng_seed(1)
        prior, _ = gradient_case("general_wide", theta, sigma, loc)
        posterior = prior.girsanov(
            control(c, s), covariance="diagonal", checkpoint_every=checkpoint_every
        )
        path = posterior.rsample((4,))
        return (torch.sin(path) + 0.5 * path**2).sum()

    params = PARAMS + (torch.tensor(0.7, dtype=F64), torch.tensor(1.3, dtype=F64))
    _, grads = functional_and_gradient(path_functional, params)
    expected = finite_differences(path_functional, params)
    for grad, fd in zip(grads, expected, strict=True):
        assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-8)
        assert fd.abs().max() > 1e-3


@pytest.mark.parametrize("value_kind", ["sampled", "clone"])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_log_prob_of_sample_gradients_match_finite_differences_of_hand_written_density(
    case, value_kind, hand_log_prob
):
    def score(theta, sigma, loc, density):
        pyro.set_rng_seed(2)
        law, noise_type = gradient_case(case, theta, sigma, loc)
        path = law.rsample((3,))
        if density == "hand":
            return hand_log_prob(path, law.drift, law.diffusion, noise_type, law.init, TIMES).sum()
        return law.log_prob(path if value_kind == "sampled" else path.clone()).sum()

    value, grads = functional_and_gradient(lambda *p: score(*p, "law"), PARAMS)
    assert torch.allclose(value, score(*PARAMS, "hand"), rtol=1e-10)
    expected = finite_differences(lambda *p: score(*p, "hand"), PARAMS)
    for grad, fd in zip(grads, expected, strict=True):
        assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("noise_type", ["diagonal", "scalar", "general"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paths_and_densities_follow_the_dtype_of_times(
    dtype, noise_type, default_dtype, hand_log_prob
):
    """Every tensor the law creates follows ``times``: with the *other* dtype as the default,
    a tensor created without an explicit dtype would change the result dtype (float32 inputs)
    or its precision (float64 inputs)."""
    default_dtype(torch.float64 if dtype == torch.float32 else torch.float32)
    times = TIMES.to(dtype)
    scale = {
        "diagonal": DIAG_SCALE,
        "scalar": DIAG_SCALE.unsqueeze(-1),
        "general": WIDE_G,
    }[noise_type].to(dtype)
    m = {"diagonal": D, "scalar": 1, "general": 3}[noise_type]
    init = dist.Normal(torch.zeros(D, dtype=dtype), torch.ones(D, dtype=dtype)).to_event(1)

    def drift(t, x):
        return -x + torch.sin(2 * t)

    def diffusion(t, x):
        factor = 1 + 0.3 * torch.tanh(x)
        return factor * scale if noise_type == "diagonal" else factor.unsqueeze(-1) * scale

    law = EulerMaruyama(drift, diffusion, init, times, noise_type=noise_type)
    path = law.rsample((3,))
    assert path.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    expected = hand_log_prob(path, drift, diffusion, noise_type, init, times)
    for value in (path, path.clone()):
        log_prob = law.log_prob(value)
        assert log_prob.dtype == dtype
        assert torch.allclose(log_prob, expected, rtol=tol)

    net = ControlNet(D, m, hidden_dims=(8,), covariance="full").to(dtype)
    with torch.no_grad():
        net.head.weight.normal_(0.0, 0.5)
    posterior = law.girsanov(net)
    path = posterior.rsample((3,))
    assert path.dtype == dtype
    expected = hand_log_prob(path, drift, diffusion, noise_type, init, times, control=(net, "full"))
    for value in (path, path.clone()):
        log_prob = posterior.log_prob(value)
        assert log_prob.dtype == dtype
        assert torch.allclose(log_prob, expected, rtol=tol)
    assert posterior.skeleton().dtype == dtype


def test_drift_and_diffusion_evaluated_in_blocks_of_steps_match_one_call(monkeypatch):
    """``at_all_steps`` splits the step axis into blocks (here of 3 steps of 4 series, with a
    shorter last block) and must give the values and gradients of one call; a function
    without a step axis in its output is called once."""
    import pyro_nsde.sde.euler_maruyama as em

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def drift(t, x):
        return net(torch.cat([x, t.expand(x.shape[:-1] + (1,))], -1))

    def diffusion(t, x):
        return 0.5 + 0.1 * x.tanh()

    times = torch.linspace(0.0, 1.0, 11)
    law = EulerMaruyama(drift, diffusion, dist.Normal(torch.zeros(2), 1.0).to_event(1), times)
    path = law.expand((4,)).sample().clone()  # a plain tensor: no record of its simulation
    whole = law.log_prob(path)
    (grad_whole,) = torch.autograd.grad(whole.sum(), net[0].weight)
    monkeypatch.setattr(em, "STATES_PER_CALL", 12)
    calls = []
    counting = lambda t, x: (calls.append(x.shape[0]), drift(t, x))[1]  # noqa: E731
    blocked = EulerMaruyama(
        counting, diffusion, dist.Normal(torch.zeros(2), 1.0).to_event(1), times
    ).log_prob(path)
    (grad_blocked,) = torch.autograd.grad(blocked.sum(), net[0].weight)
    assert calls[-4:] == [3, 3, 3, 1]  # (earlier calls: the shape checks of the constructor)
    assert torch.allclose(blocked, whole, atol=1e-5)
    assert torch.allclose(grad_blocked, grad_whole, atol=1e-5)
    constant = em.at_all_steps(
        lambda t, x: torch.ones(2), times[:-1, None, None], path[..., :-1, :].movedim(-2, 0)
    )
    assert constant.shape == (2,)
