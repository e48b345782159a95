"""Bad input gets an error that names the argument; numerical failure is loud.

One test per bad input: each asserts the exception type and that the message names the argument
and what was expected or received. Then: ``validate_args=False`` skips the value checks, a path
that blows up names its step and time, and a non-finite SVI loss names the site responsible.
"""

import math
import random
import re
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_nsde import ControlNet, EulerMaruyama, GirsanovGuide
from pyro_nsde.app.numerics import CheckedSVI, find_nonfinite_site

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


# ------------------------------------------------------------ mismatches between arguments


def test_diffusion_of_another_state_dimension_names_init_and_its_shape():
    times = torch.linspace(0.0, 1.0, 4)
    with raises(
        ValueError,
        "diffusion has shape (2,) but init has state dimension d = 3 (init shape (3,)); "
        "for noise_type='diagonal' diffusion must have shape (..., 3)",
    ):
        EulerMaruyama(decay, torch.ones(2), torch.zeros(3), times)


def test_matrix_diffusion_of_another_state_dimension_names_the_init_distribution():
    with raises(
        ValueError,
        "diffusion has shape (3, 1) but init has state dimension d = 2 "
        "(init batch_shape (4,), event_shape (2,)); for noise_type='scalar' diffusion must "
        "have shape (..., 2, 1)",
    ):
        path_law(
            2, diffusion=torch.ones(3, 1), init=normal_init(2).expand((4,)), noise_type="scalar"
        )


def test_drift_of_another_state_dimension_names_init_and_its_shape():
    with raises(
        ValueError,
        "drift first_coordinate returned shape (4, 1) for x of shape (4, 2), but init has "
        "state dimension d = 2 (init shape (4, 2)); the drift must return shape (..., 2)",
    ):
        path_law(2, drift=first_coordinate, init=torch.zeros(4, 2))


def five_series(t, x):
    return torch.zeros(5, 2)


def per_series_decay(t, x):
    return -torch.tensor([1.0, 2.0]).unsqueeze(-1) * x  # two series


def three_scales(t, x):
    return torch.full((3, 2), 0.5)


@pytest.mark.parametrize(
    "kwargs, first, second",
    [
        (
            {"init": torch.zeros(3, 2), "times": torch.stack([TIMES, TIMES + 1])},
            "init has batch shape (3,) (init shape (3, 2))",
            "times has batch shape (2,) (times shape (2, 6))",
        ),
        (
            {"init": normal_init(2).expand((3,)), "diffusion": torch.full((4, 2), 0.5)},
            "init has batch shape (3,) (init batch_shape (3,), event_shape (2,))",
            "diffusion has batch shape (4,) (diffusion shape (4, 2))",
        ),
        (
            {"drift": five_series, "times": torch.stack([TIMES, TIMES + 1, TIMES + 2])},
            "times has batch shape (3,) (times shape (3, 6))",
            "drift five_series has batch shape (5,) (output shape (5, 2) for x of shape (3, 2))",
        ),
        (
            {"drift": per_series_decay, "diffusion": three_scales},
            "drift per_series_decay has batch shape (2,) (output shape (2, 2) for x of shape (2,))",
            "diffusion three_scales has batch shape (3,) (output shape (3, 2) for x of shape (2,))",
        ),
    ],
    ids=["init-times", "init-diffusion", "times-drift", "drift-diffusion"],
)
def test_batch_shapes_that_do_not_broadcast_name_both_arguments_and_their_shapes(
    kwargs, first, second
):
    with raises(ValueError, first, second, "do not broadcast"):
        path_law(2, **kwargs)


def per_series_scale(t, x):
    return torch.full((4, 1), 0.5) * torch.ones_like(x)  # four series


@pytest.mark.parametrize("role", ["drift", "diffusion"])
def test_a_function_failing_on_the_probe_state_names_it_and_where_the_state_comes_from(role):
    kwargs = {role: per_series_scale, "init": torch.zeros(3, 2)}
    with raises(
        ValueError,
        f"{role} per_series_scale failed on x of shape (3, 2) (batch shape (3,) broadcast "
        f"from init (3,) and times (); init has state dimension d = 2 (init shape (3, 2)))",
        "size of tensor a (4)",
    ):
        path_law(2, **kwargs)


# ------------------------------------------------------------- leading dims added by a callable


