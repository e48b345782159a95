"""Many series, each with its own rate: a hierarchical SDE fitted in seconds, checked exactly.

A fleet of sensors (or assets, or patients) each reports a mean-reverting signal: series ``i``
follows an Ornstein–Uhlenbeck process with its own reversion rate,

    ``log θ_i ~ N(m, s²)``,   ``m ~ N(0, 1)``,   ``log s ~ N(log 0.5, 0.5²)``,
    ``dX_i = -θ_i X_i dt + 0.5 dW_i``,   ``X_i(0) ~ N(0, 1)``,
    ``y_{ij} ~ N(X_i(t_j), 0.2²)``   every 10 of 1000 Euler–Maruyama steps (``h = 0.01``).

The question is about the population: how fast does a typical series revert (``e^m``), and how
much do they differ (``s``)? With 400 series there are 400 000 latent path states: NUTS on every
path is out of reach, mean field over the rates shrinks ``s``. The script

1. fits ``GirsanovGuide(model)`` with ``fit_svi`` defaults: the guide chooses the hierarchical
   family (each ``θ_i`` given ``(m, s)`` with the moments of its exact conditional, ``(m, s)``
   full-rank; ``docs/hierarchical.md``) and starts it from each series' likelihood;
2. compares the posterior of ``(m, s)`` with the exact one (a Kalman filter per series and
   quadrature, ``HierarchicalOU.population_posterior``);
3. fits again with ``pyro.plate(..., subsample_size=100)``: SVI sees 100 series per step;
4. checks each series' rate: the true ``θ_i`` against its 90% interval;
5. saves the population posterior and the rates as ``hierarchical_ou.png``.

Run::

    python tutorials/hierarchical_ou.py --out tutorial_outputs
    PYRO_NSDE_FAST=1 python tutorials/hierarchical_ou.py   # a quick run (CI)
"""

import argparse
import os
import pathlib
import time

import matplotlib.pyplot as plt
import pyro
import torch

from pyro_nsde import GirsanovGuide, fit_svi
from pyro_nsde.zoo.hierarchical import HierarchicalOU

FAST = os.environ.get("PYRO_NSDE_FAST") == "1"
NUM_SERIES, NUM_STEPS, H = (30, 200, 0.05) if FAST else (400, 1000, 0.01)
SUBSAMPLE = 10 if FAST else 100


def fit(zoo, y, seed):
    """``(guide, seconds)``: ``GirsanovGuide(model)`` fitted with ``fit_svi`` defaults."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    guide = GirsanovGuide(zoo.model)
    losses = fit_svi(zoo.model, guide, y, progress=False)
    print(f"  {guide.options.latents} family, {len(losses)} SVI steps", end="")
    return guide, time.perf_counter() - start


def population_draws(guide, num_samples=4000):
    """Draws of ``(m, s)`` from the guide."""
    with torch.no_grad():
        z = guide.latent_guide.global_guide.get_posterior().sample((num_samples,))
    return {"m": z[:, 0].double(), "s": z[:, 1].exp().double()}


def rate_draws(guide, y, num_samples=200):
    """Draws of every series' rate ``(S, N)`` from the guide's family of the parameters."""
    with torch.no_grad(), pyro.poutine.block():
        return torch.stack([guide.latent_guide(y)["theta"] for _ in range(num_samples)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tutorial_outputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    zoo = HierarchicalOU(NUM_SERIES, NUM_STEPS, H, every=10)
    y, theta = zoo.simulate(m=0.0, s=0.5, seed=args.seed)
    print(f"{NUM_SERIES} series x {NUM_STEPS} steps, observed every 10 steps")
    start = time.perf_counter()
    exact = zoo.population_posterior(y)
    print(f"exact posterior by quadrature: {time.perf_counter() - start:.1f} s")

    rows = {}
    print("GirsanovGuide(model), fit_svi defaults:")
    guide, seconds = fit(zoo, y, args.seed)
    print(f", {seconds:.1f} s")
    rows["all series"] = population_draws(guide)
    sub_zoo = HierarchicalOU(NUM_SERIES, NUM_STEPS, H, every=10, subsample_size=SUBSAMPLE)
    print(f"the same with subsample_size={SUBSAMPLE}:")
    sub_guide, sub_seconds = fit(sub_zoo, y, args.seed)
    print(f", {sub_seconds:.1f} s")
    rows[f"{SUBSAMPLE} per step"] = population_draws(sub_guide)

    print(f"{'':>14} {'m':>22} {'s':>22}")
    print(f"{'exact':>14} " + " ".join(f"{mu:>10.3f} ± {sd:<9.3f}" for mu, sd in exact.values()))
    for label, draws in rows.items():
        cells = []
        for name, (mean, sd) in exact.items():
            z = (float(draws[name].mean()) - mean) / sd
            cells.append(f"z {z:+.2f}, sd x{float(draws[name].std()) / sd:.2f}".rjust(22))
        print(f"{label:>14} " + " ".join(cells))

    rates = rate_draws(guide, y)
    low, high = rates.quantile(0.05, 0), rates.quantile(0.95, 0)
    covered = float(((low <= theta) & (theta <= high)).double().mean())
    print(f"true rates inside their 90% intervals: {100 * covered:.0f}% of {NUM_SERIES}")

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for axis, name in zip(axes[:2], ("m", "s"), strict=True):
        axis.hist(rows["all series"][name].numpy(), bins=50, density=True, alpha=0.6)
        mean, sd = exact[name]
        axis.axvspan(mean - sd, mean + sd, color="k", alpha=0.15, label="exact mean ± sd")
        axis.axvline(mean, color="k")
        axis.set_title(f"posterior of {name}")
        axis.legend()
    axes[2].errorbar(
        theta.numpy(),
        rates.median(0).values.numpy(),
        yerr=[(rates.median(0).values - low).numpy(), (high - rates.median(0).values).numpy()],
        fmt=".",
        alpha=0.5,
    )
    axes[2].plot([theta.min(), theta.max()], [theta.min(), theta.max()], "k--")
    axes[2].set(xscale="log", yscale="log", xlabel="true θ_i", ylabel="posterior (90%)")
    figure.tight_layout()
    figure.savefig(out / "hierarchical_ou.png", dpi=100)
    print(f"figure: {out / 'hierarchical_ou.png'}")


if __name__ == "__main__":
    main()
