"""Adam steps until an affine :class:`~pyro_nsde.GirsanovGuide` is within 0.1 nats of the best
ELBO a mean-shift guide can reach, at three learning rates.

**The problem** (the lead's reference setting, in ``tests/test_guide.py``'s ``LinearProblem``):
the Ornstein–Uhlenbeck SDE ``dX = -X dt + 0.7 dW`` on ``[0, 2]`` with ``K = 40`` Euler–Maruyama
steps (``h = 0.05``), ``x_0 ~ N(0, 1)``, and 8 precise observations ``y_j ~ N(x_{5j}, 0.1²)``
with ``y_j = sin(3 t_j)``. The exact reference (``tests/reference.py``) gives ``log p(y)`` and
the mean-shift gap ``log p(y) - max ELBO`` (6.13 nats here: precise observations make the
posterior step covariance much smaller than the prior's).

**The run**: ``control="affine"``, ``Trace_ELBO(num_particles=16, vectorize_particles=True)``,
plain ``pyro.optim.Adam`` at a constant learning rate (0.01, 0.02, 0.05). Every ``--every``
steps the ELBO is estimated with ``--eval-particles`` particles (importance weights, so the
value is the exact ``Trace_ELBO`` average); the table reports the first step at which it is
within 0.1 nats of the mean-shift optimum, and the gap there.

Run (about 5-10 minutes on one core)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy/convergence.py
"""

import argparse
import sys
import time
from pathlib import Path

import pyro
from pyro.infer import SVI, Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_guide import LinearProblem, estimate_elbo

from pyro_nsde import GirsanovGuide

PROBLEM = LinearProblem(((-1.0,),), ((0.7,),), ((1.0,),), "diagonal", 40, 5, 0.1, end_time=2.0)


def steps_to_tolerance(lr, *, max_steps, every, tolerance, particles, eval_particles, seed):
    """Train until the estimated ELBO is within ``tolerance`` of the mean-shift optimum.

    :returns: ``(steps, gap, seconds)``; ``steps`` is ``None`` if ``max_steps`` was not enough,
        ``gap`` the optimum minus the last ELBO estimate.
    """
    post = PROBLEM.posterior
    best = post.log_py - post.mean_shift_gap()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = GirsanovGuide(PROBLEM.model, control="affine")
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True)
    svi = SVI(PROBLEM.model, guide, pyro.optim.Adam({"lr": lr}), elbo)
    start = time.perf_counter()
    gap = float("nan")
    for step in range(1, max_steps + 1):
        svi.step(PROBLEM.y)
        if step % every == 0:
            estimate = estimate_elbo(PROBLEM.model, guide, PROBLEM.y, num_samples=eval_particles)
            gap = best - estimate.mean
            if gap < tolerance:
                return step, gap, time.perf_counter() - start
    return None, gap, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--eval-particles", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    post = PROBLEM.posterior
    print(
        f"OU, K={PROBLEM.num_steps}, {len(PROBLEM.obs_steps)} observations (noise "
        f"{PROBLEM.noise}): log p(y) = {post.log_py:.4f}, mean-shift gap = "
        f"{post.mean_shift_gap():.4f} nats"
    )
    print(f"| lr | Adam steps to {args.tolerance} nats | gap there (nats) | seconds |")
    print("|---|---|---|---|")
    for lr in args.lrs:
        steps, gap, seconds = steps_to_tolerance(
            lr,
            max_steps=args.max_steps,
            every=args.every,
            tolerance=args.tolerance,
            particles=args.particles,
            eval_particles=args.eval_particles,
            seed=args.seed,
        )
        shown = f"> {args.max_steps}" if steps is None else str(steps)
        print(f"| {lr} | {shown} | {gap:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
