"""Does one call of :func:`pyro_nsde.fit_svi` fit a neural SDE as well as the two-phase recipe?
(issue 14, item 4: "the robust path is the easy path")

**The problem** (the issue's variant of ``tests/test_sysid.py``): the double well
``dx = (x - x³) dt + 0.6 dW``, ``x_0 ~ U(-2, 2)``, 48 series simulated with 200 Euler–Maruyama
steps of 0.02 (torchsde, ``method="euler"``), observed every 10 steps (21 points on ``[0, 4]``)
with noise 0.1. The model is the one of ``tests/test_sysid.py`` on the simulation's grid
(``h = 0.02``): an autonomous :class:`~pyro_nsde.zoo.nn.DriftNet` ``(32, 32)``, a learned constant
:class:`~pyro_nsde.zoo.nn.DiffusionNet` (starts at 0.5), ``x_0 ~ N(0, 2²)``.

**Metrics**: the drift's RMS error over the true latent states of the data (all 201 grid points
of every series: the visited region) relative to the RMS of the true drift there; the learned
``σ`` over the truth 0.6; wall time of the fit. ``lsq`` is a reference that needs no
inference: a ``DriftNet`` fitted by least squares (Adam, full batch, no regularization) to the
*true* latent increments, with ``σ`` from the RMS residual.

**Methods** (``--methods``):

- ``naive``: the guide a Pyro user writes first, ``GirsanovGuide(model, control="mlp",
  encoder=GRUEncoder(1, 16, 32))`` (a :class:`~pyro_nsde.ControlNet` with the GRU's context,
  mean-shift covariance), in ONE plain ``SVI(model, guide, Adam({"lr": 3e-3}), Trace_ELBO())``
  loop of ``--naive-steps`` steps.
- ``fit_svi``: the same guide, ONE call ``fit_svi(model, guide, data, steps=--steps)`` with its
  defaults (ClippedAdam 0.03 → 0.003, 8 vectorized particles, warm-up ``steps // 10``).
- ``fit_svi_diag``: the same with ``covariance="diagonal"`` on the guide (and so on its
  ``ControlNet``), as ``docs/covariance.md`` recommends for a learned diffusion.
- ``fit_svi_pdc``: ONE ``fit_svi`` call with the recipe's guide (a
  :class:`~pyro_nsde.zoo.nn.PosteriorDriftControl`, ``"diagonal"``): separates the schedule from
  the guide.
- ``fit_svi_wu``, ``fit_svi_diag_wu``: ``fit_svi``, ``fit_svi_diag`` with
  ``warmup=--long-warmup`` (a longer warm-up than the default ``steps // 10``).
- ``recipe``: the two-phase recipe of ``tests/test_sysid.py``: ``PosteriorDriftControl``
  (``"diagonal"``) + GRU encoder; ``--recipe-warmup`` steps of Adam 0.02 with the model's
  rates at 0, then ``--recipe-steps`` joint steps of ClippedAdam 0.02 decaying to 0.002;
  one particle.
- ``lsq``: the least-squares reference described above.

Every method of a seed sees the same data (simulated from ``seed``) and starts its fit from
``pyro.set_rng_seed(seed + 1000)``.

Run (with the defaults, one seed takes about 35 minutes on one core of a loaded shared
machine; the seeds can run side by side)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy/single_loop.py --seeds 0
    OMP_NUM_THREADS=1 python benchmarks/accuracy/single_loop.py --seeds 1
"""

import argparse
import sys
import time
from pathlib import Path

import pyro
import torch
import torchsde
from pyro.infer import SVI, Trace_ELBO

from pyro_nsde import GirsanovGuide, fit_svi
from pyro_nsde.zoo.encoders import GRUEncoder
from pyro_nsde.zoo.nn import PosteriorDriftControl
from pyro_nsde.zoo.series import GriddedSeries

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_sysid import SIGMA, _DoubleWell, drift_error
from test_sysid import make_model as sysid_model

OBS_NOISE, STEP, NUM_STEPS, OBS_EVERY = 0.1, 0.02, 200, 10
METHODS = (
    "naive",
    "fit_svi",
    "fit_svi_diag",
    "fit_svi_pdc",
    "fit_svi_wu",
    "fit_svi_diag_wu",
    "recipe",
    "lsq",
)


def simulate(num_series, seed):
    """Returns the data (observations every ``OBS_EVERY`` steps on the ``STEP`` grid) and the
    true latent paths ``(N, NUM_STEPS + 1, 1)`` on the whole grid."""
    pyro.set_rng_seed(seed)  # torch and numpy (torchsde's Brownian motion)
    grid = torch.arange(NUM_STEPS + 1) * STEP
    x0 = torch.empty(num_series, 1).uniform_(-2, 2)
    with torch.no_grad():
        latent = torchsde.sdeint(_DoubleWell(), x0, grid, dt=STEP, method="euler").movedim(0, 1)
    observed = latent[:, ::OBS_EVERY]
    values = observed + OBS_NOISE * torch.randn_like(observed)
    times = grid[::OBS_EVERY]
    data = GriddedSeries.from_series([times] * num_series, list(values), max_step=STEP * (1 + 1e-6))
    assert data.times.shape[-1] == NUM_STEPS + 1, data.times.shape
    return data, latent


