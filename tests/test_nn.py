import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.zoo.nn import DiffusionNet, DriftNet, PosteriorDriftControl, TimeFeatures


@pytest.fixture(autouse=True)
def _seed():
    pyro.clear_param_store()
    torch.manual_seed(0)


def _randomize(module, scale=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)
    return module


NETS = [
    lambda: DriftNet(3),
    lambda: DriftNet(3, (16,), time_frequencies=(1.0, 3.0), linear_time=True),
    lambda: DiffusionNet(3),
    lambda: DiffusionNet(3, hidden_dims=(8, 8), time_frequencies=(2.0,)),
    lambda: DiffusionNet(3, coupled=True),
    lambda: DiffusionNet(3, "general", time_frequencies=(1.0,)),
    lambda: DiffusionNet(3, hidden_dims=()),
]


@pytest.mark.parametrize("make", NETS)
def test_vectorized_call_matches_one_call_per_step(make):
    net = _randomize(make())
    K, N = 4, 5
    t = torch.rand(K)
    x = torch.randn(K, N, 3)
    stacked = net(t.reshape(K, 1, 1), x)
    for k in range(K):
        one = net(t[k].reshape(1), x[k])
        assert one.shape[:2] == (N, 3)
        torch.testing.assert_close(stacked[k], one, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(net(t[k], x[k]), one, rtol=1e-4, atol=1e-4)  # 0-dim t


def test_time_features_are_the_written_formula():
    features = TimeFeatures((1.0, 2.5), linear=True)
    t = torch.tensor([[0.3], [1.7]])
    expected = torch.cat(
        [t, (t * 1.0).sin(), (t * 2.5).sin(), (t * 1.0).cos(), (t * 2.5).cos()], -1
    )
    torch.testing.assert_close(features(t), expected)
    assert features.num_features == 5


def test_drift_starts_at_zero_and_is_autonomous_without_time_features():
    x = torch.randn(7, 2)
    assert DriftNet(2)(torch.ones(1), x).abs().max() == 0
    net = _randomize(DriftNet(2, time_frequencies=()))
    torch.testing.assert_close(net(torch.zeros(1), x), net(torch.full((1,), 5.0), x))
    timed = _randomize(DriftNet(2))
    assert not torch.allclose(timed(torch.zeros(1), x), timed(torch.full((1,), 5.0), x))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"coupled": True}, {"noise_type": "general"}, {"hidden_dims": ()}],
    ids=["diagonal", "coupled", "general", "constant"],
)
def test_diffusion_starts_at_init_scale(kwargs):
    net = DiffusionNet(2, init_scale=0.3, floor=0.05, **kwargs)
    g = net(torch.zeros(1), torch.randn(6, 2))
    expected = 0.3 * (torch.eye(2) if kwargs.get("noise_type") == "general" else torch.ones(2))
    torch.testing.assert_close(g, expected.expand(g.shape))


@pytest.mark.parametrize("noise_type", ["diagonal", "general"])
def test_diffusion_never_goes_below_the_floor(noise_type):
    floor = 0.05
    net = DiffusionNet(2, noise_type, floor=floor, hidden_dims=(16,))
    x = torch.randn(200, 2) * 5
    for bias in (-1e3, 0.0):
        _randomize(net, scale=3.0)
        with torch.no_grad():
            if noise_type == "diagonal":
                net.net.bias_out.fill_(bias)
            else:
                net.head.bias.fill_(bias)
        g = net(torch.zeros(1), x)
        if noise_type == "diagonal":
            assert (g >= floor).all()
            if bias < 0:
                torch.testing.assert_close(g, torch.full_like(g, floor))
        else:
            singular = torch.linalg.svdvals(g)
            assert (singular >= floor * (1 - 1e-5)).all()
            assert torch.equal(g, g.tril())