def compartment_model(*, written_right=False, diffusion=None, validate_args=None):
    """A flow ``beta s i`` from the first compartment to the second, with a scalar ``beta``.
    Written ``beta[..., None] * x[..., 0] * x[..., 1]``, the flow gets a dim that the component
    ``x[..., 0]`` does not have: the drift returns ``(1, 2)`` for ``x`` of shape ``(2,)``."""

    def model():
        beta = pyro.sample("beta", dist.LogNormal(0.0, 0.3))
        rate = beta if written_right else beta[..., None]

        def two_compartment(t, x):
            flow = rate * x[..., 0] * x[..., 1]
            return torch.stack([-flow, flow], -1)

        noise = torch.full((2,), 0.1) if diffusion is None else diffusion
        law = EulerMaruyama(
            two_compartment, noise, torch.tensor([0.9, 0.1]), TIMES, validate_args=validate_args
        )
        x = pyro.sample("x", law)
        pyro.sample("y", dist.Normal(x[..., -1, 1], 0.1), obs=torch.tensor(0.2))

    return model


def path_batch_shape(model):
    return pyro.poutine.trace(model).get_trace().nodes["x"]["fn"].batch_shape


def test_drift_adding_a_leading_singleton_dim_in_a_model_names_the_drift_and_the_fix():
    with raises(
        ValueError,
        "two_compartment returned shape (1, 2) for x of shape (2,): it added 1 leading batch "
        "dim(s) of size 1 beyond the 0 batch dim(s)",
        "for a scalar beta write beta * x[..., i]",
        "validate_args=False",
    ):
        path_batch_shape(compartment_model())
    assert path_batch_shape(compartment_model(written_right=True)) == ()


def test_the_added_dim_is_caught_before_predictive_broadcasts_samples_against_samples():
    with raises(ValueError, "two_compartment returned shape (1, 2)"):
        pyro.infer.Predictive(compartment_model(), num_samples=3, parallel=True)()
    # Unchecked, three vectorized samples of beta, (3,), become (3, 1) in the drift: the
    # path's batch is (3, 3), a sample-by-sample broadcast, instead of (3,).
    with pyro.plate("samples", 3, dim=-1):
        assert path_batch_shape(compartment_model(validate_args=False)) == (3, 3)
        assert path_batch_shape(compartment_model(written_right=True)) == (3,)


def noise_with_a_leading_dim(t, x):
    return torch.full((1, 2), 0.1) * torch.ones_like(x)


def test_diffusion_adding_a_leading_singleton_dim_in_a_model_names_the_diffusion():
    with raises(
        ValueError,
        "diffusion noise_with_a_leading_dim returned shape (1, 2) for x of shape (2,): it "
        "added 1 leading batch dim(s) of size 1",
    ):
        path_batch_shape(compartment_model(written_right=True, diffusion=noise_with_a_leading_dim))


def test_leading_singletons_beyond_the_batch_of_init_and_times_are_counted():
    def drift(t, x):
        return torch.ones(1, 1, 3, 2) * x

    def model():
        pyro.sample("x", path_law(2, drift=drift, init=torch.zeros(3, 2)))

    with raises(ValueError, "returned shape (1, 1, 3, 2) for x of shape (3, 2)", "added 2"):
        path_batch_shape(model)


def test_validate_args_false_keeps_the_added_dim_as_batch():
    assert path_batch_shape(compartment_model(validate_args=False)) == (1,)
    with pyro.validation_enabled(False):
        assert path_batch_shape(compartment_model()) == (1,)


def test_outside_a_traced_run_an_added_singleton_is_a_batch_of_one():
    rate = torch.tensor([0.5])  # parameters of one series

    def drift(t, x):
        return -rate[..., None] * x

    assert path_law(2, drift=drift).batch_shape == (1,)
    compartment_model()()  # a plain call: no handler records the model


def test_added_dims_of_size_other_than_one_are_batch():
    theta = torch.tensor([[1.0], [2.0], [3.0]])  # three parameter values, no plate

    def model():
        pyro.sample("x", path_law(2, drift=lambda t, x: -theta * x))

    assert path_batch_shape(model) == (3,)


def per_series_model(num_series, init=None):
    """A path in a plate of ``num_series`` whose drift uses a per-series ``theta``
    (``(N,)``, read as ``theta[..., None]``) and a known ``(d,)`` initial state."""

    def model():
        with pyro.plate("series", num_series, dim=-1):
            theta = pyro.sample("theta", dist.LogNormal(0.0, 0.1))
            law = EulerMaruyama(
                lambda t, x: -theta[..., None] * x,
                torch.full((2,), 0.5),
                torch.zeros(2) if init is None else init,
                TIMES,
            )
            return pyro.sample("x", law)

    return model


@pytest.mark.parametrize("num_series", [1, 3])
def test_plate_dims_of_parameters_are_batch_even_of_size_one(num_series):
    trace = pyro.poutine.trace(per_series_model(num_series)).get_trace()
    assert trace.nodes["x"]["fn"].batch_shape == (num_series,)


