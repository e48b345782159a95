"""ArviZ conversion (:func:`to_inference_data`) and the importance-sampling check of a guide.

Layouts (groups, dims, coords, shapes) are checked on three fits: a single path, a plate of
series with a grid per series and masked observations, and a two-chain NUTS run. Values are
checked against independent computations: pointwise log-likelihoods and ``lp`` against
densities written here with :mod:`torch.distributions` and the hand-written path density of
``conftest.py``; the importance-sampling summary against the exact Gaussian reference of
``tests/reference.py`` (``log p(y)`` and the mean-shift gap).
"""

import math
import os
import pathlib
import subprocess
import sys

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import xarray as xr
from conftest import path_log_density
from pyro.infer import MCMC, NUTS
from reference import LinearGaussianPath, init_posterior, step_noise_regressions

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.analysis import (
    from_netcdf,
    loo,
    pareto_khat,
    plot_ppc,
    plot_trace,
    summary,
    to_inference_data,
    to_netcdf,
    variational_diagnostics,
)
from pyro_nsde.analysis.arviz_adapter import group_names

SIGMA, NOISE = 0.7, 0.3


def ou_drift(theta):
    return lambda t, x: -theta[..., None] * x


# ----------------------------------------------------------------------------- (a) one path

TIMES = torch.linspace(0.0, 1.0, 9)
OBS_STEPS = torch.tensor([2, 4, 6, 8])
Y_SINGLE = torch.tensor([0.4, -0.2, 0.3, 0.1])


def single_path_model(y=None):
    """One path, no plate."""
    theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
    init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
    x = pyro.sample("x", EulerMaruyama(ou_drift(theta), torch.tensor([SIGMA]), init, TIMES))
    pyro.sample("y", dist.Normal(x[..., OBS_STEPS, 0], NOISE).to_event(1), obs=y)


@pytest.fixture
def single_path_fit():
    guide = GirsanovGuide(single_path_model, control="affine")
    guide(Y_SINGLE)
    idata = to_inference_data(
        single_path_model,
        guide=guide,
        model_args=(Y_SINGLE,),
        num_samples=150,
        num_chains=2,
        importance_resampling=False,  # the guide's own draws and their weights
    )
    return guide, idata


def test_single_path_layout(single_path_fit):
    _, idata = single_path_fit
    assert set(group_names(idata)) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
    }
    x = idata.posterior["x"]
    assert x.dims == ("chain", "draw", "time", "state")
    assert x.shape == (2, 150, 9, 1)
    np.testing.assert_allclose(x["time"].values, TIMES.numpy())
    assert idata.posterior["theta"].dims == ("chain", "draw")
    assert idata.observed_data["y"].dims == ("y_dim_0",)
    np.testing.assert_array_equal(idata.observed_data["y"].values, Y_SINGLE.numpy())
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "y_dim_0")
    assert idata.log_likelihood["y"].shape == (2, 150, 4)
    assert idata.sample_stats["lp"].shape == (2, 150)


def test_pointwise_log_likelihood_and_lp_match_hand_written_densities(single_path_fit):
    _, idata = single_path_fit
    theta = torch.as_tensor(idata.posterior["theta"].values).reshape(-1).double()
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 9, 1).double()
    y = Y_SINGLE.double()
    log_lik = torch.distributions.Normal(x[:, OBS_STEPS, 0], NOISE).log_prob(y)
    got = torch.as_tensor(idata.log_likelihood["y"].values).reshape(-1, 4).double()
    torch.testing.assert_close(got, log_lik, atol=1e-4, rtol=1e-4)

    init = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(1, dtype=torch.float64), 1.0), 1
    )
    path = path_log_density(
        x,
        lambda t, z: -theta[:, None] * z,
        torch.tensor([SIGMA], dtype=torch.float64),
        "diagonal",
        init,
        TIMES.double(),
    )
    prior = torch.distributions.LogNormal(0.0, 0.5).log_prob(theta)
    lp = torch.as_tensor(idata.sample_stats["lp"].values).reshape(-1).double()
    torch.testing.assert_close(lp, prior + path + log_lik.sum(-1), atol=2e-3, rtol=1e-4)


