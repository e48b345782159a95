import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_nsde import ControlNet, EulerMaruyama, GirsanovGuide
from pyro_nsde.zoo.encoders import GRUEncoder
from pyro_nsde.zoo.nn import DiffusionNet, DriftNet
from pyro_nsde.zoo.series import (
    GriddedSeries,
    common_grid,
    minibatches,
    place_on_grid,
    series_grids,
)

TIMES = [
    torch.tensor([0.0, 0.3, 1.0]),
    torch.tensor([0.1, 0.3, 0.75]),
    torch.tensor([0.2, 0.9]),
]


def test_common_grid_is_the_union_of_the_observation_times():
    grid, index = common_grid(TIMES)
    torch.testing.assert_close(grid, torch.tensor([0.0, 0.1, 0.2, 0.3, 0.75, 0.9, 1.0]))
    for t, idx in zip(TIMES, index, strict=True):
        torch.testing.assert_close(grid[idx], t)
    grid, index = common_grid(TIMES, start=-0.5, end=2.0)
    assert grid[0] == -0.5 and grid[-1] == 2.0
    for t, idx in zip(TIMES, index, strict=True):
        torch.testing.assert_close(grid[idx], t)


def test_refined_common_grid_splits_each_gap_into_the_fewest_equal_steps():
    max_step = 0.12
    grid, index = common_grid(TIMES, max_step=max_step)
    union = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.75, 0.9, 1.0])
    assert grid.diff().max() <= max_step + 1e-7
    expected_steps = sum(math.ceil(float(g) / max_step - 1e-9) for g in union.diff())
    assert grid.numel() - 1 == expected_steps
    assert all(torch.isclose(grid, u).any() for u in union)
    for t, idx in zip(TIMES, index, strict=True):
        torch.testing.assert_close(grid[idx], t)


def test_times_closer_than_the_tolerance_share_a_grid_point():
    grid, index = common_grid([torch.tensor([0.0, 0.3]), torch.tensor([0.1 + 0.2, 1.0])])
    assert grid.numel() == 3
    assert index[0][1] == index[1][0]


def _best_max_step(gaps, num_steps):
    """Brute force: the smallest largest step over all ways to share the steps out."""
    best = math.inf
    n = len(gaps)
    for counts in itertools.product(range(1, num_steps + 1), repeat=n):
        if sum(counts) == num_steps:
            best = min(best, max(g / c for g, c in zip(gaps, counts, strict=True)))
    return best


@pytest.mark.parametrize("num_steps", [4, 5, 8, 11])
def test_series_grids_put_every_series_on_its_own_grid_with_the_smallest_largest_step(num_steps):
    grids, index = series_grids(TIMES, num_steps, start=0.0, end=1.2)
    assert grids.shape == (3, num_steps + 1)
    assert (grids[:, 0] == 0.0).all() and torch.allclose(grids[:, -1], torch.tensor(1.2))
    for i, (t, idx) in enumerate(zip(TIMES, index, strict=True)):
        torch.testing.assert_close(grids[i, idx], t)
        points = sorted({0.0, *t.tolist(), 1.2})
        gaps = [b - a for a, b in itertools.pairwise(points)]
        assert float(grids[i].diff().max()) == pytest.approx(_best_max_step(gaps, num_steps))