def scalar_theta_model():
    """A scalar ``theta`` used as ``theta[..., None]`` (right under sample plates), a path
    outside every plate, and observations in a plate."""
    theta = pyro.sample("theta", dist.LogNormal(0.0, 0.1))
    law = EulerMaruyama(
        lambda t, x: -theta[..., None] * x, torch.full((2,), 0.5), torch.zeros(2), TIMES
    )
    x = pyro.sample("x", law)
    with pyro.plate("obs", 2, dim=-1):
        pyro.sample("y", dist.Normal(x[..., -1, :], 0.1), obs=torch.zeros(2))


@pytest.mark.parametrize("num_samples", [1, 4])
def test_sample_plates_explain_the_dims_of_parameters_even_of_size_one(num_samples):
    samples = pyro.infer.Predictive(scalar_theta_model, num_samples=num_samples, parallel=True)()
    assert samples["x"].shape == (num_samples, 1, 6, 2)
    guide = GirsanovGuide(scalar_theta_model, control="affine")
    guide()
    # The guide runs the model blocked inside Pyro's sample plate: its dims still count.
    # One sample at a time, the model is conditioned on theta of shape (1,) (padded to the
    # model's one plate dim), with no plate active at the path.
    for parallel in (True, False):
        predictive = pyro.infer.Predictive(
            scalar_theta_model, guide=guide, num_samples=num_samples, parallel=parallel
        )
        assert predictive()["x"].shape == (num_samples, 1, 6, 2)
    svi = SVI(
        scalar_theta_model,
        guide,
        pyro.optim.Adam({"lr": 0.01}),
        Trace_ELBO(num_particles=num_samples, vectorize_particles=True),
    )
    assert math.isfinite(svi.step())


# ------------------------------------------------------------------------ log_prob value


WRONG_EVENT_SHAPES = pytest.mark.parametrize(
    "shape", [(5, 1), (6, 2), (6,)], ids=["steps", "state", "flat"]
)


@WRONG_EVENT_SHAPES
def test_log_prob_of_a_value_with_the_wrong_event_shape_names_the_expected_shape(shape):
    with raises(ValueError, "value must have shape", "(..., 6, 1)", f"got shape {shape}"):
        path_law().log_prob(torch.zeros(shape))


@WRONG_EVENT_SHAPES
def test_girsanov_log_prob_of_a_value_with_the_wrong_event_shape_is_rejected(shape):
    posterior = path_law().girsanov(ControlNet(1, hidden_dims=(4,)))
    with raises(ValueError, "value", "event_shape", "[6, 1]"):
        posterior.log_prob(torch.zeros(shape))


def test_log_prob_of_a_value_whose_batch_does_not_broadcast_names_the_batch_shape():
    law = path_law(init=normal_init(1).expand((2,)))  # batch (2,)
    with raises(
        ValueError,
        "value has shape (3, 6, 1), whose batch part (3,)",
        "batch_shape (2,)",
        "(..., 2, 6, 1)",
    ):
        law.log_prob(torch.zeros(3, 6, 1))
    assert law.log_prob(torch.zeros(3, 1, 6, 1)).shape == (3, 2)  # batch part (3, 1) is fine


# ------------------------------------------------------------------------------ random shapes
#
# Random shapes for init (tensor or distribution), times (with batch dims), the drift's output,
# the diffusion (tensor or callable, every noise type) and the value given to log_prob. The
# oracle below derives from the shape rules of the API alone which arguments disagree, and the
# words a message about each disagreement must contain. Construction, rsample and log_prob
# must then succeed with the broadcast shapes, or raise ValueError/TypeError naming the
# arguments of one of the disagreements: never a bare RuntimeError or IndexError.

NOISE_TYPES = ("diagonal", "scalar", "general", "additive")
CASES_PER_SEED = 100


@dataclass(frozen=True)
class ShapeCase:
    noise_type: str
    init: tuple  # a tensor's shape, or a distribution's batch_shape + (d,)
    init_event_dims: int | None  # None for a tensor
    times: tuple  # batch + (K+1,)
    drift: str  # "linear": -theta * x; "constant": ignores x
    drift_param: tuple  # theta's shape, or the constant output's
    diffusion_callable: bool  # a callable broadcasts its tensor against x's batch
    diffusion_batch: tuple
    diffusion_event: tuple
    value: tuple  # the shape given to log_prob