def test_posterior_predictive_redraws_observations_around_the_path(single_path_fit):
    _, idata = single_path_fit
    x = idata.posterior["x"].values[..., OBS_STEPS.numpy(), 0]
    residual = (idata.posterior_predictive["y"].values - x).reshape(-1)
    assert abs(residual.mean()) < 4 * NOISE / math.sqrt(residual.size)
    assert abs(residual.std() / NOISE - 1) < 0.1


def test_guide_weights_and_their_summary_are_in_sample_stats(single_path_fit):
    _, idata = single_path_fit
    stats = idata.sample_stats
    log_weight = stats["log_weight"].values.reshape(-1).astype(float)
    assert stats.attrs["num_draws"] == 300
    assert stats.attrs["elbo"] == pytest.approx(log_weight.mean(), rel=1e-5)
    log_mean = np.logaddexp.reduce(log_weight) - math.log(log_weight.size)
    assert stats.attrs["log_evidence"] == pytest.approx(log_mean, rel=1e-5)
    assert np.isfinite(stats.attrs["pareto_k"])


def test_user_dims_and_coords_override_defaults(single_path_fit):
    guide, _ = single_path_fit
    obs_times = TIMES[OBS_STEPS].numpy()
    idata = to_inference_data(
        single_path_model,
        guide=guide,
        model_args=(Y_SINGLE,),
        num_samples=10,
        dims={"y": ["obs_time"]},
        coords={"obs_time": obs_times, "state": ["level"]},
    )
    assert idata.observed_data["y"].dims == ("obs_time",)
    np.testing.assert_allclose(idata.log_likelihood["obs_time"].values, obs_times)
    assert list(idata.posterior["state"].values) == ["level"]
    with pytest.raises(ValueError, match=r"dims\['y'\] must name the 1 dims"):
        to_inference_data(
            single_path_model, guide=guide, model_args=(Y_SINGLE,), num_samples=10,
            dims={"y": ["a", "b"]},
        )  # fmt: skip


def test_prior_group_draws_from_the_model():
    idata = to_inference_data(
        single_path_model, model_args=(Y_SINGLE,), num_samples=2000, prior=True
    )
    assert set(group_names(idata)) == {"prior", "prior_predictive", "observed_data"}
    log_theta = np.log(idata.prior["theta"].values.reshape(-1))
    assert abs(log_theta.mean()) < 4 * 0.5 / math.sqrt(2000)
    assert abs(log_theta.std() / 0.5 - 1) < 0.06
    assert idata.prior["x"].dims == ("chain", "draw", "time", "state")
    assert idata.prior_predictive["y"].shape == (1, 2000, 4)


def test_invalid_arguments_are_rejected(single_path_fit):
    guide, _ = single_path_fit
    with pytest.raises(ValueError, match="exactly one of guide= and mcmc="):
        to_inference_data(single_path_model, model_args=(Y_SINGLE,))
    with pytest.raises(ValueError, match="exactly one of guide= and mcmc="):
        to_inference_data(single_path_model, guide=guide, mcmc=object(), model_args=(Y_SINGLE,))
    with pytest.raises(ValueError, match="container must be one of"):
        to_inference_data(single_path_model, guide=guide, model_args=(Y_SINGLE,), container="x")
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        to_inference_data(single_path_model, guide=guide, model_args=(Y_SINGLE,), num_samples=0)


def test_subsampled_plates_are_rejected():
    def model():
        with pyro.plate("series", 4, subsample_size=2):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="plate 'series' is subsampled"):
        to_inference_data(model, prior=True, num_samples=5)


# ----------------------------------------------------------------------------- (b) series

N_SERIES = 3
SERIES_TIMES = torch.stack([torch.linspace(0.0, 1.0, 9) * s for s in (1.0, 1.5, 2.0)])
SERIES_OBS = torch.tensor([2, 4, 6, 8])
MASK = torch.tensor(
    [[True, True, False, True], [True, True, True, True], [False, True, True, True]]
)
Y_SERIES = torch.tensor([[0.4, -0.2, 9.9, 0.1], [0.0, 0.3, 0.2, -0.1], [9.9, 0.5, 0.4, 0.2]])


