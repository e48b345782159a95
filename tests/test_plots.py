"""Plots of paths, forecasts and ELBO traces, rendered to PNG with the Agg backend.

The fit is a damped oscillator (position and velocity, noise on the velocity only) for two
series, observed in position: two state rows, two series columns, observations with NaN for
the unobserved velocity. What is drawn is checked against the data it should show (posterior
means, HDIs written out here, the grid, the forecast times).
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.analysis import to_inference_data
from pyro_nsde.analysis.arviz_adapter import group
from pyro_nsde.analysis.forecast import forecast
from pyro_nsde.analysis.plots import hdi, plot_elbo, plot_forecast, plot_path_bands

TIMES = torch.linspace(0.0, 3.0, 25)
OBS_STEPS = torch.arange(3, 25, 3)
DIFFUSION = torch.tensor([[0.0], [0.4]])
Y = torch.stack([torch.cos(2 * TIMES[OBS_STEPS]), 0.5 * torch.sin(2 * TIMES[OBS_STEPS])])


def oscillator(y=None):
    damping = pyro.sample("damping", dist.LogNormal(-1.0, 0.3))

    def drift(t, x):
        position, velocity = x[..., 0], x[..., 1]
        acceleration = -4.0 * position - damping * velocity
        return torch.stack(torch.broadcast_tensors(velocity, acceleration), -1)

    with pyro.plate("series", 2, dim=-1):
        init = dist.Normal(torch.tensor([1.0, 0.0]), 0.3).to_event(1)
        prior = EulerMaruyama(drift, DIFFUSION, init, TIMES, noise_type="general")
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x[..., OBS_STEPS, 0], 0.1).to_event(1), obs=y)


@pytest.fixture(scope="module")
def fit():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    # From the prior (not the Laplace fit), so that the ELBO history has a transient to hide.
    guide = GirsanovGuide(oscillator, control="affine", init_path="prior")
    svi = SVI(oscillator, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(Y) for _ in range(100)]
    idata = to_inference_data(oscillator, guide=guide, model_args=(Y,), num_samples=200)
    future = torch.linspace(3.1, 5.0, 20)
    paths = forecast(oscillator, idata, future, model_args=(Y,))
    yield losses, idata, paths
    pyro.clear_param_store()


def observations():
    values = np.full((2, len(OBS_STEPS), 2), np.nan)
    values[..., 0] = Y.numpy()
    return TIMES[OBS_STEPS].numpy(), values


def test_hdi_is_the_narrowest_interval():
    generator = np.random.default_rng(0)
    normal = generator.standard_normal((20000, 2)) * np.array([1.0, 3.0])
    lower, upper = hdi(normal, 0.9)
    np.testing.assert_allclose(upper, [1.645, 3 * 1.645], rtol=0.04)
    np.testing.assert_allclose(lower, -upper, rtol=0.06)
    # For Exp(1) the HDI starts at 0 (an equal-tailed interval would start at 0.05).
    lower, upper = hdi(generator.exponential(size=20000), 0.9)
    assert lower < 0.005
    assert upper == pytest.approx(np.log(10), rel=0.04)
    with pytest.raises(ValueError, match=r"prob must be in \(0, 1\)"):
        hdi(normal, 1.0)


def test_path_bands_show_the_posterior_per_state_and_series(fit, tmp_path):
    _, idata, _ = fit
    fig, axes = plot_path_bands(idata, observations=observations())
    assert axes.shape == (2, 2)
    x = idata.posterior["x"]
    for series in range(2):
        for state in range(2):
            ax = axes[state, series]
            mean_line = next(line for line in ax.lines if line.get_label() == "posterior mean")
            np.testing.assert_allclose(mean_line.get_xdata(), TIMES.numpy())
            expected = x.isel(series=series, state=state).mean(("chain", "draw")).values
            np.testing.assert_allclose(mean_line.get_ydata(), expected, rtol=1e-5, atol=1e-6)
            bands = [c for c in ax.collections if "HDI" in c.get_label()]
            assert [c.get_label() for c in bands] == ["posterior 90% HDI", "posterior 50% HDI"]
            draws = x.isel(series=series, state=state).values.reshape(-1, len(TIMES))
            lower, upper = hdi(draws, 0.9)
            vertices = bands[0].get_paths()[0].vertices[:, 1]
            assert vertices.min() == pytest.approx(lower.min(), abs=1e-5)
            assert vertices.max() == pytest.approx(upper.max(), abs=1e-5)
            data = [line for line in ax.lines if line.get_label() == "data"]
            assert len(data[0].get_xdata()) == (len(OBS_STEPS) if state == 0 else 0)
        assert axes[0, series].get_title() == f"series={series}"
    assert axes[1, 0].get_ylabel() == "state=1"
    fig.savefig(tmp_path / "path_bands.png", dpi=80)
    assert (tmp_path / "path_bands.png").stat().st_size > 10_000
    plt.close(fig)


def test_forecast_fan_starts_at_the_last_grid_time(fit, tmp_path):
    _, idata, paths = fit
    fig, axes = plot_forecast(idata, paths, observations=observations())
    for ax in axes.ravel():
        fan = next(line for line in ax.lines if line.get_label() == "forecast mean")
        times = fan.get_xdata()
        assert times[0] == pytest.approx(3.0) and times[-1] == pytest.approx(5.0)
        assert len(times) == 21
        vertical = [line for line in ax.lines if list(line.get_xdata()) == [3.0, 3.0]]
        assert len(vertical) == 1
    fig.savefig(tmp_path / "forecast.png", dpi=80)
    plt.close(fig)


def test_elbo_plot_shows_each_run_and_hides_the_transient(fit, tmp_path):
    losses, _, _ = fit
    runs = {"affine": losses, "shifted": [loss + 3.0 for loss in losses]}
    fig, ax = plot_elbo(runs, reference=-10.0, reference_label="log p(y)")
    raw = [line for line in ax.lines if line.get_label().startswith("_")]
    np.testing.assert_allclose(raw[0].get_ydata(), -np.asarray(losses))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "affine",
        "shifted",
        "log p(y) -10.00",
    ]
    assert ax.get_ylim()[0] > -max(losses)
    fig.savefig(tmp_path / "elbo.png", dpi=80)
    plt.close(fig)


def test_path_plots_accept_a_datatree(fit):
    _, idata, _ = fit
    import xarray as xr

    tree = xr.DataTree.from_dict({"posterior": group(idata, "posterior")})
    fig, axes = plot_path_bands(tree, "x", series=[1])
    assert axes.shape == (2, 1)
    assert axes[0, 0].get_title() == "series=1"
    plt.close(fig)


def test_plot_arguments_are_checked(fit):
    _, idata, _ = fit
    with pytest.raises(ValueError, match="var_name 'z' is not a variable"):
        plot_path_bands(idata, "z")
    with pytest.raises(ValueError, match=r"observation values must have shape \(\*series, n, 2\)"):
        plot_path_bands(idata, observations=(TIMES[OBS_STEPS].numpy(), Y.numpy()))
    with pytest.raises(ValueError, match="observation values have 3 series"):
        plot_path_bands(idata, observations=(TIMES[:4].numpy(), np.zeros((3, 4, 2))))
    plt.close("all")