def random_case(rng):
    def batch(max_dims=2):
        return tuple(rng.choice((1, 2, 3)) for _ in range(rng.randint(0, max_dims)))

    def size(right):  # mostly right
        return right if rng.random() < 0.85 else rng.choice([n for n in (1, 2, 3, 4) if n != right])

    d = rng.choice((1, 2, 3))
    noise_type = rng.choice(NOISE_TYPES)
    points = 1 if rng.random() < 0.03 else rng.choice((3, 4))
    init = batch() + (size(d),)
    init_event_dims = None
    if rng.random() < 0.5:
        init_event_dims = 1 if rng.random() < 0.95 else (2 if len(init) > 1 else 0)
    drift = "linear" if rng.random() < 0.7 else "constant"
    last = 1 if drift == "linear" and rng.random() < 0.5 else size(d)
    diffusion_callable = rng.random() < 0.4
    diffusion_batch = batch()
    if noise_type == "diagonal":
        event = (size(d),)
    elif noise_type == "scalar":
        event = (size(d), 1 if rng.random() < 0.9 else 2)
    else:
        event = (size(d), rng.choice((1, 2, 3)))
    if not diffusion_callable and rng.random() < 0.05:  # too few dims for the noise type
        diffusion_batch, event = (), event[:-1]
    state = init[-1]
    wrong_events = [(points + 1, state), (points, state + 1), (points,)]
    value = batch() + rng.choice([(points, state)] * 7 + wrong_events)
    return ShapeCase(
        noise_type,
        init,
        init_event_dims,
        batch() + (points,),
        drift,
        batch(3) + (last,),
        diffusion_callable,
        diffusion_batch,
        event,
        value,
    )


def build(case):
    """``(drift, diffusion, init, times)`` of the shapes of ``case``, with valid values."""
    theta = torch.full(case.drift_param, 0.5)

    def linear(t, x):
        return -theta * x

    def constant(t, x):
        return 0.1 * theta

    if case.noise_type in ("general", "additive") and len(case.diffusion_event) == 2:
        g = torch.eye(*case.diffusion_event) + 0.1  # full rank
    else:
        g = torch.full(case.diffusion_event, 0.5)
    g = g.expand(case.diffusion_batch + case.diffusion_event)

    def diffusion(t, x):
        batch = torch.broadcast_shapes(x.shape[:-1], case.diffusion_batch)
        return g.expand(batch + case.diffusion_event)

    init = torch.zeros(case.init)
    if case.init_event_dims is not None:
        init = dist.Normal(init, 1.0).to_event(case.init_event_dims)
    offsets = 0.1 * torch.arange(math.prod(case.times[:-1]), dtype=torch.float32)
    times = torch.linspace(0.0, 1.0, case.times[-1]) + offsets.reshape(case.times[:-1] + (1,))
    drift = linear if case.drift == "linear" else constant
    return drift, diffusion if case.diffusion_callable else g, init, times


def broadcast(*shapes):
    """The broadcast of ``shapes``, or ``None`` where they do not broadcast."""
    n = max(map(len, shapes))
    out = []
    for sizes in zip(*((1,) * (n - len(s)) + tuple(s) for s in shapes), strict=True):
        large = {size for size in sizes if size != 1}
        if len(large) > 1:
            return None
        out.append(large.pop() if large else 1)
    return tuple(out)


def expected_faults(case):
    """``(faults, batch_shape)``: each fault is the fragments of a message about it."""
    faults = []
    if case.times[-1] < 2:
        faults.append(("times", "K+1 >= 2"))
    if case.init_event_dims not in (None, 1):
        faults.append(("init", "event_shape"))
    if faults:
        return faults, None
    d, init_batch, times_batch = case.init[-1], case.init[:-1], case.times[:-1]
    x_batch = broadcast(init_batch, times_batch)
    if x_batch is None:
        return [("init", str(init_batch), "times", str(times_batch))], None
    x_shape = str(x_batch + (d,))
    batches = [("init", init_batch), ("times", times_batch)]
    out = case.drift_param
    if case.drift == "linear":
        out = broadcast(case.drift_param, x_batch + (d,))
        if out is None:
            faults.append(("drift", "failed", x_shape))
    if out is not None:
        if out[-1] != d:
            faults.append(("drift", str(out), "init", f"d = {d}"))
        batches.append(("drift", out[:-1]))
    event_dims = 1 if case.noise_type == "diagonal" else 2
    g_batch = case.diffusion_batch
    if case.diffusion_callable:
        g_batch = broadcast(x_batch, case.diffusion_batch)
        if g_batch is None:
            faults.append(("diffusion", "failed", x_shape))
    if g_batch is not None:
        g = g_batch + case.diffusion_event
        if len(g) < event_dims or (case.noise_type == "scalar" and g[-1] != 1):
            faults.append(("diffusion", str(g), repr(case.noise_type)))
        elif g[-event_dims] != d:
            faults.append(("diffusion", str(g), "init", f"d = {d}"))
        else:
            g_batch = g[: len(g) - event_dims]
            batches.append(("diffusion", g_batch))
    for i, (name, batch) in enumerate(batches):
        for other, other_batch in batches[i + 1 :]:
            if broadcast(batch, other_batch) is None:
                faults.append((name, str(batch), other, str(other_batch)))
    return faults, None if faults else broadcast(*(batch for _, batch in batches))


