"""Checking a latent-SDE fit with ArviZ: summaries, LOO, predictive checks, paths, forecasts.

Three series share the drift of a mean-reverting (Ornstein–Uhlenbeck) process,

    ``θ ~ LogNormal(0, 0.5)``,  ``μ ~ N(0, 1)``,
    ``dX_s = -θ (X_s - μ) dt + σ dW_s``,  ``X_s(0) ~ N(0, 1)``,  ``σ = 0.5``,
    ``y_{s,j} ~ N(X_s(t_j), 0.15²)``  at ``t_j = 0.4, 0.8, ..., 4``,

discretized by Euler–Maruyama on ``K`` steps. The data are simulated from the model with
``θ = 1.5`` and ``μ = 0.8``. The script

1. fits a :class:`~pyro_nsde.GirsanovGuide` (affine control, full increment covariance) by SVI,
2. checks the fit by importance sampling (Pareto ``k̂``, see ``docs/diagnostics.md``),
3. converts it with :func:`~pyro_nsde.to_inference_data` and prints its summary and PSIS-LOO,
4. saves a posterior predictive check, the posterior path bands with the data, a forecast to
   ``t = 6`` and the ELBO history as PNG files, and the posterior as NetCDF.

It runs on both ArviZ lines: ArviZ 0.x (an ``InferenceData``; ``az.summary``, ``az.loo``,
``az.plot_ppc``) and ArviZ 1.x (an ``xarray.DataTree``; ``arviz_stats.summary``,
``arviz_stats.loo``, ``arviz_plots.plot_ppc_dist``), through
:func:`~pyro_nsde.analysis.summary`,
:func:`~pyro_nsde.analysis.loo`, :func:`~pyro_nsde.analysis.plot_ppc` and
:func:`~pyro_nsde.analysis.to_netcdf`, which call whichever is installed.

Run::

    python tutorials/arviz_diagnostics.py --out tutorial_outputs
    PYRO_NSDE_FAST=1 python tutorials/arviz_diagnostics.py   # a quick run (CI)
"""

import argparse
import os
import pathlib

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.analysis import (
    loo,
    plot_ppc,
    summary,
    to_inference_data,
    to_netcdf,
    variational_diagnostics,
)
from pyro_nsde.analysis.forecast import forecast
from pyro_nsde.analysis.plots import plot_elbo, plot_forecast, plot_path_bands

FAST = os.environ.get("PYRO_NSDE_FAST") == "1"
NUM_SERIES, SIGMA, NOISE = 3, 0.5, 0.15
TRUE = {"theta": 1.5, "mu": 0.8}


def make_model(times: torch.Tensor, obs_steps: torch.Tensor):
    """``model(y)``: ``y`` ``(NUM_SERIES, J)`` observations at ``times[obs_steps]``."""

    def model(y=None):
        theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("series", NUM_SERIES, dim=-1):
            init = dist.Normal(torch.zeros(1), 1.0).to_event(1)

            def drift(t, x):
                return -theta[..., None] * (x - mu[..., None])

            x = pyro.sample("x", EulerMaruyama(drift, torch.tensor([SIGMA]), init, times))
            pyro.sample("y", dist.Normal(x[..., obs_steps, 0], NOISE).to_event(1), obs=y)

    return model


def main(out: pathlib.Path):
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(0)
    num_steps, svi_steps, num_samples = (20, 120, 200) if FAST else (80, 2000, 1000)
    times = torch.linspace(0.0, 4.0, num_steps + 1)
    obs_steps = torch.arange(num_steps // 10, num_steps + 1, num_steps // 10)
    model = make_model(times, obs_steps)

    # Simulate the data from the model at the true parameters.
    data = {k: torch.tensor(v) for k, v in TRUE.items()}
    truth = pyro.poutine.trace(pyro.condition(model, data=data)).get_trace()
    true_paths, y = truth.nodes["x"]["value"], truth.nodes["y"]["value"]

    # 1. Fit.
    guide = GirsanovGuide(model, control="affine", covariance="full")
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.05 ** (1 / svi_steps)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=8, vectorize_particles=True))
    losses = [svi.step(y) for _ in range(svi_steps)]

    # 2. Importance-sampling check of the guide against the model.
    check = variational_diagnostics(model, guide, model_args=(y,), num_draws=num_samples)
    print(
        f"Pareto k-hat {check.pareto_k:.2f} (< 0.7: the guide can be trusted), "
        f"ELBO {check.elbo:.2f} ± {check.elbo_stderr:.2f}, "
        f"IS log p(y) {check.log_evidence:.2f}, ESS {check.ess:.0f} of {check.num_draws}"
    )

    # 3. ArviZ: name the observation dim after the observation times.
    obs_times = times[obs_steps].numpy()
    idata = to_inference_data(
        model,
        guide=guide,
        model_args=(y,),
        num_samples=num_samples,
        num_chains=2,
        coords={"obs_time": obs_times},
        dims={"y": ["series", "obs_time"]},
    )
    print(summary(idata, var_names=["theta", "mu"]).round(3))
    print(f"(true values: {TRUE})")
    print(loo(idata, var_name="y"))

    # 4. Figures and NetCDF.
    plot_ppc(idata, num_samples=100).savefig(out / "ppc.png", dpi=90)

    observed = torch.full(true_paths.shape[:-2] + (len(obs_steps), 1), float("nan"))
    observed[..., 0] = y
    observations = (obs_times, observed.numpy())
    fig, axes = plt.subplots(1, NUM_SERIES, figsize=(11, 3.2), squeeze=False, layout="constrained")
    for j, ax in enumerate(axes[0]):
        ax.plot(times, true_paths[j, :, 0], color="k", lw=0.8, ls="--", label="true path")
    plot_path_bands(idata, "x", observations=observations, axes=axes)
    fig.savefig(out / "path_bands.png", dpi=90)

    future = torch.linspace(4.05, 6.0, 40)
    paths = forecast(model, idata, future, model_args=(y,))
    fig, _ = plot_forecast(idata, paths, observations=observations)
    fig.savefig(out / "forecast.png", dpi=90)
    mean_final = paths.isel(time=-1).mean(("chain", "draw")).values.ravel()
    print(f"forecast mean at t = 6: {mean_final} (stationary mean mu = {TRUE['mu']})")

    fig, _ = plot_elbo(losses, reference=check.log_evidence, reference_label="IS log p(y)")
    fig.savefig(out / "elbo.png", dpi=90)

    to_netcdf(idata, out / "posterior.nc")
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tutorial_outputs"))
    main(parser.parse_args().out)
