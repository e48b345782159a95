"""A latent SDE learned from many series of a stochastic Lorenz system, with forecasts.

The data are Li et al.'s (2020, section 7.2; torchsde's ``examples/latent_sde_lorenz.py``):
``N`` series of the stochastic Lorenz system

    ``dx₁ = 10 (x₂ - x₁) dt + 0.1 x₁ dW₁``,
    ``dx₂ = (28 x₁ - x₂ - x₁ x₃) dt + 0.28 x₂ dW₂``,
    ``dx₃ = (x₁ x₂ - 8/3 x₃) dt + 0.3 x₃ dW₃``,

from ``x(0) ~ N(0, I)``, at 100 times on ``[0, 2]``, standardized per coordinate and observed
with noise 0.01. The model is a latent SDE of dimension 4 with a learned initial law, a
:class:`~pyro_nsde.zoo.nn.DriftNet`, a per-coordinate :class:`~pyro_nsde.zoo.nn.DiffusionNet` and a
learned linear map to the 3 observed coordinates:

    ``z_0 ~ N(m, diag(s²))``,  ``dz = f(z) dt + g(z) ⊙ dW``,  ``y_j ~ N(W z(t_j) + b, 0.01²)``.

The guide is amortized: a GRU run backward over each series
(:class:`~pyro_nsde.zoo.encoders.GRUEncoder`) gives a context per grid point. By default
(``--guide linear``) the context gives the coefficients of a posterior drift affine in the
state, ``a_k + B_k z`` with ``B_k`` diagonal, and a diagonal step scale
(``GirsanovGuide(control="linear", gain="diagonal")``, the Gauss–Markov family): the path is
sampled by a parallel scan and the drift and diffusion networks are evaluated once over all
grid points. At full size, 30 minutes on one core, the diagonal gains reached an ELBO of
−4.0·10⁵ against −9.9·10⁵ with full ones, a forecast RMSE of 0.248 against 0.334 and a 90 %
band coverage of 0.79 against 0.77 (657 and 570 steps, bands of 32 draws; with the 256 draws
it now takes, 702 steps gave RMSE 0.243 and coverage 0.82; with the observation noise in the
band, 656 steps gave 0.245 and 0.83: ``docs/neural_sdes.md``). In the
fast configuration (64 series) the full-gain family trained at 0.06 s a step against 0.26 s
for the sequential guide, and in the same wall time (1600 against 400 steps, about 100 s)
reached an ELBO of 1942 against −214449, a forecast RMSE of 0.336 against 0.346 and a 90 %
band coverage of 0.72 against 0.39 (one run each, seed 0, shared 2-core machine). At full
size the networks dominate a step on the CPU, so both guides take about 3 s a step; in 20
minutes of training each (421 and 399 steps, one thread each, side by side) the full-gain
guide reached an ELBO of −2.3·10⁶ against −4.7·10⁶, a forecast RMSE of 0.330 against 0.352 and
a coverage of 0.74 against 0.68 (``docs/neural_sdes.md``). With
``--guide sequential`` a
:class:`~pyro_nsde.zoo.nn.PosteriorDriftControl` gives the posterior drift and a learned diagonal
increment covariance (``covariance="diagonal"``: with observations this precise the pure mean
shift would pull the learned diffusion down, see ``docs/neural_sdes.md``; in the fast run with
400 steps it gives a better ELBO and twice the forecast band coverage). Settings follow
torchsde's example (1024 series, latent size 4, context 64, hidden 128, learning rate 0.01
decaying by 0.997 per step, KL annealed over 1000 steps with ``poutine.scale``,
Euler–Maruyama steps of at most 0.0102: two per observation gap, as torchsde's ``dt=0.01``).
The model is fitted on ``t ≤ 1.5`` (75 points) and forecasts ``(1.5, 2]`` (25 points) from
each series' posterior state at ``t = 1.5`` with torchsde's SRK scheme
(:func:`~pyro_nsde.analysis.predict.predictive_paths`); the forecast error is compared with
carrying the
last observation forward. Full-size measurements against a torchsde latent SDE:
``docs/neural_sdes.md`` (``benchmarks/lorenz_latent_sde.py``).

Run::

    python tutorials/lorenz.py --out tutorial_outputs [--steps 5000]
    PYRO_NSDE_FAST=1 python tutorials/lorenz.py --out /tmp/lorenz   # a quick run (CI)
    python tutorials/lorenz.py --guide sequential   # the step-by-step neural control

Writes ``lorenz_samples.png`` (data and paths sampled from the learned SDE, in 3-D),
``lorenz_forecast.png`` (posterior paths and forecasts of a few series), ``lorenz_elbo.png``
and ``lorenz.json`` (ELBO before and after, time per SVI step, forecast errors) to ``--out``.
"""

