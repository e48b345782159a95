import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.zoo.encoders import GRUEncoder
from pyro_nsde.zoo.series import GriddedSeries

TIMES = [torch.tensor([0.0, 0.4, 1.0]), torch.tensor([0.1, 0.5, 0.8, 1.0]), torch.tensor([0.3])]


@pytest.fixture(autouse=True)
def _seed():
    pyro.clear_param_store()
    torch.manual_seed(0)


def _data(num_steps=None, max_step=0.1):
    values = [torch.randn(len(t), 2) for t in TIMES]
    if num_steps is None:
        return GriddedSeries.from_series(TIMES, values, max_step=max_step)
    return GriddedSeries.from_series(TIMES, values, num_steps=num_steps)


@pytest.mark.parametrize("num_steps", [None, 12])
def test_context_has_one_vector_per_series_and_grid_point(num_steps):
    data = _data(num_steps)
    context = GRUEncoder(2, 5, 8)(data)
    assert context.shape == (3, data.num_steps + 1, 5)
    batched = GRUEncoder(2, 5, 8).encode(
        data.times, data.values.expand(4, 3, -1, -1), data.mask.expand(4, 3, -1, -1)
    )
    assert batched.shape == (4, 3, data.num_steps + 1, 5)


@pytest.mark.parametrize("skip", [True, False])
def test_context_at_a_point_depends_only_on_observations_there_and_later(skip):
    data = _data()
    encoder = GRUEncoder(2, 4, 8, skip=skip)
    observed = data.observed[1].nonzero().squeeze(-1)
    j = int(observed[1])
    changed = data.values.clone()
    changed[1, j] += 1.0
    before = encoder.encode(data.times, data.values, data.mask)
    after = encoder.encode(data.times, changed, data.mask)
    torch.testing.assert_close(after[1, j + 1 :], before[1, j + 1 :])
    assert (after[1, : j + 1] - before[1, : j + 1]).abs().amax(-1).min() > 0
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]])  # series do not mix


def test_values_at_missing_points_do_not_matter():
    data = _data()
    encoder = GRUEncoder(2, 4, 8)
    noisy = torch.where(data.mask, data.values, torch.randn_like(data.values) * 100)
    torch.testing.assert_close(
        encoder.encode(data.times, noisy, data.mask),
        encoder.encode(data.times, data.values, data.mask),
    )


def test_encoder_sees_only_the_minibatch_inside_a_subsampling_plate():
    data = _data(num_steps=12)
    encoder = GRUEncoder(2, 4, 8, series_from=lambda data, scale: data)
    full = encoder(data, 1.0)
    with pyro.plate("series", 3, subsample_size=2, dim=-1) as index:
        part = encoder(data, scale=1.0)
    assert part.shape == (2, 13, 4)
    torch.testing.assert_close(part, full[index])
    default = GRUEncoder(2, 4, 8)
    full = default(data)
    with pyro.plate("series", 3, subsample_size=2, dim=-1) as index:
        part = default(0.5, data=data)  # found among keyword arguments too
    torch.testing.assert_close(part, full[index])


def test_guide_with_gru_encoder_trains_on_minibatches():
    """Amortized inference under subsampling: the ELBO improves, and the encoder is called
    on the minibatch only."""
    data = _data(num_steps=10)
    batch_sizes = []

    class Recording(GRUEncoder):
        def encode(self, times, values, mask):
            batch_sizes.append(values.shape[0])
            return super().encode(times, values, mask)

    def model(data):
        with pyro.plate("series", data.num_series, subsample_size=2):
            batch = data.subsample()
            init = dist.Normal(torch.zeros(2), 1.0).to_event(1)
            x = pyro.sample("x", EulerMaruyama(lambda t, x: -x, torch.ones(2), init, batch.times))
            pyro.sample("y", dist.Normal(x, 0.1).mask(batch.mask).to_event(2), obs=batch.values)

    guide = GirsanovGuide(
        model, control="mlp", covariance="prior", encoder=Recording(2, 8, 16), hidden_dims=(16,)
    )
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), elbo)
    losses = [svi.step(data) for _ in range(40)]
    assert set(batch_sizes[1:]) == {2}  # the first call (shape probe) may see them all
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_missing_series_argument_names_the_problem():
    with pytest.raises(TypeError, match="GriddedSeries"):
        GRUEncoder(2, 4)(torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match=r"batch \+ \(K\+1, 2\)"):
        GRUEncoder(2, 4).encode(torch.arange(5.0), torch.zeros(3, 5, 3), torch.ones(3, 5, 3))
