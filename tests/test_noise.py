"""Path densities for every noise type, against densities written out by hand (conftest.py).

Each case is a 2-D SDE with a nonlinear, time-dependent drift on a non-uniform grid. The
diffusion is a constant tensor or a callable of ``(t, x)``; values are the path as sampled
(``log_prob`` reads the simulator's record), a clone of it (recomputed from scratch) and a
perturbed clone (for rank-deficient ``G`` the perturbation leaves ``x_k + h f + range(G)`` and
the documented least-squares projection applies).
"""

import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from pyro_nsde import AffineControl, ControlNet, EulerMaruyama, GirsanovEulerMaruyama

DTYPE = torch.float64
TIMES = torch.tensor([0.0, 0.1, 0.15, 0.3, 0.5, 0.55, 0.8], dtype=DTYPE)
A = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=DTYPE)
C = torch.tensor([0.2, -0.1], dtype=DTYPE)


def smooth_drift(t, x):
    return x @ A.T - 0.1 * x**3 + torch.sin(3 * t) * C


def pendulum_drift(t, x):
    p, v = x[..., 0], x[..., 1]
    return torch.stack([v, -torch.sin(p) - 0.3 * v], dim=-1)


def _matrix_case(g0):
    def diffusion(t, x):
        rows = (1 + 0.3 * torch.tanh(x)) * (1 + 0.5 * t)
        return rows.unsqueeze(-1) * g0

    return diffusion


def _diagonal_case(t, x):
    return torch.tensor([0.5, 0.8], dtype=DTYPE) * (1 + 0.3 * torch.tanh(x)) * (1 + 0.5 * t)


def _scalar_case(t, x):
    return (torch.tensor([0.6, 0.3], dtype=DTYPE) * (1 + 0.3 * torch.tanh(x)) * (1 + t)).unsqueeze(
        -1
    )


def _velocity_noise(t, x):
    sigma = 0.5 * (1 + 0.3 * torch.tanh(x[..., 0])) * (1 + 0.5 * t[..., 0])
    return torch.stack([torch.zeros_like(sigma), sigma], dim=-1).unsqueeze(-1)


ADDITIVE_G = torch.tensor([[0.4, 0.1], [0.0, 0.3]], dtype=DTYPE)
WIDE_G = torch.tensor([[0.5, 0.2, 0.1], [-0.1, 0.4, 0.3]], dtype=DTYPE)
SQUARE_G = torch.tensor([[0.5, 0.2], [-0.3, 0.6]], dtype=DTYPE)

# name: (noise_type, m, drift, constant diffusion, callable diffusion)
CASES = {
    "diagonal": (
        "diagonal",
        2,
        smooth_drift,
        torch.tensor([0.5, 0.8], dtype=DTYPE),
        _diagonal_case,
    ),
    "scalar": (
        "scalar",
        1,
        smooth_drift,
        torch.tensor([[0.6], [0.3]], dtype=DTYPE),
        _scalar_case,
    ),
    "general_velocity_only": (
        "general",
        1,
        pendulum_drift,
        torch.tensor([[0.0], [0.5]], dtype=DTYPE),
        _velocity_noise,
    ),
    "general_wide": ("general", 3, smooth_drift, WIDE_G, _matrix_case(WIDE_G)),
    "general_square": ("general", 2, smooth_drift, SQUARE_G, _matrix_case(SQUARE_G)),
    "additive": (
        "additive",
        2,
        smooth_drift,
        ADDITIVE_G,
        lambda t, x: (1 + 0.5 * t).unsqueeze(-1) * ADDITIVE_G,
    ),
}
RANK_DEFICIENT = ["scalar", "general_velocity_only"]


def make_case(name, diffusion_kind):
    noise_type, m, drift, constant, varying = CASES[name]
    diffusion = constant if diffusion_kind == "constant" else varying
    return noise_type, m, drift, diffusion


def init_law():
    loc = torch.tensor([0.2, -0.3], dtype=DTYPE)
    return dist.Normal(loc, torch.tensor([0.5, 0.7], dtype=DTYPE)).to_event(1)