import argparse
import json
import os
import pathlib
import time

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from torch import nn

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.analysis.predict import predictive_paths, solve_sde
from pyro_nsde.zoo.encoders import GRUEncoder
from pyro_nsde.zoo.nn import DiffusionNet, DriftNet, PosteriorDriftControl
from pyro_nsde.zoo.series import GriddedSeries

FAST = os.environ.get("PYRO_NSDE_FAST") == "1"
SETTINGS = {
    False: {
        "series": 1024,
        "hidden": 128,
        "context": 64,
        "steps": 5000,
        "anneal": 1000,
        "draws": 32,
        "forecast_draws": 256,
        "max_step": 0.0102,  # 2 Euler–Maruyama steps per observation gap of 2/99 ≈ 0.0202
        "data_dt": 1e-3,
    },
    True: {
        "series": 64,
        "hidden": 32,
        "context": 16,
        "steps": 40,
        "anneal": 15,
        "draws": 16,
        "forecast_draws": 64,
        "max_step": 0.021,
        "data_dt": 5e-3,
    },
}
LATENT, NOISE, NUM_TIMES, TRAIN_TIMES = 4, 0.01, 100, 75


class StochasticLorenz:
    """The data-generating SDE (Li et al.'s parameters)."""

    def f(self, t, x):
        x1, x2, x3 = x.unbind(-1)
        return torch.stack([10 * (x2 - x1), 28 * x1 - x2 - x1 * x3, x1 * x2 - 8 / 3 * x3], -1)

    def g(self, t, x):
        return x * torch.tensor([0.1, 0.28, 0.3])


def lorenz_data(num_series: int, dt: float):
    """``(times, y)``: ``NUM_TIMES`` times on ``[0, 2]`` and standardized noisy observations
    ``(N, NUM_TIMES, 3)``, simulated by SRK at step ``dt``."""
    times = torch.linspace(0, 2, NUM_TIMES)
    sde = StochasticLorenz()
    with torch.no_grad():
        x = solve_sde(sde.f, sde.g, torch.randn(num_series, 3), times, method="srk", dt=dt)
    x = (x - x.mean((0, 1))) / x.std((0, 1))
    y = x + NOISE * torch.randn_like(x)
    return times, y


def make_model(modules, num_series):
    drift, diffusion, projector = modules["drift"], modules["diffusion"], modules["projector"]

    def model(data: GriddedSeries, kl_scale: float = 1.0):
        for name, module in modules.items():
            pyro.module(name, module)
        loc = pyro.param("z0_loc", torch.zeros(LATENT))
        scale = pyro.param("z0_scale", torch.ones(LATENT), constraint=dist.constraints.positive)
        with pyro.plate("series", num_series):
            prior = EulerMaruyama(drift, diffusion, dist.Normal(loc, scale).to_event(1), data.times)
            with poutine.scale(scale=kl_scale):
                z = pyro.sample("z", prior)
            likelihood = dist.Normal(projector(z), NOISE).mask(data.mask).to_event(2)
            pyro.sample("y", likelihood, obs=data.values)

    return model


def full_elbo(model, guide, data, num_particles=2) -> float:
    loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    with torch.no_grad():
        return -loss.loss(model, guide, data)


def forecast_paths(model, guide, data, times, draws: int, chunk: int = 32) -> torch.Tensor:
    """``(draws, N, T, LATENT)`` posterior states at ``times[0]`` continued by the learned
    prior SDE (SRK, ``dt = 0.005``), in chunks of at most ``chunk`` draws (the guide's paths of
    every series per draw). The 5-95 % band of S draws covers less than 90 % of a calibrated
    forecast's outcomes (the order statistics around the quantiles): 85 % with 32 draws, 89 %
    with 256, which the tutorial takes (about 15 minutes at full size on one core: SRK with
    Levy areas)."""
    sizes = [min(chunk, draws - k) for k in range(0, draws, chunk)]
    paths = [
        predictive_paths(
            model, guide, data, site="z", times=times, num_samples=size, method="srk", dt=0.005
        )
        for size in sizes
    ]
    return torch.cat(paths)