def value_faults(case, batch):
    event = (case.times[-1], case.init[-1])
    if case.value[-2:] != event:
        return [("value", f"(..., {event[0]}, {event[1]})", str(case.value))]
    if broadcast(case.value[:-2], batch) is None:
        return [("value", str(case.value), str(batch))]
    return []


def outcome(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), None)``, or ``(None, error)`` for any error."""
    try:
        return fn(*args, **kwargs), None
    except Exception as error:
        return None, error


def check_error(error, faults, case):
    assert isinstance(error, (ValueError, TypeError)), (case, faults, repr(error))
    message = str(error)
    assert any(all(f in message for f in fault) for fault in faults), (case, faults, message)


@pytest.mark.parametrize("seed", range(15))
def test_random_shapes_succeed_consistently_or_raise_an_error_naming_the_arguments(seed):
    rng = random.Random(seed)
    for _ in range(CASES_PER_SEED):
        case = random_case(rng)
        faults, batch = expected_faults(case)
        drift, diffusion, init, times = build(case)
        law, error = outcome(
            EulerMaruyama, drift, diffusion, init, times, noise_type=case.noise_type
        )
        if faults:
            check_error(error, faults, case)
            continue
        assert error is None, (case, repr(error))
        event = (case.times[-1], case.init[-1])
        assert (law.batch_shape, law.event_shape) == (batch, event), case
        path = law.rsample((2,))
        assert path.shape == (2, *batch, *event), case
        log_prob = law.log_prob(path)
        assert log_prob.shape == (2, *batch) and torch.isfinite(log_prob).all(), case
        faults = value_faults(case, batch)
        log_prob, error = outcome(law.log_prob, torch.zeros(case.value))
        if faults:
            check_error(error, faults, case)
        else:
            assert error is None, (case, repr(error))
            assert log_prob.shape == broadcast(case.value[:-2], batch), case


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


@pytest.mark.parametrize("control", ["quadratic", {"x": "quadratic"}])
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
    guide = GirsanovGuide(poisson_model, control="affine", covariance="prior", latents="normal")
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


def _gridded(num):
    from pyro_nsde.zoo.series import GriddedSeries

    generator = torch.Generator().manual_seed(num)
    times = torch.linspace(0.0, 1.0, 6)
    values = torch.randn(num, 6, 1, generator=generator)
    return GriddedSeries(times, values, torch.ones(num, 6, 1, dtype=torch.bool))


def _minibatch_model(data, subsample_size=None):
    with pyro.plate("series", data.num_series, subsample_size=subsample_size, dim=-1):
        batch = data.subsample()
        x = pyro.sample(
            "x", EulerMaruyama(lambda t, x: -x, torch.tensor([0.5]), torch.zeros(1), batch.times)
        )
        pyro.sample("y", dist.Normal(x, 0.1).to_event(2), obs=batch.values)


def test_amortized_guide_on_data_of_another_size_names_create_plates():
    from pyro_nsde import GRUEncoder

    train, test = _gridded(8), _gridded(5)
    guide = GirsanovGuide(_minibatch_model, control="mlp", encoder=GRUEncoder(1, 4, 8))
    Trace_ELBO().loss(_minibatch_model, guide, train, 4)
    with raises(ValueError, "plate 'series'", "create_plates", "pyro.plate('series'"):
        Trace_ELBO().loss(_minibatch_model, guide, test)


def test_amortized_guide_with_create_plates_follows_the_data():
    from pyro_nsde import GRUEncoder

    def plates(data, subsample_size=None):
        return pyro.plate("series", data.num_series, subsample_size=subsample_size, dim=-1)

    train, test = _gridded(8), _gridded(5)
    guide = GirsanovGuide(
        _minibatch_model, control="mlp", encoder=GRUEncoder(1, 4, 8), create_plates=plates
    )
    Trace_ELBO().loss(_minibatch_model, guide, train, 4)
    assert math.isfinite(Trace_ELBO().loss(_minibatch_model, guide, test))
