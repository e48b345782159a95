"""Property-based tests over shapes: random batch and sample shapes, d, m, K, noise types,
random or known initial states, shared or per-series grids, constant or state-dependent
diffusions.

For every drawn case: ``rsample`` and ``log_prob`` have the right shapes, ``log_prob`` is finite
and equals the hand-written step-by-step density of ``conftest.py`` (for the prior and for a
Girsanov posterior, on recorded and on fresh paths), and ``expand`` is consistent with
broadcasting the original law's ``log_prob``.

The budget is fixed (``max_examples=25``, derandomized) so CI time and outcome do not vary.
"""

from typing import NamedTuple

import pyro.distributions as dist
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_nsde import ControlNet, EulerMaruyama

# hand_log_prob is a stateless function, so sharing it across examples is safe.
BUDGET = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
NOISE_TYPES = ("diagonal", "scalar", "general", "additive")
DTYPE = torch.float64


class Case(NamedTuple):
    d: int
    m: int
    num_steps: int
    noise_type: str
    batch: tuple
    sample: tuple
    per_series_times: bool
    random_init: bool
    state_dependent: bool
    seed: int


shapes = st.lists(st.integers(1, 3), max_size=2).map(tuple)


@st.composite
def cases(draw):
    d = draw(st.integers(1, 3))
    noise_type = draw(st.sampled_from(NOISE_TYPES))
    m = {"diagonal": d, "scalar": 1}.get(noise_type) or draw(st.integers(1, 3))
    batch = draw(shapes)
    return Case(
        d=d,
        m=m,
        num_steps=draw(st.integers(1, 4)),
        noise_type=noise_type,
        batch=batch,
        sample=draw(shapes),
        per_series_times=bool(batch) and draw(st.booleans()),
        random_init=draw(st.booleans()),
        state_dependent=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


class Problem(NamedTuple):
    law: EulerMaruyama
    control: ControlNet


def build(case: Case) -> Problem:
    torch.manual_seed(case.seed)  # rsample and the control's hidden layers draw from it
    gen = torch.Generator().manual_seed(case.seed)

    def rand(*shape):
        return torch.rand(shape, generator=gen, dtype=DTYPE)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=DTYPE)

    d, m = case.d, case.m
    rate = 0.5 + rand(*case.batch)
    coupling = 0.3 * randn(d, d)

    def drift(t, x):
        return -rate[..., None] * x + x @ coupling.T + 0.1 * t

    if case.noise_type == "diagonal":
        base = 0.3 + rand(d)
    elif case.noise_type == "scalar":
        base = 0.3 + rand(d, 1)
    else:
        base = 0.5 * randn(d, m) + torch.eye(d, m, dtype=DTYPE)

    def modulation(t, x):
        """A positive factor ``(..., 1)``: of ``x``, or of ``t`` only for additive noise."""
        if case.noise_type == "additive":
            return 1.0 + 0.1 * t
        return 1.0 + 0.2 * torch.tanh(x.sum(-1, keepdim=True))

    if not case.state_dependent:
        diffusion = base
    elif case.noise_type == "diagonal":

        def diffusion(t, x):
            return base * modulation(t, x)
    else:

        def diffusion(t, x):
            return base * modulation(t, x)[..., None]

    grid_batch = case.batch[-1:] if case.per_series_times else ()
    steps = 0.05 + 0.3 * rand(*grid_batch, case.num_steps)
    times = torch.cat([torch.zeros(grid_batch + (1,), dtype=DTYPE), steps.cumsum(-1)], -1)
    if case.random_init:
        init = dist.Normal(randn(d), 0.5 + rand(d)).to_event(1)
    else:
        init = randn(d)
    law = EulerMaruyama(drift, diffusion, init, times, noise_type=case.noise_type)

    control = ControlNet(d, m, hidden_dims=(4,)).to(DTYPE)
    torch.nn.init.normal_(control.head.weight, std=0.5, generator=gen)
    torch.nn.init.normal_(control.head.bias, std=0.5, generator=gen)
    return Problem(law, control)


def reference(hand_log_prob, problem: Problem, path, control=None):
    law = problem.law
    control = None if control is None else (control, "prior")
    return hand_log_prob(
        path, law.drift, law.diffusion, law.noise_type, law.init, law.times, control
    )


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-7)


@BUDGET
@given(case=cases())
def test_prior_samples_and_densities_are_shaped_finite_and_exact(hand_log_prob, case):
    problem = build(case)
    law = problem.law
    event = (case.num_steps + 1, case.d)
    assert law.batch_shape == case.batch
    assert law.event_shape == event
    assert law.noise_dim == case.m

    path = law.rsample(case.sample)
    assert path.shape == case.sample + case.batch + event
    log_prob = law.log_prob(path)
    assert log_prob.shape == case.sample + case.batch
    assert torch.isfinite(log_prob).all()
    expected = reference(hand_log_prob, problem, path)
    assert_close(log_prob, expected)  # the recorded density of a simulated path
    assert_close(law.log_prob(path.clone()), expected)  # the density evaluated afresh


@BUDGET
@given(case=cases())
def test_girsanov_samples_and_densities_are_shaped_finite_and_exact(hand_log_prob, case):
    problem = build(case)
    posterior = problem.law.girsanov(problem.control)
    event = (case.num_steps + 1, case.d)
    assert posterior.batch_shape == case.batch

    path = posterior.rsample(case.sample)
    assert path.shape == case.sample + case.batch + event
    log_q = posterior.log_prob(path)
    assert log_q.shape == case.sample + case.batch
    assert torch.isfinite(log_q).all()
    expected = reference(hand_log_prob, problem, path, problem.control)
    assert_close(log_q, expected)  # the recorded density of a simulated path
    assert_close(posterior.log_prob(path.clone()), expected)  # evaluated afresh
    # The prior's density of a posterior path (the model's term of the ELBO).
    assert_close(problem.law.log_prob(path), reference(hand_log_prob, problem, path))


@BUDGET
@given(cases(), shapes)
def test_expand_is_consistent_with_broadcasting(case, extra):
    problem = build(case)
    event = (case.num_steps + 1, case.d)
    new_batch = extra + case.batch
    for law in (problem.law, problem.law.girsanov(problem.control)):
        expanded = law.expand(new_batch)
        assert expanded.batch_shape == new_batch
        assert expanded.event_shape == event
        assert expanded.rsample(case.sample).shape == case.sample + new_batch + event

        path = law.rsample(case.sample)
        spread = path.reshape(case.sample + (1,) * len(extra) + case.batch + event)
        expected = law.log_prob(path.clone()).reshape(spread.shape[:-2])
        expected = expected.expand(case.sample + new_batch)
        assert_close(expanded.log_prob(spread.clone()), expected)
