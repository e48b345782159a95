"""System identification of a sparsely observed double well: which path family holds its
bimodal posterior, and what does time-subsampled training cost in accuracy? (issue 23)

**The problem.** ``dx = (x - x³) dt + σ dW``, ``σ = 0.6``, ``x_0 ~ U(-2, 2)``, ``--series``
series on ``[0, T]`` (``--horizon``, default 10) simulated by torchsde (Euler, ``dt = 0.0025``)
and observed every ``--gap`` time units (default 1, i.e. every 20th point of the model's grid
of step 0.05) with noise 0.1. Between two observations in different wells the path's
posterior has two modes at every time in between (the transition has happened or not yet);
with this σ a series switches wells about once in 20 time units, so about a third of the
series do.

**The model** (as in ``tests/test_sysid.py``): an autonomous ``DriftNet(1, (32, 32))``, a
learned constant ``DiffusionNet(1, hidden_dims=())`` starting at 0.5, ``x_0 ~ N(0, 2²)``,
Gaussian observations with the true noise, all on the grid of step ``h = 0.05``.

**The families** (``--methods``), each trained by one ``fit_svi(model, guide, data,
steps=--steps)`` call (its defaults: a tenth of the steps with the model's parameters fixed,
ClippedAdam 0.03 → 0.003, 8 vectorized particles):

- ``gm``: ``GirsanovGuide(model, control="linear", covariance="diagonal")``: the Gauss–Markov
  chain, coefficients per series from the Laplace start (re-fitted every 10 steps);
- ``warp``: the same with ``warp="spline"`` (``pyro_nsde.posterior.warped``; estimator
  ``"stl"``);
- ``gm-sub``, ``warp-sub``: the same trained on ``subsample_steps(model, --subsample)`` (guide
  built with ``subsample_steps=R``, estimator ``"stl"``);
- ``neural``: the amortized recipe of ``docs/neural_sdes.md``: a ``PosteriorDriftControl``
  (diagonal increment covariance) fed by a ``GRUEncoder(1, 16, 32)``, all steps;
- ``neural-sub``: the same trained on ``subsample_steps(model, R)``: the guide simulates with
  the control's posterior drift, without the prior's (``drift_free``), estimator ``"plain"``.

**Reported**: the drift error (RMS error of the learned drift over the true latent states on
the grid, relative to the RMS of the true drift there), the learned σ over the truth, the
final ELBO of model and guide on the plain model (``Trace_ELBO``, 32 vectorized particles,
nats), and the training wall time. ``--fixed-model`` instead holds the model at the truth
(the true drift and σ) and trains only the guide: its ELBO then measures how much of
``log p(y)`` each family holds, and the gap ``log p(y) - ELBO`` (``log p(y)`` of the
discretized model by a forward filter on a grid of 1401 states) is the family's
``KL(q ‖ posterior)``.

Run (one thread)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy/double_well.py --seeds 0 1
    OMP_NUM_THREADS=1 python benchmarks/accuracy/double_well.py --fixed-model --seeds 0
    OMP_NUM_THREADS=1 python benchmarks/accuracy/double_well.py --fixed-model --gap 2 \\
        --methods gm,warp --estimator plain   # the two families with the same estimator
"""

import argparse
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torchsde

from pyro_nsde import EulerMaruyama, GirsanovGuide, fit_svi, subsample_steps
from pyro_nsde.zoo.encoders import GRUEncoder
from pyro_nsde.zoo.nn import PosteriorDriftControl
from pyro_nsde.zoo.series import GriddedSeries

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_sysid import SIGMA, _DoubleWell, drift_error
from test_sysid import make_model as sysid_model

OBS_NOISE, STEP = 0.1, 0.05
METHODS = ("gm", "warp", "gm-sub", "warp-sub", "neural", "neural-sub")


def simulate(num_series, horizon, gap):
    """``(data, latent)``: the observed series on the model's grid and the true states there."""
    num_steps = round(horizon / STEP)
    times = torch.arange(num_steps + 1) * STEP
    x0 = torch.empty(num_series, 1).uniform_(-2, 2)
    with torch.no_grad():
        latent = torchsde.sdeint(_DoubleWell(), x0, times, dt=STEP / 20).movedim(0, 1)
    every = round(gap / STEP)
    observed = latent[:, ::every]
    values = observed + OBS_NOISE * torch.randn_like(observed)
    obs_times = times[::every]
    data = GriddedSeries.from_series(
        [obs_times] * num_series, list(values), max_step=STEP * (1 + 1e-6)
    )
    return data, latent