def observe(latent_paths: torch.Tensor) -> torch.Tensor:
    """Future *observations* of projected latent paths: the model's observation noise
    ``N(0, NOISE²)`` added to each, so that a band of them is a prediction interval for a
    held-out data point, not for its noise-free latent value."""
    return latent_paths + NOISE * torch.randn_like(latent_paths)


def forecast_scores(future: torch.Tensor, held_out: torch.Tensor) -> dict:
    """Scores of forecast observations ``future`` ``(S, N, T, 3)`` (from :func:`observe`)
    against ``held_out`` ``(N, T, 3)``: the RMSE of their mean, the share of ``held_out``
    inside their 5-95 % band, and that share at each forecast time."""
    low, high = future.quantile(torch.tensor([0.05, 0.95], dtype=future.dtype), 0)
    inside = ((held_out >= low) & (held_out <= high)).float()
    return {
        "rmse": float((future.mean(0) - held_out).pow(2).mean().sqrt()),
        "coverage": float(inside.mean()),
        "coverage_by_time": inside.mean((0, 2)).tolist(),
    }


def persistence_rmse(y: torch.Tensor) -> float:
    """RMSE of carrying the last fitted observation of ``y`` ``(N, NUM_TIMES, 3)`` forward
    over the held-out times."""
    last = y[:, TRAIN_TIMES - 1 : TRAIN_TIMES]
    return float((last - y[:, TRAIN_TIMES:]).pow(2).mean().sqrt())


