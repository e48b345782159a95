"""Bad input gets an error that names the argument; numerical failure is loud.

One test per bad input: each asserts the exception type and that the message names the argument
and what was expected or received. Then: ``validate_args=False`` skips the value checks, a path
that blows up names its step and time, and a non-finite SVI loss names the site responsible.
"""

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_nsde import ControlNet, EulerMaruyama, GirsanovGuide
from pyro_nsde.numerics import CheckedSVI, find_nonfinite_site

TIMES = torch.linspace(0.0, 1.0, 6)


def decay(t, x):
    return -x


def normal_init(d):
    return dist.Normal(torch.zeros(d), 1.0).to_event(1)


def path_law(d=1, *, drift=decay, diffusion=None, init=None, times=TIMES, **kwargs):
    diffusion = torch.full((d,), 0.5) if diffusion is None else diffusion
    init = normal_init(d) if init is None else init
    return EulerMaruyama(drift, diffusion, init, times, **kwargs)


def raises(exc, *fragments):
    """``pytest.raises`` whose message must contain every fragment (literally, any order)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# --------------------------------------------------------------------------------- times


def test_times_that_is_not_a_tensor_is_a_type_error():
    with raises(TypeError, "times", "torch.Tensor", "list"):
        path_law(times=[0.0, 0.5, 1.0])


@pytest.mark.parametrize(
    "times, shape",
    [(torch.tensor(1.0), "()"), (torch.tensor([0.0]), "(1,)")],
    ids=["scalar", "single_point"],
)
def test_times_with_fewer_than_two_points_is_rejected(times, shape):
    with raises(ValueError, "times", "K+1 >= 2", shape):
        path_law(times=times)


@pytest.mark.parametrize(
    "times",
    [torch.tensor([0.0, 0.5, 0.3, 1.0]), torch.tensor([0.0, 0.5, 0.5, 1.0])],
    ids=["decreasing", "duplicate"],
)
def test_times_not_strictly_increasing_names_the_offending_index(times):
    with pytest.raises(ValueError, match=r"times must be strictly increasing.*times\[.*2\]"):
        path_law(times=times)


def test_batched_times_name_the_offending_row():
    times = torch.stack([torch.linspace(0, 1, 5), torch.tensor([0.0, 0.2, 0.1, 0.6, 1.0])])
    with raises(ValueError, "strictly increasing", "times[1, 2]"):
        path_law(times=times)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_times_are_rejected(bad):
    with raises(ValueError, "times must be finite"):
        path_law(times=torch.tensor([0.0, 0.5, bad]))


def test_integer_times_are_a_type_error():
    with raises(TypeError, "times", "floating point", "torch.int64"):
        path_law(times=torch.arange(5))


# --------------------------------------------------------------------------- noise type


def test_unknown_noise_type_lists_the_allowed_values():
    with raises(ValueError, "noise_type", "'diagonal'", "'scalar'", "'general'", "'additive'"):
        path_law(noise_type="diag")


# ---------------------------------------------------------------------------- diffusion


@pytest.mark.parametrize(
    "noise_type, shape, expected",
    [
        ("diagonal", (3,), "(..., 2)"),
        ("scalar", (2,), "(..., 2, 1)"),
        ("general", (3, 2), "(..., 2, m)"),
        ("additive", (2,), "(..., 2, m)"),
    ],
)
def test_diffusion_with_the_wrong_shape_for_its_noise_type(noise_type, shape, expected):
    with raises(ValueError, "diffusion", expected, repr(noise_type), str(shape)):
        path_law(2, diffusion=torch.full(shape, 0.5), noise_type=noise_type)


@pytest.mark.parametrize("entry", [0.0, -0.1])
def test_non_positive_diagonal_diffusion_is_rejected(entry):
    with raises(ValueError, "diffusion", "> 0", f"got {entry:g}"):
        path_law(2, diffusion=torch.tensor([0.5, entry]))


@pytest.mark.parametrize(
    "diffusion, noise_type",
    [(torch.tensor([0.5, math.inf]), "diagonal"), (torch.tensor([[0.5], [math.nan]]), "general")],
)
def test_non_finite_diffusion_is_rejected(diffusion, noise_type):
    with raises(ValueError, "diffusion must be finite"):
        path_law(2, diffusion=diffusion, noise_type=noise_type)


def test_diffusion_that_is_neither_tensor_nor_callable_is_a_type_error():
    with raises(TypeError, "diffusion", "tensor or a callable", "float"):
        path_law(diffusion=0.5)


# --------------------------------------------------------------------------------- init


def test_init_without_a_vector_event_is_rejected():
    with raises(ValueError, "init", "event_shape (d,)", "()"):
        path_law(init=dist.Normal(torch.zeros(2), 1.0))


def test_scalar_init_tensor_is_rejected():
    with raises(ValueError, "init", "(..., d)", "scalar"):
        path_law(init=torch.tensor(0.0))


def test_init_that_is_neither_distribution_nor_tensor_is_a_type_error():
    with raises(TypeError, "init", "Distribution or a tensor", "list"):
        path_law(init=[0.0])


def rotate_3d(t, x):
    return x @ torch.eye(3).flip(0)


def shift_3d(t, x):
    return torch.ones(3) - x[..., :1]


@pytest.mark.parametrize("drift", [rotate_3d, shift_3d])
def test_init_dimension_mismatching_the_drift_names_init_and_drift(drift):
    # A three-dimensional drift given a two-dimensional init: the drift fails on x of shape
    # (2,) (rotate_3d) or returns (3,) (shift_3d); either way the message names both.
    with raises(ValueError, f"drift {drift.__name__}", "init", "(2,)"):
        path_law(2, drift=drift)


# ------------------------------------------------------------- drift / diffusion outputs


def first_coordinate(t, x):
    return -x[..., :1]


def test_drift_output_with_the_wrong_last_dim_names_the_drift():
    with raises(ValueError, "drift first_coordinate", "(..., 2)", "(1,)"):
        path_law(2, drift=first_coordinate)


def constant_drift(t, x):
    return 0.0


def test_drift_returning_a_non_tensor_is_a_type_error_naming_it():
    with raises(TypeError, "drift constant_drift", "float"):
        path_law(drift=constant_drift)


def double_drift(t, x):
    return -x.double()


def test_drift_returning_the_wrong_dtype_names_it():
    with raises(TypeError, "drift double_drift", "torch.float64", "torch.float32"):
        path_law(drift=double_drift)


def wide_diffusion(t, x):
    return torch.full(x.shape[:-1] + (3,), 0.5)


def test_diffusion_output_with_the_wrong_last_dim_names_the_diffusion():
    with raises(ValueError, "diffusion wide_diffusion", "(..., 2)", "(3,)"):
        path_law(2, diffusion=wide_diffusion)


def float_diffusion(t, x):
    return 0.5


def test_diffusion_returning_a_non_tensor_is_a_type_error_naming_it():
    with raises(TypeError, "diffusion float_diffusion", "float"):
        path_law(diffusion=float_diffusion)


def double_diffusion(t, x):
    return torch.full(x.shape, 0.5, dtype=torch.float64)


@pytest.mark.parametrize(
    "diffusion, name",
    [(double_diffusion, "diffusion double_diffusion"), (torch.tensor([0.5]).double(), "diffusion")],
    ids=["callable", "tensor"],
)
def test_diffusion_with_the_wrong_dtype_is_a_type_error(diffusion, name):
    with raises(TypeError, name, "torch.float64", "torch.float32"):
        path_law(diffusion=diffusion)


# ------------------------------------------------------------------------ log_prob value


@pytest.mark.parametrize("shape", [(5, 1), (6, 2), (6,)], ids=["steps", "state", "flat"])
def test_log_prob_of_a_value_with_the_wrong_event_shape_is_rejected(shape):
    law = path_law()
    with raises(ValueError, "value", "event_shape", "[6, 1]"):
        law.log_prob(torch.zeros(shape))
    posterior = law.girsanov(ControlNet(1, hidden_dims=(4,)))
    with raises(ValueError, "value", "event_shape", "[6, 1]"):
        posterior.log_prob(torch.zeros(shape))


# --------------------------------------------------------------------- validate_args=False


def test_validate_args_false_accepts_non_increasing_times():
    law = path_law(times=torch.tensor([0.0, 0.5, 0.3, 1.0]), validate_args=False)
    assert law.num_steps == 3


def test_disabling_pyro_validation_accepts_bad_values():
    with pyro.validation_enabled(False):
        law = path_law(times=torch.tensor([0.0, 0.5, 0.5, 1.0]), diffusion=torch.tensor([math.inf]))
    assert law.num_steps == 3


# -------------------------------------------------------------------------- the guide

N_SERIES = 4
OBS = torch.tensor([2, 5])


def series_model(y):
    with pyro.plate("series", N_SERIES, dim=-1):
        x = pyro.sample("x", path_law())
        pyro.sample("y", dist.Normal(x[..., OBS, 0], 0.1).to_event(1), obs=y)


def guide_data():
    return torch.zeros(N_SERIES, len(OBS))


@pytest.mark.parametrize("control", ["linear", {"x": "linear"}])
def test_guide_with_an_unknown_control_lists_the_allowed_ones(control):
    with raises(ValueError, "control", "'affine'", "'mlp'", "'linear'"):
        GirsanovGuide(series_model, control=control)


def test_guide_with_an_unknown_estimator_is_rejected():
    with raises(ValueError, "estimator", "'girsanov'", "'reinforce'"):
        GirsanovGuide(series_model, estimator="reinforce")


def test_guide_with_an_unknown_covariance_is_rejected():
    with raises(ValueError, "covariance", "'full'", "'low-rank'"):
        GirsanovGuide(series_model, covariance="low-rank")


@pytest.mark.parametrize("init_scale", [0.0, -1.0])
def test_guide_with_a_non_positive_init_scale_is_rejected(init_scale):
    with raises(ValueError, "init_scale", "positive", str(init_scale)):
        GirsanovGuide(series_model, init_scale=init_scale)


class TupleEncoder(torch.nn.Module):
    def forward(self, y):
        return y, y


def test_encoder_returning_a_non_tensor_is_a_type_error():
    guide = GirsanovGuide(series_model, encoder=TupleEncoder())
    with raises(TypeError, "encoder", "tuple"):
        guide(guide_data())


class WrongBatchEncoder(torch.nn.Module):
    def forward(self, y):
        return torch.zeros(N_SERIES + 1, 3)


def test_encoder_context_with_the_wrong_batch_shape_names_the_encoder():
    guide = GirsanovGuide(series_model, encoder=WrongBatchEncoder())
    with raises(ValueError, "encoder", "(5, 3)", "(4,)"):
        guide(guide_data())


def test_guide_for_a_model_without_path_sites_is_rejected():
    def model():
        pyro.sample("theta", dist.Normal(0.0, 1.0))

    with raises(ValueError, "no EulerMaruyama sample site", "model"):
        GirsanovGuide(model)()


def test_control_dict_without_an_entry_for_a_path_site_names_it():
    guide = GirsanovGuide(series_model, control={"z": "affine"})
    with raises(ValueError, "control", "'x'"):
        guide(guide_data())


# --------------------------------------------------------------------------- girsanov()


def test_girsanov_with_an_unknown_estimator_is_rejected():
    with raises(ValueError, "estimator", "'plain'", "'score'"):
        path_law().girsanov(ControlNet(1), estimator="score")


@pytest.mark.parametrize("every", [0, -2, 2.5])
def test_girsanov_with_a_bad_checkpoint_every_is_rejected(every):
    with raises(ValueError, "checkpoint_every", "positive int", repr(every)):
        path_law().girsanov(ControlNet(1), checkpoint_every=every)


@pytest.mark.parametrize("make", ["girsanov", "guide"])
def test_a_non_boolean_compile_step_is_rejected(make):
    with pytest.raises(TypeError, match=r"compile_step must be True or False, but got 'yes'"):
        if make == "girsanov":
            path_law().girsanov(ControlNet(1), compile_step="yes")
        else:
            GirsanovGuide(series_model, compile_step="yes")


def test_girsanov_per_step_context_with_the_wrong_length_is_rejected():
    context = torch.zeros(5, 2)  # K + 1 = 6 steps expected
    with raises(ValueError, "per-step context", "(6, c)", "(5, 2)"):
        path_law().girsanov(ControlNet(1, context_dim=2), context=context, context_per_step=True)


def test_girsanov_with_a_non_callable_control_is_a_type_error():
    with raises(TypeError, "control", "callable", "str"):
        path_law().girsanov("mlp")


def test_girsanov_with_an_init_of_the_wrong_dimension_is_rejected():
    with raises(ValueError, "init", "(1,)", "(2,)"):
        path_law().girsanov(ControlNet(1), init=normal_init(2))


# ------------------------------------------------------------------- numerical failure


def cubic(t, x):
    return x**3


def blow_up_step(x, h):
    """Independent reference: the first ``k`` at which ``x_{k+1} = x_k + h x_k^3``, iterated in
    double precision, leaves the float32 range (noise of size 1e-6 sqrt(h) cannot change it)."""
    k = 0
    while abs(x) <= torch.finfo(torch.float32).max:
        x, k = x + h * x**3, k + 1
    return k


def test_simulated_path_that_blows_up_names_the_step_and_time():
    times = torch.linspace(0.0, 10.0, 21)
    k = blow_up_step(1.5, 0.5)
    law = path_law(
        drift=cubic, diffusion=torch.tensor([1e-6]), init=torch.tensor([1.5]), times=times
    )
    with raises(ValueError, f"non-finite at step {k} ", f"t = {float(times[k]):.6g})"):
        law.rsample()


def test_blow_up_with_per_series_grids_reports_the_time_of_the_series_that_blew_up():
    times = torch.stack([torch.linspace(0.0, 10.0, 21), torch.linspace(0.0, 20.0, 21)])
    k = blow_up_step(1.5, 1.0)  # the coarser second grid blows up first
    assert k < blow_up_step(1.5, 0.5)
    law = path_law(
        drift=cubic, diffusion=torch.tensor([1e-6]), init=torch.tensor([1.5]), times=times
    )
    with raises(ValueError, f"non-finite at step {k} ", f"t = {float(times[1, k]):.6g})"):
        law.rsample()


def test_unvalidated_simulation_returns_the_non_finite_path():
    law = path_law(
        drift=cubic,
        init=torch.tensor([1.5]),
        times=torch.linspace(0, 10, 21),
        validate_args=False,
    )
    assert not torch.isfinite(law.rsample()).all()


def poisson_model(counts):
    """Counts with log-rate ``100 + x``: ``exp(100)`` overflows float32, so the likelihood of
    site ``"counts"`` is ``3 log(inf) - inf = nan`` whatever the path."""
    with pyro.plate("series", 2, dim=-1):
        x = pyro.sample("x", path_law())
        pyro.sample("counts", dist.Poisson((100.0 + x[..., -1, 0]).exp()), obs=counts)


COUNTS = torch.tensor([3.0, 1.0])


def test_find_nonfinite_site_names_an_overflowing_likelihood():
    guide = GirsanovGuide(poisson_model, control="affine")
    found = find_nonfinite_site(poisson_model, guide, COUNTS)
    assert (found.name, found.trace, found.kind) == ("counts", "model", "log_prob")
    assert math.isnan(found.example)


def test_find_nonfinite_site_names_a_nan_parameter_before_what_it_feeds():
    def model():
        pyro.sample("theta", dist.Normal(0.0, 1.0))

    guide = AutoNormal(model)
    guide()
    pyro.get_param_store()["AutoNormal.locs.theta"] = torch.tensor(math.nan)
    found = find_nonfinite_site(model, guide)
    assert (found.name, found.trace, found.kind) == ("AutoNormal.locs.theta", "guide", "param")


def exploding_model():
    pyro.sample(
        "x", path_law(drift=cubic, init=torch.tensor([1.5]), times=torch.linspace(0, 10, 21))
    )


def test_find_nonfinite_site_names_a_latent_path_that_blew_up():
    guide = GirsanovGuide(exploding_model, control="affine")
    with pyro.validation_enabled(False):
        guide()  # build the guide's parameters without stopping at the blown-up prototype
    found = find_nonfinite_site(exploding_model, guide)
    assert (found.name, found.trace, found.kind) == ("x", "guide", "value")


def test_find_nonfinite_site_returns_none_for_a_finite_model():
    guide = GirsanovGuide(series_model, control="affine")
    assert find_nonfinite_site(series_model, guide, guide_data()) is None


def nan_loss_run(svi_class):
    """An SVI run on :func:`poisson_model` (whose loss is NaN) with the guide built."""
    guide = GirsanovGuide(poisson_model, control="mlp", hidden_dims=(4,))
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True)
    svi = svi_class(poisson_model, guide, pyro.optim.Adam({"lr": 0.1}), elbo)
    guide(COUNTS)
    return svi


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_plain_svi_lets_a_nan_loss_corrupt_the_parameters():
    svi = nan_loss_run(SVI)
    assert math.isnan(svi.step(COUNTS))
    params = pyro.get_param_store().named_parameters()
    assert not all(torch.isfinite(value).all() for _, value in params)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_checked_svi_names_the_site_and_leaves_parameters_unchanged():
    svi = nan_loss_run(CheckedSVI)
    store = pyro.get_param_store()
    before = {name: value.detach().clone() for name, value in store.named_parameters()}
    with raises(ValueError, "SVI loss is nan", "model site 'counts'", "not applied"):
        svi.step(COUNTS)
    for name, value in store.named_parameters():
        assert torch.equal(value, before[name]), name
        assert value.grad is None or not value.grad.any(), name


def test_checked_svi_follows_the_same_trajectory_as_svi():
    losses = []
    for cls in (SVI, CheckedSVI):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = GirsanovGuide(series_model, control="affine")
        elbo = Trace_ELBO(num_particles=2, vectorize_particles=True)
        svi = cls(series_model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
        losses.append([svi.step(guide_data()) for _ in range(3)])
    assert losses[0] == losses[1]
