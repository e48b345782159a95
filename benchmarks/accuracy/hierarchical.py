"""Hierarchical SDEs: accuracy and time against the number of series.

A population of Ornstein–Uhlenbeck series (``pyro_nsde.zoo.hierarchical.HierarchicalOU``: each
series its own rate, ``log θ_i ~ N(m, s²)``, 1000 Euler–Maruyama steps, observed every 10 steps
with noise), fitted with ``GirsanovGuide(model)`` and ``fit_svi`` defaults, the population's
posterior compared with the exact one (a Kalman filter per series and quadrature): ``z`` is the
error of the posterior mean in exact sds, ``ratio`` the sd over the exact sd (the acceptance
bands: ``|z| < 0.5``, ratio in 0.75–1.33). The time splits into the guide's set-up (the paths'
reference fits and the population start: each series' likelihood on its nodes) and SVI.

    python benchmarks/accuracy/hierarchical.py                      # 100 and 1000 series
    python benchmarks/accuracy/hierarchical.py --series 10000 --subsample 1000

Run on one core (``OMP_NUM_THREADS=1 taskset -c 0``) for the numbers in benchmarks/README.md.
"""

import argparse
import time

import pyro
import torch

from pyro_nsde import GirsanovGuide, fit_svi
from pyro_nsde.zoo.hierarchical import HierarchicalOU


def population_draws(guide, num_samples=4000):
    with torch.no_grad():
        z = guide.latent_guide.global_guide.get_posterior().sample((num_samples,))
    return {"m": z[:, 0].double(), "s": z[:, 1].exp().double()}


def compare(draws, exact):
    cells = []
    for name, (mean, sd) in exact.items():
        z = (float(draws[name].mean()) - mean) / sd
        cells.append(f"{z:+.2f} / {float(draws[name].std()) / sd:.2f}")
    return cells


def run(num_series, num_steps, subsample, seed):
    zoo = HierarchicalOU(num_series, num_steps, 10.0 / num_steps, 10, subsample_size=subsample)
    y, _ = zoo.simulate(m=0.0, s=0.5, seed=seed)
    start = time.perf_counter()
    exact = zoo.population_posterior(y)
    exact_time = time.perf_counter() - start
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = GirsanovGuide(zoo.model)
    start = time.perf_counter()
    guide(y)
    setup = time.perf_counter() - start
    at_start = compare(population_draws(guide), exact)
    start = time.perf_counter()
    losses = fit_svi(zoo.model, guide, y, progress=False)
    fit = time.perf_counter() - start
    after = compare(population_draws(guide), exact)
    exact_cells = [f"{mean:.3f} ± {sd:.3f}" for mean, sd in exact.values()]
    return [
        str(num_series),
        str(subsample or "all"),
        *exact_cells,
        *at_start,
        *after,
        f"{setup:.1f}",
        f"{fit:.1f} ({len(losses)})",
        f"{setup + fit:.1f}",
        f"{exact_time:.1f}",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--subsample", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header = [
        "series",
        "per step",
        "exact m",
        "exact s",
        "start m z / ratio",
        "start s z / ratio",
        "fit m z / ratio",
        "fit s z / ratio",
        "set-up s",
        "SVI s (steps)",
        "total s",
        "exact s",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for num_series in args.series:
        row = run(num_series, args.steps, args.subsample, args.seed)
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
