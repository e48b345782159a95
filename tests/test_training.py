"""``fit_svi``: the guide warm-up holds the model's parameters, the schedule, the warnings."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_nsde import EulerMaruyama, GirsanovGuide, fit_svi

TIMES = torch.linspace(0.0, 1.0, 11)
Y = torch.tensor([0.3, -0.2, 0.5, 0.1, 0.4])


def model(y):
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=dist.constraints.positive)
    x = pyro.sample("x", EulerMaruyama(lambda t, x: -x, sigma.reshape(1), torch.zeros(1), TIMES))
    pyro.sample("y", dist.Normal(x[..., 2::2, 0], 0.2).to_event(1), obs=y)


def test_warmup_holds_the_model_parameters_then_trains_them():
    guide = GirsanovGuide(model, control="affine", covariance="full")
    fit_svi(model, guide, Y, steps=5, warmup=5, progress=False)
    assert pyro.param("sigma").item() == 1.0  # held for all 5 steps
    losses = fit_svi(model, guide, Y, steps=5, warmup=0, progress=False)
    assert len(losses) == 5
    assert pyro.param("sigma").item() != 1.0


def test_mean_shift_guide_of_a_model_with_parameters_is_warned_about():
    guide = GirsanovGuide(model, control="affine", covariance="prior")
    with pytest.warns(UserWarning, match="covariance='full'"):
        fit_svi(model, guide, Y, steps=2, progress=False)
    pyro.clear_param_store()
    guide = GirsanovGuide(model, control="affine", covariance="full")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit_svi(model, guide, Y, steps=2, progress=False)


@pytest.mark.parametrize(
    "options, message",
    [({"steps": 0}, "steps"), ({"steps": 3, "warmup": 4}, "warmup"), ({"lr": -1.0}, "lr")],
)
def test_bad_settings_are_rejected(options, message):
    guide = GirsanovGuide(model, control="affine", covariance="full")
    with pytest.raises(ValueError, match=message):
        fit_svi(model, guide, Y, progress=False, **options)