def test_values_land_on_their_grid_points_and_missing_ones_are_masked():
    values = [
        torch.tensor([[1.0, 2.0], [3.0, math.nan], [5.0, 6.0]]),
        torch.tensor([[7.0, 8.0], [9.0, 10.0], [11.0, 12.0]]),
        torch.tensor([[math.nan, math.nan], [13.0, 14.0]]),
    ]
    data = GriddedSeries.from_series(TIMES, values, max_step=0.2)
    grid, index = common_grid(TIMES, max_step=0.2)
    torch.testing.assert_close(data.times, grid)
    assert data.values.shape == (3, grid.numel(), 2) and data.mask.dtype == torch.bool
    for i, idx in enumerate(index):
        seen = ~torch.isnan(values[i])
        assert torch.equal(data.mask[i, idx], seen)
        torch.testing.assert_close(data.values[i, idx][seen], values[i][seen])
        other = torch.ones(grid.numel(), dtype=torch.bool)
        other[idx] = False
        assert not data.mask[i, other].any()
    assert torch.isfinite(data.values).all() and (data.values[~data.mask] == 0).all()
    per_series = GriddedSeries.from_series(TIMES, values, num_steps=6)
    assert per_series.times.shape == (3, 7) and per_series.num_steps == 6


def test_subsample_selects_the_minibatch_inside_a_plate():
    data = GriddedSeries.from_series(TIMES, [torch.randn(len(t)) for t in TIMES], num_steps=5)
    with pyro.plate("series", 3, subsample_size=2, dim=-1) as index:
        batch = data.subsample()
    assert batch.num_series == 2
    torch.testing.assert_close(batch.values, data.values[index])
    torch.testing.assert_close(batch.times, data.times[index])
    assert torch.equal(batch.mask, data.mask[index])
    # Outside any plate: the same tensors. (Not ``==``: from Python 3.13 on, a dataclass's
    # ``__eq__`` compares field by field, and tensors compare elementwise.)
    unchanged = data.subsample()
    assert all(getattr(unchanged, f) is getattr(data, f) for f in ("times", "values", "mask"))
    one = data[1]
    assert one.num_series == 1 and torch.equal(one.values[0], data.values[1])


def test_minibatches_partition_the_series():
    batches = list(minibatches(10, 4, generator=torch.Generator().manual_seed(0)))
    assert [b.numel() for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


def test_invalid_series_name_the_problem():
    with pytest.raises(ValueError, match=r"times\[1\] must be strictly increasing"):
        common_grid([torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])])
    with pytest.raises(ValueError, match="finite"):
        common_grid([torch.tensor([0.0, math.nan])])
    with pytest.raises(ValueError, match="num_steps must be >= 4"):
        series_grids(TIMES, 2)
    with pytest.raises(ValueError, match="start must be <="):
        common_grid(TIMES, start=0.5)
    with pytest.raises(ValueError, match="max_step"):
        common_grid(TIMES, max_step=0.0)
    with pytest.raises(ValueError, match="not both"):
        GriddedSeries.from_series(
            TIMES, [torch.zeros(len(t)) for t in TIMES], max_step=1, num_steps=4
        )
    with pytest.raises(ValueError, match=r"values\[0\] must have shape \(3, 1\)"):
        place_on_grid([torch.zeros(2, 1)], [torch.tensor([0, 1, 2])], 4)
    with pytest.raises(ValueError, match="same grid point"):
        place_on_grid([torch.zeros(2)], [torch.tensor([1, 1])], 4)
    with pytest.raises(ValueError, match="mask"):
        GriddedSeries(torch.arange(3.0), torch.zeros(2, 3, 1), torch.ones(2, 3, 1))


def _randomize(*modules, scale=0.3):
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.normal_(0.0, scale)


