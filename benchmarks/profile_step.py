"""Where one SVI step of the demo goes: milliseconds per step and a breakdown by phase.

The demo's model (stochastic Lotka–Volterra on the lynx–hare pelts 1900–1920, 100
Euler–Maruyama steps, 8 parameters) with ``Trace_ELBO(num_particles=8,
vectorize_particles=True)`` and a guide given on the command line (default: the documented
guide, ``GirsanovGuide(model)``'s defaults). After warm-up steps, ``--steps`` steps are timed
without a profiler, then profiled with :mod:`cProfile`; the table gives, per phase, the
cumulative time of the functions that make it up (phases overlap where one calls another:
the Kalman smoother is part of the conditional's inputs).

Runs against any checkout of pyro-nsde (``PYTHONPATH=/path/to/checkout``), so that the
profile before and after a change can be taken in one session::

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --guide '{"control": "affine",
        "covariance": "full", "latents": "multivariate"}'
"""

import argparse
import cProfile
import json
import pstats
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_nsde import GirsanovGuide, datasets

try:  # the package layout before issue 21
    from pyro_nsde.models import LotkaVolterra
except ImportError:
    from pyro_nsde.zoo.models import LotkaVolterra

#: Phases: a name and the ``(file suffix, function name)`` pairs whose cumulative time it is.
PHASES = {
    "guide (all)": [("guide.py", "forward")],
    "  prior at the site (model run)": [("guide.py", "prior")],
    "  conditional's inputs (Kalman)": [
        ("conditionals.py", "_kalman_base"),
        ("guide.py", "_kalman_base"),
    ],
    "    Kalman smoother": [("kalman.py", "smooth")],
    "    linearization + likelihood sites": [
        ("laplace.py", "linearize"),
        ("laplace.py", "quadratic_sites"),
    ],
    "  path sampling": [("girsanov.py", "rsample")],
    "  Laplace refreshes": [("guide.py", "refresh")],
    "model trace": [("models.py", "__call__")],
    "backward pass": [("~", "<method 'run_backward' of 'torch._C._EngineBase' objects>")],
    "torch.broadcast_shapes": [("functional.py", "broadcast_shapes")],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guide", default="{}", help="GirsanovGuide options as JSON")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--no-validation", action="store_true", help="pyro validation off")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    pyro.enable_validation(not args.no_validation)
    data = datasets.lynx_hare()
    model = LotkaVolterra(data.times - data.times[0], data.values[0].log(), steps_per_unit=5.0)
    guide = GirsanovGuide(model, **json.loads(args.guide))
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=2)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.01}), elbo)
    for _ in range(args.warmup):
        svi.step(data.values)
    start = time.perf_counter()
    for _ in range(args.steps):
        svi.step(data.values)
    per_step = 1000 * (time.perf_counter() - start) / args.steps
    profile = cProfile.Profile()
    profile.runcall(lambda: [svi.step(data.values) for _ in range(args.steps)])
    stats = pstats.Stats(profile).stats
    total = sum(row[2] for row in stats.values())  # total internal time
    print(f"guide options {args.guide}; validation {'off' if args.no_validation else 'on'}")
    print(f"{per_step:.1f} ms per step without the profiler ({args.steps} steps)\n")
    print("| phase | ms per step (profiled) | share |")
    print("|---|---:|---:|")
    for phase, functions in PHASES.items():
        cumulative = sum(
            row[3]
            for (path, _, name), row in stats.items()
            if any(path.endswith(suffix) and name == function for suffix, function in functions)
        )
        ms = 1000 * cumulative / args.steps
        print(f"| {phase} | {ms:.1f} | {cumulative / total:.0%} |")
    print(f"| profiled step | {1000 * total / args.steps:.1f} | 100% |")


if __name__ == "__main__":
    main()