def make_model(fixed: bool):
    """``(model, drift, diffusion)``: ``tests/test_sysid.py``'s model with the noise of these
    data, or (``fixed``) the same model at the truth, without parameters."""
    if not fixed:
        return sysid_model(OBS_NOISE)
    drift, diffusion = _DoubleWell().f, torch.tensor([SIGMA])
    init = dist.Normal(torch.zeros(1), 2.0).to_event(1)

    def model(data):
        with pyro.plate("series", data.num_series):
            x = pyro.sample("x", EulerMaruyama(drift, diffusion, init, data.times))
            pyro.sample("y", dist.Normal(x, OBS_NOISE).mask(data.mask).to_event(2), obs=data.values)

    return model, drift, diffusion


def exact_log_evidence(data, num_points=1401, bound=3.5) -> float:
    """``log p(y)`` of the discretized true model (the Euler–Maruyama chain on the model's
    grid), by a forward filter on a fine grid of states (float64)."""
    grid = torch.linspace(-bound, bound, num_points, dtype=torch.float64)
    dx = float(grid[1] - grid[0])
    times = data.times.to(torch.float64)
    values = data.values.to(torch.float64)[..., 0]
    mask = data.mask[..., 0]
    density = dist.Normal(0.0, 2.0).log_prob(grid).exp().expand(values.shape[0], -1)
    log_z = torch.zeros(values.shape[0], dtype=torch.float64)
    for k in range(len(times)):
        if k > 0:
            h = float(times[k] - times[k - 1])
            mean = grid + h * (grid - grid**3)
            step = dist.Normal(mean.unsqueeze(-1), SIGMA * h**0.5).log_prob(grid).exp() * dx
            density = density @ step
        likelihood = dist.Normal(grid, OBS_NOISE).log_prob(values[:, k : k + 1]).exp()
        density = density * torch.where(mask[:, k : k + 1], likelihood, 1.0)
        mass = density.sum(-1) * dx
        log_z += mass.log()
        density = density / mass.unsqueeze(-1)
    return float(log_z.sum())


def make_guide(method, model, drift, diffusion, subsample, estimator=None):
    steps = subsample if method.endswith("-sub") else None
    if method.startswith("neural"):
        control = PosteriorDriftControl(drift, diffusion, 1, 16, (64, 64), "diagonal")
        encoder = GRUEncoder(1, 16, 32)
        return GirsanovGuide(model, control=control, encoder=encoder, subsample_steps=steps)
    warp = "spline" if method.startswith("warp") else None
    options = {} if estimator is None else {"estimator": estimator}
    return GirsanovGuide(
        model,
        control="linear",
        covariance="diagonal",
        warp=warp,
        subsample_steps=steps,
        **options,
    )


def run(method, seed, args):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    data, latent = simulate(args.series, args.horizon, args.gap)
    pyro.set_rng_seed(1000 + seed)
    model, drift, diffusion = make_model(args.fixed_model)
    start = time.perf_counter()
    guide = make_guide(method, model, drift, diffusion, args.subsample, args.estimator)
    trained = subsample_steps(model, args.subsample) if method.endswith("-sub") else model
    guide(data)  # set up (the Laplace start) inside the timed part
    fit_svi(trained, guide, data, steps=args.steps, progress=False)
    seconds = time.perf_counter() - start
    elbo = pyro.infer.Trace_ELBO(num_particles=32, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        value = -elbo.loss(model, guide, data)
    if args.fixed_model:
        gap = exact_log_evidence(data) - value
        return {"elbo": value, "log p(y) - elbo": gap, "seconds": seconds}
    with torch.no_grad():
        sigma = float(diffusion(torch.zeros(1), torch.zeros(1)))
    return {
        "drift error": drift_error(drift, latent),
        "sigma ratio": sigma / SIGMA,
        "elbo": value,
        "seconds": seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--series", type=int, default=64)
    parser.add_argument("--horizon", type=float, default=10.0)
    parser.add_argument("--gap", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--subsample", type=int, default=20)
    parser.add_argument("--fixed-model", action="store_true")
    parser.add_argument(
        "--estimator",
        choices=("girsanov", "plain", "stl"),
        help="the Gauss-Markov guides' gradient estimator (default: the guide's)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    print(
        f"double well, {args.series} series on [0, {args.horizon:g}], observed every "
        f"{args.gap:g} (noise {OBS_NOISE}), grid step {STEP}, {args.steps} SVI steps, "
        f"R = {args.subsample}{', model fixed at the truth' if args.fixed_model else ''}"
    )
    columns = (
        ["elbo", "log p(y) - elbo", "seconds"]
        if args.fixed_model
        else ["drift error", "sigma ratio", "elbo", "seconds"]
    )
    print("| method | seed | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for method in args.methods.split(","):
        for seed in args.seeds:
            result = run(method, seed, args)
            cells = " | ".join(f"{result[c]:.{1 if c == 'elbo' else 3}f}" for c in columns)
            print(f"| {method} | {seed} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