def test_minibatch_elbo_is_an_unbiased_estimate_of_the_full_data_elbo():
    """``pyro.plate(..., subsample_size=n)`` scales the minibatch's terms by ``N / n``: averaged
    over minibatches (and paths) the estimate equals the full-data ELBO, at fixed guide
    parameters (random, so that the series' terms differ)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    num_series, size = 6, 2
    times = torch.linspace(0, 1, 6)
    y = torch.randn(num_series, 6) * torch.arange(1.0, 7.0).unsqueeze(-1)

    def make_model(subsample_size):
        def model(y):
            theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
            with pyro.plate("series", num_series, subsample_size=subsample_size):
                batch = pyro.subsample(y, event_dim=1)
                init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
                law = EulerMaruyama(
                    lambda t, x: -theta[..., None] * x, torch.tensor([0.5]), init, times
                )
                x = pyro.sample("x", law)
                pyro.sample("y", dist.Normal(x[..., 0], 0.3).to_event(1), obs=batch)

        return model

    mini_model, full_model = make_model(size), make_model(None)
    # init_path="prior" for both: the same parameters must mean the same guide (a Laplace
    # fit is made only without subsampling).
    mini_guide = GirsanovGuide(mini_model, control="affine", init_path="prior")
    mini_guide(y)
    with torch.no_grad():
        for _, value in pyro.get_param_store().named_parameters():
            value.add_(0.3 * torch.randn_like(value))
    full_guide = GirsanovGuide(full_model, control="affine", init_path="prior")  # same names
    full_elbo = Trace_ELBO(num_particles=20000, vectorize_particles=True)
    full = torch.tensor([full_elbo.loss(full_model, full_guide, y) for _ in range(2)])
    full_loss, full_se = float(full.mean()), float(full.std()) / 2 + 1e-3
    mini_elbo = Trace_ELBO(num_particles=20, vectorize_particles=True)
    minis = torch.tensor([mini_elbo.loss(mini_model, mini_guide, y) for _ in range(300)])
    mini_se = float(minis.std()) / math.sqrt(len(minis))
    assert float(minis.std()) > 10 * mini_se  # minibatches do differ
    assert abs(float(minis.mean()) - full_loss) < 4 * (mini_se + full_se)


def test_series_on_their_own_grids_have_the_elbo_they_have_alone():
    """Per-series ELBO terms in one batch of series with different observation times equal
    those of each series on its own, at the same guide parameters and the same path (common
    random numbers), for an amortized guide (encoder, network control, ``x_0`` head)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    values = [torch.randn(len(t), 2) for t in TIMES]
    values[1][1, 0] = math.nan
    options = {"num_steps": 9, "start": 0.0, "end": 1.2}
    batch = GriddedSeries.from_series(TIMES, values, **options)
    drift, diffusion = DriftNet(2, (8,)), DiffusionNet(2, hidden_dims=(8,))
    encoder = GRUEncoder(2, 4, 8)
    control = ControlNet(2, 2, 4, (8,), covariance="diagonal")
    _randomize(drift, diffusion, encoder, control)
    init = dist.Normal(torch.zeros(2), 1.0).to_event(1)

    def model(data):
        with pyro.plate("series", data.num_series):
            x = pyro.sample("x", EulerMaruyama(drift, diffusion, init, data.times))
            pyro.sample("y", dist.Normal(x, 0.2).mask(data.mask).to_event(2), obs=data.values)

    def per_series_elbo(guide, data, path=None):
        guide_trace = poutine.trace(guide).get_trace(data)
        path = guide_trace.nodes["x"]["value"] if path is None else path
        log_q = guide_trace.nodes["x"]["fn"].log_prob(path)
        model_trace = poutine.trace(poutine.condition(model, data={"x": path})).get_trace(data)
        model_trace.compute_log_prob()
        log_p = model_trace.nodes["x"]["log_prob"] + model_trace.nodes["y"]["log_prob"]
        return log_p - log_q, path

    together = GirsanovGuide(model, control=control, encoder=encoder)
    together(batch)
    _randomize(together.x0_heads)
    elbos, paths = per_series_elbo(together, batch)
    assert elbos.shape == (3,)
    for i in range(3):
        alone = GriddedSeries.from_series([TIMES[i]], [values[i]], **options)
        guide = GirsanovGuide(model, control=control, encoder=encoder)
        guide(alone)
        guide.x0_heads.load_state_dict(together.x0_heads.state_dict())
        elbo, _ = per_series_elbo(guide, alone, paths[i : i + 1].detach())
        torch.testing.assert_close(elbo, elbos[i : i + 1].detach(), rtol=1e-5, atol=1e-4)