def run(method, data, latent, args):
    """Fits one method; returns ``(drift error, learned σ, seconds, what was run)``."""
    pyro.clear_param_store()
    model, drift, diffusion = sysid_model(OBS_NOISE)
    encoder = GRUEncoder(1, 16, 32)
    start = time.perf_counter()
    if method == "naive":
        guide = GirsanovGuide(model, control="mlp", encoder=encoder)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), Trace_ELBO())
        for _ in range(args.naive_steps):
            svi.step(data)
        ran = f"SVI + Adam(3e-3), {args.naive_steps} steps, 1 particle"
    elif method in ("fit_svi", "fit_svi_diag", "fit_svi_wu", "fit_svi_diag_wu"):
        covariance = "diagonal" if "diag" in method else "prior"
        guide = GirsanovGuide(model, control="mlp", encoder=encoder, covariance=covariance)
        options = {"warmup": args.long_warmup} if method.endswith("_wu") else {}
        fit_svi(model, guide, data, steps=args.steps, progress=False, **options)
        warmup = options.get("warmup", args.steps // 10)
        ran = f'fit_svi(steps={args.steps}) [warm-up {warmup}], "mlp" {covariance}'
    elif method == "fit_svi_pdc":
        control = PosteriorDriftControl(drift, diffusion, 1, 16, (64, 64), "diagonal")
        guide = GirsanovGuide(model, control=control, encoder=encoder)
        fit_svi(model, guide, data, steps=args.steps, progress=False)
        ran = f"fit_svi(steps={args.steps}) [warm-up {args.steps // 10}], PDC diagonal"
    elif method == "recipe":
        control = PosteriorDriftControl(drift, diffusion, 1, 16, (64, 64), "diagonal")
        guide = GirsanovGuide(model, control=control, encoder=encoder)
        steps = args.recipe_steps
        frozen = pyro.optim.Adam(lambda m, p: {"lr": 0.0 if m in ("drift", "diffusion") else 0.02})
        warm = SVI(model, guide, frozen, Trace_ELBO())
        for _ in range(args.recipe_warmup):
            warm.step(data)
        joint = pyro.optim.ClippedAdam(lambda m, p: {"lr": 0.02, "lrd": 0.1 ** (1 / steps)})
        svi = SVI(model, guide, joint, Trace_ELBO())
        for _ in range(steps):
            svi.step(data)
        ran = f"two-phase, {args.recipe_warmup} + {steps} steps, PDC diagonal, 1 particle"
    elif method == "lsq":
        optim = torch.optim.Adam(drift.parameters(), lr=0.01)
        x = latent[:, :-1].reshape(-1, 1)
        dx = (latent[:, 1:] - latent[:, :-1]).reshape(-1, 1)
        for _ in range(args.lsq_steps):
            optim.zero_grad()
            loss = (dx - STEP * drift(torch.zeros(1), x)).pow(2).mean()
            loss.backward()
            optim.step()
        with torch.no_grad():
            resid = dx - STEP * drift(torch.zeros(1), x)
            sigma = float(resid.pow(2).mean().sqrt() / STEP**0.5)
        seconds = time.perf_counter() - start
        return drift_error(drift, latent), sigma, seconds, f"least squares, {args.lsq_steps} Adam"
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    sigma = float(diffusion(torch.zeros(1), torch.zeros(1)).detach())
    return drift_error(drift, latent), sigma, seconds, ran


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num-series", type=int, default=48)
    parser.add_argument("--steps", type=int, default=500, help="fit_svi steps")
    parser.add_argument("--naive-steps", type=int, default=1000)
    parser.add_argument("--long-warmup", type=int, default=150)
    parser.add_argument("--recipe-warmup", type=int, default=80)
    parser.add_argument("--recipe-steps", type=int, default=300)
    parser.add_argument("--lsq-steps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for seed in args.seeds:
        data, latent = simulate(args.num_series, seed)
        for method in args.methods:
            pyro.set_rng_seed(seed + 1000)
            error, sigma, seconds, ran = run(method, data, latent, args)
            rows.append((method, seed, ran, error, sigma / SIGMA, seconds))
            print(
                f"# {method} seed {seed}: drift error {error:.3f}, σ/0.6 {sigma / SIGMA:.3f}, "
                f"{seconds:.0f} s",
                flush=True,
            )

    print()
    print("| method | what ran | seed | drift error | learned σ / 0.6 | wall s |")
    print("|---|---|---|---|---|---|")
    for method, seed, ran, error, ratio, seconds in rows:
        print(f"| {method} | {ran} | {seed} | {error:.3f} | {ratio:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