def series_model(y=None):
    """Three series with their own grids; two observations masked out (their data are junk)."""
    theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
    with pyro.plate("series", N_SERIES, dim=-1):
        init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
        prior = EulerMaruyama(ou_drift(theta), torch.tensor([SIGMA]), init, SERIES_TIMES)
        x = pyro.sample("x", prior)
        pyro.deterministic("x_end", x[..., -1, 0])
        likelihood = dist.Normal(x[..., SERIES_OBS, 0], NOISE).mask(MASK).to_event(1)
        pyro.sample("y", likelihood, obs=y)


@pytest.fixture
def series_guide():
    guide = GirsanovGuide(series_model, control="affine")
    guide(Y_SERIES)
    return guide


@pytest.fixture
def series_idata(series_guide):
    return to_inference_data(
        series_model, guide=series_guide, model_args=(Y_SERIES,), num_samples=100, num_chains=2
    )


def test_plate_of_series_layout_with_a_grid_per_series(series_idata):
    x = series_idata.posterior["x"]
    assert x.dims == ("chain", "draw", "series", "time", "state")
    assert x.shape == (2, 100, 3, 9, 1)
    np.testing.assert_array_equal(x["time"].values, np.arange(9))
    grid = x["time_value"]
    assert grid.dims == ("series", "time")
    np.testing.assert_allclose(grid.values, SERIES_TIMES.numpy())
    assert series_idata.posterior["x_end"].dims == ("chain", "draw", "series")
    np.testing.assert_array_equal(series_idata.posterior["x_end"].values, x.values[..., -1, 0])


def test_masked_observations_are_left_out(series_idata):
    observed = series_idata.observed_data["y"]
    assert observed.dims == ("y_obs",)
    np.testing.assert_array_equal(observed.values, Y_SERIES[MASK].numpy())
    series_index, obs_index = MASK.nonzero(as_tuple=True)
    np.testing.assert_array_equal(observed["y_obs_series"].values, series_index.numpy())
    np.testing.assert_array_equal(observed["y_obs_y_dim_1"].values, obs_index.numpy())
    assert series_idata.log_likelihood["y"].dims == ("chain", "draw", "y_obs")
    assert series_idata.posterior_predictive["y"].shape == (2, 100, int(MASK.sum()))

    x = torch.as_tensor(series_idata.posterior["x"].values)[..., SERIES_OBS, 0]
    expected = torch.distributions.Normal(x, NOISE).log_prob(Y_SERIES)[..., MASK]
    got = torch.as_tensor(series_idata.log_likelihood["y"].values)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_summary_and_loo_run_on_the_result(series_idata):
    table = summary(series_idata, var_names=["theta", "x_end"])
    assert list(table.index) == ["theta", "x_end[0]", "x_end[1]", "x_end[2]"]
    theta = series_idata.posterior["theta"].values
    assert table.loc["theta", "mean"] == pytest.approx(theta.mean(), rel=1e-6)
    result = loo(series_idata)
    assert np.isfinite(result.elpd)
    assert result.pareto_k.shape == (int(MASK.sum()),)
    log_lik = series_idata.log_likelihood["y"].values.reshape(-1, int(MASK.sum()))
    lppd = np.logaddexp.reduce(log_lik, axis=0) - math.log(log_lik.shape[0])
    assert result.p == pytest.approx(lppd.sum() - result.elpd, abs=1e-4)


def test_netcdf_round_trip_keeps_groups_coords_and_attrs(series_idata, tmp_path):
    loaded = from_netcdf(to_netcdf(series_idata, tmp_path / "fit.nc"))
    assert set(group_names(loaded)) == set(group_names(series_idata))
    for group in group_names(series_idata):
        xr.testing.assert_identical(loaded[group], series_idata[group])
    assert loaded.sample_stats.attrs["pareto_k"] == series_idata.sample_stats.attrs["pareto_k"]