def plot_samples(times, y, sampled, path, count=10):
    fig = plt.figure(figsize=(11, 5))
    for k, (paths, title) in enumerate(((y, "data"), (sampled, "sampled from the learned SDE"))):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        for i in range(count):
            ax.plot(*paths[i].T.numpy(), lw=0.8)
        ax.scatter(*paths[:count, 0].T.numpy(), marker="x", color="k")
        ax.set_title(title)
        ax.set_xlabel("$y_1$")
        ax.set_ylabel("$y_2$")
        ax.set_zlabel("$y_3$")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_forecast(times, y, fit_times, fitted, future_times, future, path, series=(0, 1, 2)):
    split = float(fit_times[-1])
    fig, axes = plt.subplots(3, len(series), figsize=(4 * len(series), 7), sharex=True)
    for col, i in enumerate(series):
        for row in range(3):
            ax = axes[row, col]
            for t, draws, color in ((fit_times, fitted, "C0"), (future_times, future, "C1")):
                low, mid, high = draws[:, i, :, row].quantile(torch.tensor([0.05, 0.5, 0.95]), 0)
                ax.fill_between(t, low, high, color=color, alpha=0.3, lw=0)
                ax.plot(t, mid, color=color, lw=1)
            ax.scatter(times, y[i, :, row], s=4, color="k", zorder=3)
            ax.axvline(split, color="gray", lw=0.8, ls="--")
            ax.set_ylabel(f"$y_{row + 1}$")
        axes[0, col].set_title(f"series {i}: posterior (blue), forecast (orange)")
        axes[-1, col].set_xlabel("$t$")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out: pathlib.Path, steps: int | None = None, seed: int = 0, guide_kind="linear"):
    out.mkdir(parents=True, exist_ok=True)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    cfg = dict(SETTINGS[FAST])
    steps = cfg["steps"] if steps is None else steps
    hidden, context = cfg["hidden"], cfg["context"]
    times, y = lorenz_data(cfg["series"], cfg["data_dt"])
    fit_times = times[:TRAIN_TIMES]
    data = GriddedSeries.from_series(
        [fit_times] * cfg["series"], list(y[:, :TRAIN_TIMES]), max_step=cfg["max_step"]
    )
    modules = {
        "drift": DriftNet(LATENT, (hidden, hidden), time_frequencies=()),
        "diffusion": DiffusionNet(LATENT, hidden_dims=(hidden,)),
        "projector": nn.Linear(LATENT, 3),
    }
    model = make_model(modules, cfg["series"])
    drift, diffusion = modules["drift"], modules["diffusion"]
    encoder = GRUEncoder(3, context, hidden)
    if guide_kind == "linear":
        # The parallel-in-time family: posterior drift a_k + B_k z (B_k diagonal) and a
        # diagonal step scale, all from the encoder's context; the path is sampled by a scan of
        # scalars, no loop over steps. Diagonal gains: 3 x 4 numbers a step from the encoder
        # instead of 4² + 2 x 4; in 30 minutes at full size they reached twice the ELBO and a
        # forecast RMSE of 0.248 against 0.334 with full gains (docs/neural_sdes.md).
        guide = GirsanovGuide(
            model, control="linear", gain="diagonal", covariance="diagonal", encoder=encoder
        )
    else:
        control = PosteriorDriftControl(
            drift, diffusion, LATENT, context, (hidden, hidden), covariance="diagonal"
        )
        guide = GirsanovGuide(model, control=control, encoder=encoder)

    def annealed_guide(data, kl_scale=1.0):
        with poutine.scale(scale=kl_scale):
            return guide(data, kl_scale)

    elbo_before = full_elbo(model, guide, data)
    optim = pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.997})
    svi = SVI(model, annealed_guide, optim, Trace_ELBO())
    losses, start = [], time.perf_counter()
    for step in range(steps):
        kl_scale = min(1.0, (step + 1) / cfg["anneal"])
        losses.append(svi.step(data, kl_scale))
        if step % max(1, steps // 20) == 0:
            elapsed = (time.perf_counter() - start) / (step + 1)
            print(
                f"step {step:5d}  annealed loss {losses[-1]:12.1f}  KL weight {kl_scale:.2f}"
                f"  {elapsed:.2f} s/step",
                flush=True,
            )
    seconds = (time.perf_counter() - start) / steps
    elbo_after = full_elbo(model, guide, data)
    print(
        f"ELBO {elbo_before:.1f} -> {elbo_after:.1f}  ({seconds:.3f} s per SVI step, "
        f"{data.num_series} series, {data.num_steps} Euler–Maruyama steps)"
    )

    projector = modules["projector"]
    with torch.no_grad():
        posterior = Predictive(model, guide=guide, num_samples=cfg["draws"], parallel=True)
        fitted = projector(posterior(data)["z"])  # (S, N, K+1, 3)
        future_times = times[TRAIN_TIMES - 1 :]
        future_z = forecast_paths(
            model, guide, data, future_times, cfg["forecast_draws"], chunk=cfg["draws"]
        )
        future = observe(projector(future_z))
        held_out = y[:, TRAIN_TIMES:]
        scores = forecast_scores(future[:, :, 1:], held_out)
        forecast_rmse, coverage = scores["rmse"], scores["coverage"]
        persistence = persistence_rmse(y)
        loc, scale = pyro.param("z0_loc"), pyro.param("z0_scale")
        z0 = loc + scale * torch.randn(10, LATENT)
        sampled = projector(solve_sde(drift, diffusion, z0, times, method="srk", dt=0.005))
    print(
        f"forecast RMSE over t in (1.5, 2]: {forecast_rmse:.3f} (last observation carried "
        f"forward: {persistence:.3f}); 90 % band coverage {coverage:.2f}"
    )

    plot_samples(times, y, sampled, out / "lorenz_samples.png")
    grid = data.times
    plot_forecast(times, y, grid, fitted, future_times, future, out / "lorenz_forecast.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses)
    ax.set_yscale("symlog")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("annealed loss")
    fig.tight_layout()
    fig.savefig(out / "lorenz_elbo.png", dpi=110)
    plt.close(fig)
    summary = {
        "fast": FAST,
        "guide": guide_kind,
        "series": data.num_series,
        "grid_steps": data.num_steps,
        "svi_steps": steps,
        "elbo_before": elbo_before,
        "elbo_after": elbo_after,
        "seconds_per_step": seconds,
        "forecast_rmse": forecast_rmse,
        "persistence_rmse": persistence,
        "forecast_90_coverage": coverage,
        "forecast_90_coverage_by_time": scores["coverage_by_time"],
    }
    (out / "lorenz.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote figures and lorenz.json to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tutorial_outputs"))
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--guide",
        choices=("linear", "sequential"),
        default="linear",
        help="linear (default): the Gauss–Markov family (control='linear'), sampled in "
        "parallel in time; sequential: a PosteriorDriftControl network simulated step by step",
    )
    args = parser.parse_args()
    main(args.out, args.steps, args.seed, args.guide)
