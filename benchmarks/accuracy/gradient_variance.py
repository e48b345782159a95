"""Per-particle variance of the ELBO gradient for the three estimators of
:class:`~pyro_nsde.GirsanovGuide` (``"girsanov"``, ``"plain"``, ``"stl"``).

**The problems** (``tests/test_guide.py``): ``ou``, a 1-D Ornstein–Uhlenbeck SDE with 10 steps
and 5 observations (noise 0.3); ``oscillator``, a position–velocity system with noise on the
velocity only (``G`` is ``(2, 1)``), same grid, position observed. Affine control, covariance
``"prior"`` (mean shift) or ``"full"``.

**The points**: ``random``, random coefficients, increment scales and ``q(x_0)``
(``random_affine_guide`` in ``tests/test_girsanov_estimators.py``); ``optimum``, the best member
of the family, computed exactly (the smoother's transition means, with its step covariances
for ``"full"``).

**The measure**: the gradient of ``Trace_ELBO`` with respect to all unconstrained guide
parameters, averaged over batches of 50 vectorized particles; the trace of the per-particle
covariance is ``50 × Σ_j Var(batch mean_j)``, from ``--batches`` batches. All three estimators
have the same expectation (tested in ``tests/test_girsanov_estimators.py``).

Run (about a minute on one core)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy/gradient_variance.py
"""

import argparse
import sys
from pathlib import Path

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_girsanov_estimators import (
    ESTIMATORS,
    gradient_batches,
    per_particle_variance,
    random_affine_guide,
    set_to_optimum,
)
from test_guide import OSCILLATOR, OU

PROBLEMS = {"ou": OU, "oscillator": OSCILLATOR}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args(argv)
    print("| problem | covariance | point | " + " | ".join(ESTIMATORS) + " |")
    print("|---|---|---|" + "---|" * len(ESTIMATORS))
    for name, problem in PROBLEMS.items():
        for covariance in ("prior", "full"):
            for point in ("random", "optimum"):
                cells = []
                for estimator in ESTIMATORS:
                    guide = random_affine_guide(problem, covariance, estimator)
                    if point == "optimum":
                        set_to_optimum(problem, guide)
                    pyro.set_rng_seed(0)
                    batches = gradient_batches(
                        problem.model, guide, problem.y, num_batches=args.batches
                    )
                    cells.append(f"{per_particle_variance(batches):.4g}")
                print(
                    f"| {name} | {covariance} | {point} | " + " | ".join(cells) + " |", flush=True
                )


if __name__ == "__main__":
    main()
