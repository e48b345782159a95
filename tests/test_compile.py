"""``compile_step=True``: the Euler–Maruyama step under :func:`torch.compile`, and its fallback.

The compiled step must give the eager step's paths, densities and gradients (to float
rounding: the compiler may fuse and reorder arithmetic), and where compilation fails the
simulation must run eagerly, with one warning, and give the same results.
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_nsde import ControlNet, EulerMaruyama, GirsanovGuide
from pyro_nsde.sde import compile as _compile


@pytest.fixture(autouse=True)
def fresh_compile_state():
    """Each test starts with no compiled step and no recorded compile failure."""
    _compile._FAILED.clear()
    _compile._compiled.cache_clear()
    torch._dynamo.reset()
    yield
    _compile._FAILED.clear()
    _compile._compiled.cache_clear()
    torch._dynamo.reset()


def _posterior(compile_step, covariance="prior"):
    torch.manual_seed(1)
    drift = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    control = ControlNet(2, hidden_dims=(8,), covariance=covariance)
    torch.nn.init.normal_(control.head.weight, std=0.3)
    prior = EulerMaruyama(
        lambda t, x: drift(x), torch.tensor([0.5, 0.3]), torch.zeros(2), torch.linspace(0, 1, 9)
    )
    params = list(drift.parameters()) + list(control.parameters())
    return prior.girsanov(control, compile_step=compile_step), params


def _path_and_gradients(compile_step, covariance="prior"):
    posterior, params = _posterior(compile_step, covariance)
    torch.manual_seed(2)
    path = posterior.rsample((16,))
    loss = posterior.log_prob(path).sum() + path.pow(2).sum()
    return path.detach(), loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("covariance", ["prior", "diagonal"])
def test_compiled_step_gives_the_eager_paths_densities_and_gradients(covariance):
    path, loss, grads = _path_and_gradients(False, covariance)
    with warnings.catch_warnings():
        # No fallback: it really compiled. Only the fallback's warning is an error: torch's own
        # RuntimeWarnings (on Python 3.13.0: "Guards may run slower") would break compilation.
        warnings.filterwarnings("error", "torch.compile of the", RuntimeWarning)
        compiled_path, compiled_loss, compiled_grads = _path_and_gradients(True, covariance)
    assert not _compile._FAILED
    torch.testing.assert_close(compiled_path, path, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-4)
    for compiled, eager in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_failed_compilation_falls_back_to_the_eager_step_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler for the inductor backend")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    path, loss, grads = _path_and_gradients(False)
    with pytest.warns(RuntimeWarning, match="running it eagerly") as record:
        fallback_path, fallback_loss, fallback_grads = _path_and_gradients(True)
        _path_and_gradients(True)  # a second simulation: no second warning
    assert len(record) == 1
    assert _compile._FAILED
    torch.testing.assert_close(fallback_path, path, rtol=0, atol=0)
    torch.testing.assert_close(fallback_loss, loss, rtol=0, atol=0)
    for fallback, eager in zip(fallback_grads, grads, strict=True):
        torch.testing.assert_close(fallback, eager, rtol=0, atol=0)


def test_an_error_in_the_drift_is_raised_as_without_compilation():
    def drift(t, x):
        raise ValueError("bad drift")

    prior = EulerMaruyama(
        lambda t, x: -x, torch.tensor([0.5]), torch.zeros(1), torch.linspace(0, 1, 3)
    )
    prior.drift = drift  # after the shape probe at construction
    posterior = prior.girsanov(ControlNet(1, hidden_dims=(4,)), compile_step=True)
    with pytest.raises(ValueError, match="bad drift"):
        posterior.rsample()


def test_svi_with_a_compiled_guide_trains():
    times = torch.linspace(0, 1, 11)
    drift_net = torch.nn.Linear(1, 1)

    def model(y):
        pyro.module("drift", drift_net)
        x = pyro.sample(
            "x",
            EulerMaruyama(lambda t, x: drift_net(x), torch.tensor([0.5]), torch.zeros(1), times),
        )
        pyro.sample("y", dist.Normal(x[..., -1, 0], 0.1), obs=y)

    guide = GirsanovGuide(model, control="mlp", hidden_dims=(8,), compile_step=True)
    svi = SVI(
        model,
        guide,
        pyro.optim.Adam({"lr": 0.05}),
        Trace_ELBO(num_particles=8, vectorize_particles=True),
    )
    y = torch.tensor(1.0)
    losses = [svi.step(y) for _ in range(60)]
    assert not _compile._FAILED
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 5