def value_of_kind(path, kind):
    if kind == "sampled":
        return path
    if kind == "clone":
        return path.clone()
    return path.clone() + 0.05 * torch.randn_like(path)


@pytest.mark.parametrize("value_kind", ["sampled", "clone", "perturbed"])
@pytest.mark.parametrize("init_kind", ["distribution", "tensor"])
@pytest.mark.parametrize("diffusion_kind", ["constant", "callable"])
@pytest.mark.parametrize("case", list(CASES))
def test_log_prob_matches_hand_written_density(
    case, diffusion_kind, init_kind, value_kind, hand_log_prob
):
    noise_type, _, drift, diffusion = make_case(case, diffusion_kind)
    init = init_law() if init_kind == "distribution" else torch.tensor([0.2, -0.3], dtype=DTYPE)
    law = EulerMaruyama(drift, diffusion, init, TIMES, noise_type=noise_type)
    value = value_of_kind(law.rsample((3,)), value_kind)

    actual = law.log_prob(value)
    expected = hand_log_prob(value, drift, diffusion, noise_type, init, TIMES)
    assert actual.shape == (3,)
    assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", RANK_DEFICIENT)
def test_rank_deficient_log_prob_ignores_residual_outside_range_of_diffusion(case):
    noise_type, _, drift, diffusion = make_case(case, "callable")
    x0 = torch.tensor([0.2, -0.3], dtype=DTYPE)
    law = EulerMaruyama(drift, diffusion, x0, TIMES[:2], noise_type=noise_type)
    on_support = law.rsample((4,))
    g = diffusion(TIMES[:1], x0)[..., 0]  # (2,): range(G) = span(g)
    normal = torch.stack([-g[1], g[0]])
    off_support = on_support.clone()
    off_support[..., 1, :] += 0.3 * normal
    assert torch.allclose(law.log_prob(off_support), law.log_prob(on_support.clone()), rtol=1e-12)


def randomized_control_net(m, covariance):
    """A ControlNet whose zero-initialised head is replaced by random weights."""
    net = ControlNet(2, m, hidden_dims=(16,), covariance=covariance).to(DTYPE)
    with torch.no_grad():
        net.head.weight.normal_(0.0, 0.5)
        net.head.bias.normal_(0.0, 0.5)
    return net


@pytest.mark.parametrize("value_kind", ["sampled", "clone", "perturbed"])
@pytest.mark.parametrize("covariance", ["prior", "diagonal", "full"])
@pytest.mark.parametrize("diffusion_kind", ["constant", "callable"])
@pytest.mark.parametrize("case", list(CASES))
def test_girsanov_log_prob_matches_hand_written_density(
    case, diffusion_kind, covariance, value_kind, hand_log_prob
):
    noise_type, m, drift, diffusion = make_case(case, diffusion_kind)
    prior = EulerMaruyama(drift, diffusion, init_law(), TIMES, noise_type=noise_type)
    net = randomized_control_net(m, covariance)
    guide_init = dist.Normal(
        torch.tensor([0.4, 0.1], dtype=DTYPE), torch.tensor([0.2, 0.3], dtype=DTYPE)
    ).to_event(1)
    posterior = prior.girsanov(net, init=guide_init)
    assert isinstance(posterior, GirsanovEulerMaruyama)
    value = value_of_kind(posterior.rsample((3,)), value_kind)

    actual = posterior.log_prob(value)
    expected = hand_log_prob(
        value, drift, diffusion, noise_type, guide_init, TIMES, control=(net, covariance)
    )
    assert actual.shape == (3,)
    assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("estimator", ["girsanov", "plain", "stl"])
@pytest.mark.parametrize("case", ["general_square", "general_velocity_only"])
def test_girsanov_log_prob_value_does_not_depend_on_estimator(case, estimator, hand_log_prob):
    noise_type, m, drift, diffusion = make_case(case, "callable")
    prior = EulerMaruyama(drift, diffusion, init_law(), TIMES, noise_type=noise_type)
    net = randomized_control_net(m, "full")
    posterior = GirsanovEulerMaruyama(prior, net, estimator=estimator)
    value = posterior.rsample((5,))

    actual = posterior.log_prob(value)
    expected = hand_log_prob(
        value, drift, diffusion, noise_type, prior.init, TIMES, control=(net, "full")
    )
    assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-10)