def test_datatree_container_works_with_arviz_base_and_stats(series_guide, tmp_path):
    arviz_stats = pytest.importorskip("arviz_stats")
    tree = to_inference_data(
        series_model,
        guide=series_guide,
        model_args=(Y_SERIES,),
        num_samples=60,
        num_chains=2,
        container="DataTree",
    )
    assert isinstance(tree, xr.DataTree)
    assert set(tree.children) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
    }
    x = tree["posterior"]["x"]
    assert x.dims == ("chain", "draw", "series", "time", "state")
    np.testing.assert_allclose(tree["posterior"]["time_value"].values, SERIES_TIMES.numpy())
    assert tree["observed_data"]["y"].dims == ("y_obs",)
    assert math.isfinite(tree["sample_stats"].attrs["elbo"])
    summary = arviz_stats.summary(tree, var_names=["theta"])
    assert summary.loc["theta", "mean"] == pytest.approx(
        float(tree["posterior"]["theta"].mean()), abs=0.01
    )
    assert np.isfinite(arviz_stats.loo(tree).elpd)
    tree.to_netcdf(tmp_path / "tree.nc")
    loaded = xr.open_datatree(tmp_path / "tree.nc")
    xr.testing.assert_identical(loaded["posterior"].to_dataset(), tree["posterior"].to_dataset())


# ----------------------------------------------------------------------------- (c) NUTS

MCMC_TIMES = torch.linspace(0.0, 1.0, 5)
Y_MCMC = torch.tensor([0.3, -0.1, 0.2, 0.4])


def small_model(y=None):
    theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
    init = dist.Normal(torch.zeros(1), 1.0).to_event(1)
    x = pyro.sample("x", EulerMaruyama(ou_drift(theta), torch.tensor([SIGMA]), init, MCMC_TIMES))
    pyro.sample("y", dist.Normal(x[..., 1:, 0], NOISE).to_event(1), obs=y)


@pytest.fixture(scope="module")
def nuts_run():
    pyro.set_rng_seed(1)
    # Draw the two chains one after the other in this process (no worker processes).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pyro.infer.mcmc.api.mp.cpu_count", lambda: 1)
        with pytest.warns(UserWarning, match="Chains will be drawn sequentially"):
            mcmc = MCMC(
                NUTS(small_model, max_tree_depth=3),
                num_samples=15,
                warmup_steps=15,
                num_chains=2,
                disable_progbar=True,
            )
        mcmc.run(Y_MCMC)
    return mcmc, to_inference_data(small_model, mcmc=mcmc, model_args=(Y_MCMC,))


def test_mcmc_chains_are_kept(nuts_run):
    mcmc, idata = nuts_run
    samples = mcmc.get_samples(group_by_chain=True)
    x = idata.posterior["x"]
    assert x.dims == ("chain", "draw", "time", "state")
    assert x.shape == (2, 15, 5, 1)
    np.testing.assert_array_equal(x.values, samples["x"].numpy())
    np.testing.assert_array_equal(idata.posterior["theta"].values, samples["theta"].numpy())
    diverging = idata.sample_stats["diverging"]
    assert diverging.dtype == bool and diverging.shape == (2, 15)
    divergences = mcmc.diagnostics()["divergences"]
    assert int(diverging.sum()) == sum(len(v) for v in divergences.values())
    assert idata.log_likelihood["y"].shape == (2, 15, 4)


def test_arviz_summary_and_plots_run_on_an_mcmc_result(nuts_run):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, idata = nuts_run
    table = summary(idata, kind="all")
    assert set(table.index) >= {"theta", "x[0.0, 0]", "x[1.0, 0]"}
    assert np.isfinite(table.loc["theta", "r_hat"])
    figure = plot_trace(idata, var_names=["theta", "x"])
    assert len(figure.axes) == 4  # a density and a trace panel per variable
    figure = plot_ppc(idata, num_samples=10)
    assert any("y" in ax.get_xlabel() or "y" in ax.get_title() for ax in figure.axes)
    plt.close("all")