def test_uncoupled_diffusion_is_diagonal_noise():
    """``g_i`` depends on ``x_i`` only (what torchsde's Milstein and SRK schemes assume)."""
    net = _randomize(DiffusionNet(3, hidden_dims=(8, 8)))
    jac = torch.autograd.functional.jacobian(lambda x: net(torch.zeros(1), x), torch.randn(3))
    off_diagonal = jac - torch.diag_embed(jac.diagonal())
    assert off_diagonal.abs().max() == 0
    assert jac.diagonal().abs().min() > 0
    coupled = _randomize(DiffusionNet(3, coupled=True))
    jac = torch.autograd.functional.jacobian(lambda x: coupled(torch.zeros(1), x), torch.randn(3))
    assert (jac - torch.diag_embed(jac.diagonal())).abs().max() > 0


@pytest.mark.parametrize("noise_type", ["diagonal", "general"])
def test_path_log_prob_with_neural_nets_matches_a_hand_written_density(noise_type):
    d, N = 2, 3
    drift = _randomize(DriftNet(d, (8,)))
    diffusion = _randomize(DiffusionNet(d, noise_type, (8,)), scale=0.3)
    times = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5])
    init = dist.Normal(torch.zeros(d), 1.0).to_event(1)
    law = EulerMaruyama(drift, diffusion, init, times, noise_type=noise_type).expand([N])
    path = torch.randn(N, len(times), d)
    expected = init.log_prob(path[:, 0])
    for k in range(len(times) - 1):
        t, h = times[k].reshape(1), times[k + 1] - times[k]
        x = path[:, k]
        mean = x + h * drift(t, x)
        g = diffusion(t, x)
        if noise_type == "diagonal":
            step = dist.Normal(mean, h.sqrt() * g).to_event(1)
        else:
            step = dist.MultivariateNormal(mean, scale_tril=h.sqrt() * g)
        expected = expected + step.log_prob(path[:, k + 1])
    torch.testing.assert_close(law.log_prob(path), expected)


def _ou_problem():
    times = torch.linspace(0, 1, 11)
    y = torch.randn(4, 11, 1) * 0.5
    drift, diffusion = DriftNet(1, (8,)), DiffusionNet(1, hidden_dims=())

    def model():
        pyro.module("drift", drift)
        pyro.module("diffusion", diffusion)
        with pyro.plate("series", 4):
            init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
            x = pyro.sample("x", EulerMaruyama(drift, diffusion, init, times))
            pyro.sample("y", dist.Normal(x, 0.2).to_event(2), obs=y)

    return model, drift, diffusion


