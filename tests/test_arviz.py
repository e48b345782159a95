"""The adapter over the two ArviZ lines (``pyro_nsde.analysis.arviz_adapter``), on whichever line
is installed.

Every test runs on ArviZ 0.x and on ArviZ ≥ 1. Tests over containers take every container the
installed line can build: ``InferenceData`` and ``DataTree`` with ArviZ 0.x and ``arviz-base``,
``DataTree`` with ArviZ ≥ 1. Results are checked against numpy: summary statistics, the HDI's
coverage, and PSIS-LOO against plain importance-sampling LOO on light-tailed weights.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr
from scipy.special import logsumexp
from scipy.stats import norm

from pyro_nsde.analysis import arviz_adapter as _arviz
from pyro_nsde.analysis.arviz_adapter import (
    build,
    check_container,
    default_container,
    from_datasets,
    from_netcdf,
    group,
    group_names,
    loo,
    loo_pit,
    plot_ppc,
    plot_trace,
    summary,
    to_netcdf,
    update_group,
)

ARVIZ_0 = _arviz.arviz_major() == 0
CONTAINERS = ["InferenceData", "DataTree"] if ARVIZ_0 else ["DataTree"]
CHAINS, DRAWS, N = 2, 1000, 6
Y = np.linspace(-1.0, 1.0, N)


def groups(seed=0):
    """A normal-mean posterior ``mu ~ N(0.1, 0.2²)`` and paths ``x`` ``(3 times, 2 states)``;
    ``y_i ~ N(mu, 1)``: a log-likelihood whose importance weights are light-tailed."""
    rng = np.random.default_rng(seed)
    mu = 0.1 + 0.2 * rng.standard_normal((CHAINS, DRAWS))
    x = rng.standard_normal((CHAINS, DRAWS, 3, 2))
    log_lik = -0.5 * (Y - mu[..., None]) ** 2 - 0.5 * np.log(2 * np.pi)
    predictive = mu[..., None] + rng.standard_normal((CHAINS, DRAWS, N))
    return {
        "posterior": {"mu": mu, "x": x},
        "posterior_predictive": {"y": predictive},
        "observed_data": {"y": Y},
        "log_likelihood": {"y": log_lik},
    }


LAYOUT = {
    "coords": {"time": [0.0, 0.5, 1.0], "state": ["a", "b"]},
    "dims": {"x": ["time", "state"], "y": ["obs"]},
}


@pytest.fixture(params=CONTAINERS)
def data(request):
    return build(groups(), **LAYOUT, container=request.param)


def test_containers_follow_the_arviz_line():
    assert default_container("0.23.4") == "InferenceData"
    assert default_container("1.3.0") == "DataTree"
    assert check_container(None) == ("InferenceData" if ARVIZ_0 else "DataTree")
    with pytest.raises(ValueError, match="container must be one of"):
        check_container("Zarr")


def test_inference_data_is_built_only_with_arviz_0():
    if ARVIZ_0:
        assert type(build(groups(), **LAYOUT, container="InferenceData")).__name__ == (
            "InferenceData"
        )
    else:
        with pytest.raises(ValueError, match=r"container='InferenceData' needs ArviZ 0\.x"):
            build(groups(), **LAYOUT, container="InferenceData")


def test_groups_hold_the_arrays_with_their_dims(data):
    assert set(group_names(data)) == {
        "posterior",
        "posterior_predictive",
        "observed_data",
        "log_likelihood",
    }
    posterior = group(data, "posterior")
    assert isinstance(posterior, xr.Dataset)
    assert posterior["x"].dims == ("chain", "draw", "time", "state")
    np.testing.assert_array_equal(posterior["x"].values, groups()["posterior"]["x"])
    assert group(data, "observed_data")["y"].dims == ("obs",)
    with pytest.raises(ValueError, match="has no 'prior' group"):
        group(data, "prior")
    with pytest.raises(TypeError, match=r"expected an arviz\.InferenceData or an xarray\.DataTree"):
        group({"posterior": posterior}, "posterior")


def test_update_group_assigns_coords_and_attrs_to_one_group(data):
    time = group(data, "posterior")["time"] + 1900.0
    data = update_group(data, "posterior", coords={"time": time}, attrs={"unit": "year"})
    posterior = group(data, "posterior")
    np.testing.assert_allclose(posterior["time"].values, [1900.0, 1900.5, 1901.0])
    assert posterior.attrs["unit"] == "year"
    assert "unit" not in group(data, "log_likelihood").attrs


def test_from_datasets_builds_the_installed_lines_container():
    dataset = xr.Dataset({"z": (("chain", "draw"), np.zeros((1, 4)))})
    data = from_datasets({"posterior": dataset})
    assert type(data).__name__ == default_container()
    assert group_names(data) == ["posterior"]


def test_summary_has_the_same_columns_and_numpy_values_on_both_lines(data):
    table = summary(data, var_names=["mu", "x"], hdi_prob=0.9)
    assert list(table.columns) == ["mean", "sd", "hdi_5%", "hdi_95%"]
    assert list(table.index[:3]) == ["mu", "x[0.0, a]", "x[0.0, b]"]
    mu = groups()["posterior"]["mu"].reshape(-1)
    assert table.loc["mu", "mean"] == pytest.approx(mu.mean(), rel=1e-12)
    assert table.loc["mu", "sd"] == pytest.approx(mu.std(ddof=1), rel=1e-12)
    lower, upper = table.loc["mu", "hdi_5%"], table.loc["mu", "hdi_95%"]
    inside = np.mean((mu >= lower) & (mu <= upper))
    assert inside == pytest.approx(0.9, abs=2 / mu.size)
    central = np.quantile(mu, [0.05, 0.95])
    assert upper - lower <= central[1] - central[0] + 1e-12

    full = summary(data, var_names=["mu"], kind="all")
    assert list(full.columns) == [
        "mean",
        "sd",
        "hdi_3%",
        "hdi_97%",
        "mcse_mean",
        "mcse_sd",
        "ess_bulk",
        "ess_tail",
        "r_hat",
    ]
    assert full.loc["mu", "r_hat"] == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="kind must be 'stats' or 'all'"):
        summary(data, kind="diagnostics")


def test_loo_matches_importance_sampling_loo(data):
    result = loo(data, var_name="y")
    log_lik = groups()["log_likelihood"]["y"].reshape(-1, N)
    # Leave-one-out predictive density by importance sampling with weights 1 / p(y_i | mu_s).
    elpd_is = -logsumexp(-log_lik, axis=0) + np.log(log_lik.shape[0])
    lppd = logsumexp(log_lik, axis=0) - np.log(log_lik.shape[0])
    assert result.elpd == pytest.approx(elpd_is.sum(), abs=0.02)
    assert result.p == pytest.approx(lppd.sum() - result.elpd, abs=1e-6)
    assert result.se == pytest.approx(np.sqrt(N * elpd_is.var()), rel=0.1)
    assert result.pareto_k.shape == (N,) and (result.pareto_k < 0.5).all()
    assert "elpd_loo" in str(result)


@pytest.mark.parametrize("container", CONTAINERS)
def test_loo_pit_is_the_exact_leave_one_out_predictive_cdf(container):
    """``mu``'s posterior ``N(0.1, 0.5²)`` less the observation ``y_i ~ N(mu, 1)`` is
    ``N(m_i, 1/3)``, ``m_i = (0.4 - y_i)/3``: the PIT of ``y_i`` under its leave-one-out
    predictive law is ``Φ((y_i - m_i) / sqrt(4/3))`` (at ``y = 1``: 0.85, where the
    posterior predictive law that has seen ``y_i`` gives 0.79)."""
    rng = np.random.default_rng(1)
    mu = 0.1 + 0.5 * rng.standard_normal((CHAINS, 2 * DRAWS))
    values = {
        "posterior": {"mu": mu},
        "posterior_predictive": {"y": mu[..., None] + rng.standard_normal(mu.shape + (N,))},
        "observed_data": {"y": Y},
        "log_likelihood": {"y": -0.5 * (Y - mu[..., None]) ** 2 - 0.5 * np.log(2 * np.pi)},
    }
    data = build(values, coords={}, dims={"y": ["obs"]}, container=container)
    exact = norm.cdf((Y - (0.4 - Y) / 3) / np.sqrt(4 / 3))
    assert np.abs(loo_pit(data, "y") - exact).max() < 0.025


def test_plots_return_matplotlib_figures(data):
    figure = plot_trace(data, var_names=["mu"])
    assert isinstance(figure, matplotlib.figure.Figure)
    assert len(figure.axes) == 2  # density and trace of mu
    figure = plot_ppc(data, num_samples=10)
    assert isinstance(figure, matplotlib.figure.Figure)
    assert len(figure.axes) >= 1
    plt.close("all")


@pytest.mark.parametrize("reader", CONTAINERS)
def test_netcdf_files_read_back_in_every_container(data, reader, tmp_path):
    data = update_group(data, "posterior", attrs={"pareto_k": 0.25})
    path = to_netcdf(data, tmp_path / "fit.nc")
    loaded = from_netcdf(path, container=reader)
    assert type(loaded).__name__ == reader
    assert set(group_names(loaded)) == set(group_names(data))
    for name in group_names(data):
        written, read = group(data, name), group(loaded, name)
        xr.testing.assert_equal(read, written)
    assert group(loaded, "posterior").attrs["pareto_k"] == 0.25


def test_netcdf_file_is_compressed_hdf5(data, tmp_path):
    import h5py

    path = to_netcdf(data, tmp_path / "fit.nc")
    with h5py.File(path, "r") as file:
        assert file["posterior/x"].compression == "gzip"
        assert set(file) >= {"posterior", "log_likelihood", "observed_data"}