def randomized_affine_control(m, covariance):
    num_steps = TIMES.shape[0] - 1
    control = AffineControl(num_steps, 2, m, covariance=covariance)
    control.loc = PyroParam(0.5 * torch.randn(num_steps, m, dtype=DTYPE), event_dim=2)
    control.gain = PyroParam(0.5 * torch.randn(num_steps, m, 2, dtype=DTYPE), event_dim=3)
    if covariance == "diagonal":
        scale = 0.5 + torch.rand(num_steps, m, dtype=DTYPE)
        control.scale = PyroParam(scale, constraints.positive, event_dim=2)
    elif covariance == "full":
        raw = 0.3 * torch.randn(num_steps, m, m, dtype=DTYPE)
        scale = raw.tril(-1) + torch.diag_embed(0.5 + torch.rand(num_steps, m, dtype=DTYPE))
        control.scale = PyroParam(scale, constraints.lower_cholesky, event_dim=3)
    return control


def affine_control_law(control, covariance):
    """``u_k(x) = (a_k + B_k x) / sqrt(h_k)`` written out, as a callable of ``(t, x)``."""
    loc, gain = control.loc.detach(), control.gain.detach()
    scale = None if covariance == "prior" else control.scale.detach()

    def law(t, x, context):
        k = int(torch.searchsorted(TIMES, t.reshape(-1)[0]))
        h = TIMES[k + 1] - TIMES[k]
        u = (loc[k] + x @ gain[k].T) / h.sqrt()
        return u if scale is None else (u, scale[k])

    return law


@pytest.mark.parametrize("value_kind", ["sampled", "clone"])
@pytest.mark.parametrize("covariance", ["prior", "diagonal", "full"])
@pytest.mark.parametrize("case", ["diagonal", "general_velocity_only", "general_wide"])
def test_girsanov_log_prob_with_affine_control_matches_hand_written_density(
    case, covariance, value_kind, hand_log_prob
):
    noise_type, m, drift, diffusion = make_case(case, "callable")
    prior = EulerMaruyama(drift, diffusion, init_law(), TIMES, noise_type=noise_type)
    control = randomized_affine_control(m, covariance)
    posterior = prior.girsanov(control)
    value = value_of_kind(posterior.rsample((3,)), value_kind)

    actual = posterior.log_prob(value)
    law = affine_control_law(control, covariance)
    expected = hand_log_prob(
        value, drift, diffusion, noise_type, prior.init, TIMES, control=(law, covariance)
    )
    assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("covariance", ["prior", "diagonal", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_recorded_densities_have_the_gradients_of_the_hand_written_densities(
    case, covariance, hand_log_prob
):
    """On a path sampled by the posterior, ``log q`` and ``log p`` read the simulator's record;
    as functions of the control's parameters (noise fixed) they must have the gradients of the
    densities written out by hand and evaluated on the same differentiable path."""
    noise_type, m, drift, diffusion = make_case(case, "callable")
    prior = EulerMaruyama(drift, diffusion, init_law(), TIMES, noise_type=noise_type)
    net = randomized_control_net(m, covariance)
    posterior = GirsanovEulerMaruyama(prior, net, estimator="plain")
    path = posterior.rsample((3,))
    params = list(net.parameters())
    hand_q = hand_log_prob(
        path, drift, diffusion, noise_type, prior.init, TIMES, control=(net, covariance)
    )
    hand_p = hand_log_prob(path, drift, diffusion, noise_type, prior.init, TIMES)
    for recorded, hand in ((posterior.log_prob(path), hand_q), (prior.log_prob(path), hand_p)):
        actual = torch.autograd.grad(recorded.sum(), params, retain_graph=True)
        expected = torch.autograd.grad(hand.sum(), params, retain_graph=True)
        for a, e in zip(actual, expected, strict=True):
            assert torch.allclose(a, e, rtol=1e-8, atol=1e-10)