def test_the_installed_arviz_runs_on_the_result_directly(nuts_run):
    """ArviZ's own functions, as a user calls them: ArviZ 1.x names the LOO estimate ``elpd``
    (0.x: ``elpd_loo``) and the density-overlay predictive check ``plot_ppc_dist``."""
    matplotlib.use("Agg")
    import arviz as az
    import matplotlib.pyplot as plt

    _, idata = nuts_run
    assert "theta" in az.summary(idata, var_names=["theta"]).index
    result = az.loo(idata)
    elpd = result.elpd_loo if hasattr(result, "elpd_loo") else result.elpd
    assert np.isfinite(elpd)
    az.plot_trace(idata, var_names=["theta"])
    if hasattr(az, "plot_ppc"):
        az.plot_ppc(idata, num_pp_samples=10)
    else:
        az.plot_ppc_dist(idata, num_samples=10)
    plt.close("all")


# ----------------------------------------------------------------------------- Pareto k-hat


@pytest.mark.parametrize("k", [0.3, 0.8])
def test_pareto_khat_recovers_the_tail_index_of_pareto_weights(k):
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(20000, generator=generator, dtype=torch.float64)
    log_weights = -k * uniform.log()  # w = U^{-k} has P(w > t) = t^{-1/k}
    assert pareto_khat(log_weights) == pytest.approx(k, abs=0.1)


def test_pareto_khat_flags_degenerate_and_too_few_weights():
    degenerate = torch.zeros(1000, dtype=torch.float64)
    degenerate[:3] = 100.0
    degenerate[3:] = torch.linspace(-300, -200, 997)
    assert pareto_khat(degenerate) == math.inf
    assert math.isnan(pareto_khat(torch.randn(40)))
    with pytest.raises(ValueError, match="log_weights must be finite"):
        pareto_khat(torch.tensor([0.0, math.inf]))


# ----------------------------------------------------------------------------- variational fit


def optimal_affine_guide(covariance, num_steps, noise, end_time=2.0):
    """``dX = -X dt + 0.7 dW`` on ``[0, end_time]`` observed every 0.25 as ``y_j = sin(3 t_j)``
    with noise ``noise``, and the best affine guide of its family set from the exact posterior
    (no training): exact for ``"full"``, the best mean shift for ``"prior"``."""
    times = torch.linspace(0.0, end_time, num_steps + 1, dtype=torch.float64)
    obs_times = torch.arange(1, round(end_time / 0.25) + 1, dtype=torch.float64) * 0.25
    obs = (obs_times * num_steps / end_time).round().long()
    y = torch.sin(3 * obs_times)
    diffusion = torch.tensor([SIGMA], dtype=torch.float64)
    init = dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0).to_event(1)

    def model(y=None):
        x = pyro.sample("x", EulerMaruyama(lambda t, x: -x, diffusion, init, times))
        pyro.sample("y", dist.Normal(x[..., obs, 0], noise).to_event(1), obs=y)

    reference = LinearGaussianPath([[-1.0]], [0.0], [[SIGMA]], [0.0], [[1.0]], times)
    posterior = reference.observe([[1.0]], obs.tolist(), [[noise**2]], y)
    # init_path="prior": the coefficients set below are the control itself.
    guide = GirsanovGuide(model, control="affine", covariance=covariance, init_path="prior")
    guide(y)
    loc, gain, step_cov = step_noise_regressions(posterior)
    guide.controls.x.loc = loc
    guide.controls.x.gain = gain
    if covariance == "full":
        guide.controls.x.scale = torch.linalg.cholesky(step_cov)
    mean0, cov0 = init_posterior(posterior)
    guide.x0_locs.x = mean0
    full = covariance == "full"  # then q(x_0) is a full-rank normal
    guide.x0_scales.x = torch.linalg.cholesky(cov0) if full else cov0.diagonal().sqrt()
    return model, guide, y, posterior