def test_nets_registered_with_pyro_module_are_trained_by_svi():
    model, drift, diffusion = _ou_problem()
    guide = GirsanovGuide(model, control="affine")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    before = [p.detach().clone() for p in (*drift.parameters(), *diffusion.parameters())]
    for _ in range(3):  # the zero-initialized last layers pass gradients on from step 2
        svi.step()
    names = set(pyro.get_param_store().keys())
    assert {f"drift$$${n}" for n, _ in drift.named_parameters()} <= names
    assert {f"diffusion$$${n}" for n, _ in diffusion.named_parameters()} <= names
    after = list((*drift.parameters(), *diffusion.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_pyro_module_subclass_registers_its_parameters_on_each_call():
    net = PyroModule[DriftNet](2, (4,))
    net(torch.zeros(1), torch.zeros(3, 2))  # name the submodules
    trace = poutine.trace(lambda: net(torch.zeros(1), torch.zeros(3, 2))).get_trace()
    params = [site["value"] for site in trace.nodes.values() if site["type"] == "param"]
    assert len(params) == len(list(net.parameters()))
    assert all(any(p is q for q in params) for p in net.parameters())


@pytest.mark.parametrize("covariance", ["prior", "diagonal"])
def test_posterior_drift_control_makes_the_posterior_drift_its_network(covariance):
    d = 2
    drift = _randomize(DriftNet(d, (8,)))
    diffusion = _randomize(DiffusionNet(d, hidden_dims=(8,)), scale=0.3)
    control = PosteriorDriftControl(drift, diffusion, d, hidden_dims=(8,), covariance=covariance)
    _randomize(control.net, scale=0.3)
    times = torch.linspace(0, 1, 6)
    x0 = torch.randn(3, d)
    prior = EulerMaruyama(drift, diffusion, x0, times)
    posterior = prior.girsanov(control)
    skeleton = posterior.skeleton()
    x, kl = x0, torch.zeros(3)
    for k in range(5):
        t, h = times[k].reshape(1), times[k + 1] - times[k]
        out = control.net(t, x)
        v = out if covariance == "prior" else out[0]
        kl = kl + 0.5 * h * ((v - drift(t, x)) / diffusion(t, x)).pow(2).sum(-1)
        x = x + h * v
        torch.testing.assert_close(skeleton[:, k + 1], x)
    if covariance == "prior":  # on the noise-free path, log q - log p = Σ ½ h |u|²
        noise_free = posterior.log_prob(skeleton) - prior.log_prob(skeleton)
        torch.testing.assert_close(noise_free, kl)
    assert not any(p is q for p in control.parameters() for q in drift.parameters())


def test_posterior_drift_control_feeds_time_features_and_context_to_its_network():
    drift = _randomize(DriftNet(2, (8,)))
    diffusion = _randomize(DiffusionNet(2, hidden_dims=(8,)), scale=0.3)
    control = PosteriorDriftControl(
        drift, diffusion, 2, context_dim=3, hidden_dims=(8,), time_frequencies=(1.0, 3.0)
    )
    _randomize(control.net, scale=0.3)
    t, x, context = torch.tensor([0.7]), torch.randn(5, 2), torch.randn(5, 3)
    angle = torch.tensor([0.7, 2.1])
    features = torch.cat([angle.sin(), angle.cos()]).expand(5, 4)
    v = control.net(t, x, torch.cat([features, context], -1))
    expected = (v - drift(t, x)) / diffusion(t, x)
    torch.testing.assert_close(control(t, x, context), expected)


class _Counted(torch.nn.Module):
    """Wraps a module and counts its calls."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, t, x):
        self.calls += 1
        return self.module(t, x)


def test_posterior_drift_control_reuses_the_simulators_drift_and_diffusion():
    d, num_steps = 2, 6
    drift = _Counted(_randomize(DriftNet(d, (8,))))
    diffusion = _Counted(_randomize(DiffusionNet(d, hidden_dims=(8,)), scale=0.3))
    control = PosteriorDriftControl(drift, diffusion, d, hidden_dims=(8,))
    _randomize(control.net, scale=0.3)
    prior = EulerMaruyama(drift, diffusion, torch.randn(3, d), torch.linspace(0, 1, num_steps + 1))
    posterior = prior.girsanov(control)
    drift.calls = diffusion.calls = 0
    path = posterior.rsample()
    assert (drift.calls, diffusion.calls) == (num_steps, num_steps)  # once per step, not twice
    drift.calls = diffusion.calls = 0
    fresh = path.detach().clone()  # no simulation record: the density is evaluated
    log_q = posterior.log_prob(fresh)
    assert (drift.calls, diffusion.calls) == (1, 1)  # one vectorized call each
    # The shared values give the density of the control evaluated on its own.
    x = fresh[:, :-1].movedim(-2, 0)
    t = torch.linspace(0, 1, num_steps + 1)[:-1].reshape(-1, 1, 1)
    u = control(t, x)
    torch.testing.assert_close(u, (control.net(t, x) - drift(t, x)) / diffusion(t, x))
    log_p = prior.log_prob(fresh)
    h = 1 / num_steps
    z = (fresh[:, 1:] - fresh[:, :-1]).movedim(-2, 0) - h * drift(t, x)
    dw = z / diffusion(t, x)
    expected = (-(dw - h * u).pow(2) / (2 * h) + dw.pow(2) / (2 * h)).sum((0, -1))
    torch.testing.assert_close(log_q - log_p, expected)


def test_invalid_arguments_name_the_problem():
    with pytest.raises(ValueError, match="noise_type"):
        DiffusionNet(2, "scalar")
    with pytest.raises(ValueError, match="floor"):
        DiffusionNet(2, floor=0.0)
    with pytest.raises(ValueError, match="init_scale"):
        DiffusionNet(2, floor=0.5, init_scale=0.4)
    with pytest.raises(ValueError, match="hidden_dims"):
        DriftNet(2, ())
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        DriftNet(2)(torch.zeros(1), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="time features"):
        DiffusionNet(2, hidden_dims=(), time_frequencies=(1.0,))