def test_exact_guide_has_constant_weights_equal_to_the_evidence():
    model, guide, y, posterior = optimal_affine_guide("full", 20, noise=0.1)
    check = variational_diagnostics(model, guide, model_args=(y,), num_draws=1000)
    assert check.elbo == pytest.approx(posterior.log_py, abs=1e-6)
    assert check.log_evidence == pytest.approx(posterior.log_py, abs=1e-6)
    assert check.ess == pytest.approx(1000, rel=1e-6)
    assert check.pareto_k < 0.5


def test_default_affine_guide_starts_at_the_exact_posterior():
    """Untrained, the default affine guide (Laplace initialization, Kalman-conditional path)
    of a linear-Gaussian SDE with precise observations on a coarse grid is already the exact
    posterior: every importance weight equals ``p(y)``."""
    model, _, y, posterior = optimal_affine_guide("full", 10, noise=0.1)
    pyro.clear_param_store()  # the same parameter names as the guide set up above
    guide = GirsanovGuide(model, control="affine", covariance="full")
    check = variational_diagnostics(model, guide, model_args=(y,), num_draws=1000)
    assert check.elbo == pytest.approx(posterior.log_py, abs=1e-6)
    assert check.ess == pytest.approx(1000, rel=1e-6)


def test_mean_shift_guide_on_a_coarse_grid_is_flagged():
    """With precise observations and a coarse grid the posterior steps are much narrower than
    the prior's, which a mean shift cannot express: the ELBO sits ``mean_shift_gap`` below
    ``log p(y)`` and the weights are heavy-tailed."""
    model, guide, y, posterior = optimal_affine_guide("prior", 10, noise=0.1)
    check = variational_diagnostics(model, guide, model_args=(y,), num_draws=2000)
    gap = posterior.mean_shift_gap()
    assert gap > 10
    assert check.elbo == pytest.approx(posterior.log_py - gap, abs=4 * check.elbo_stderr)
    assert check.pareto_k > 0.7
    assert check.ess < 0.05 * check.num_draws


# ----------------------------------------------------------------------------- tutorial


def test_tutorial_runs_in_fast_mode(tmp_path):
    script = pathlib.Path(__file__).parents[1] / "tutorials" / "arviz_diagnostics.py"
    env = {**os.environ, "PYRO_NSDE_FAST": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("ppc.png", "path_bands.png", "forecast.png", "elbo.png", "posterior.nc"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Pareto k-hat" in result.stdout and "elpd_loo" in result.stdout


def test_guide_draws_that_diverge_are_left_out_and_replaced():
    """A cubic drift with a rate drawn from a wide guide: the draws whose Euler–Maruyama chain
    blows up (rate × 4 × h past 2) have no finite weight; they are left out, with a warning,
    and replaced by finite ones, so that every weight and every path is finite."""
    from pyro_nsde.analysis.draws import guide_draws

    times = torch.linspace(0.0, 2.0, 21)

    def model(y):
        rate = pyro.sample("rate", dist.LogNormal(0.0, 1.0))
        init = dist.Normal(torch.full((1,), 2.0), 0.01).to_event(1)
        drift = lambda t, x: -rate[..., None] * x**3  # noqa: E731
        x = pyro.sample("x", EulerMaruyama(drift, torch.tensor([0.3]), init, times))
        pyro.sample("y", dist.Normal(x[..., -1, 0], 0.5), obs=y)

    def guide(y):
        rate = pyro.sample("rate", dist.LogNormal(0.5, 1.0))
        init = dist.Normal(torch.full((1,), 2.0), 0.01).to_event(1)
        drift = lambda t, x: -rate[..., None] * x**3  # noqa: E731
        pyro.sample("x", EulerMaruyama(drift, torch.tensor([0.3]), init, times))

    pyro.set_rng_seed(0)
    with pytest.warns(RuntimeWarning, match="were left out and replaced"):
        draws = guide_draws(model, guide, (torch.tensor(0.2),), {}, 400)
    assert draws.log_weights.shape == (400,) and torch.isfinite(draws.log_weights).all()
    paths = draws.trace.nodes["x"]["value"]
    assert paths.shape[0] == 400 and torch.isfinite(paths).all()
    assert torch.isfinite(draws.sample_stats["lp"]).all()
