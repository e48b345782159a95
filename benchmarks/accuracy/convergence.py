"""SVI steps and wall time until an affine or linear :class:`~pyro_nsde.GirsanovGuide` is
within 0.05 nats of the best ELBO of its family, from its default start (the Laplace / Kalman
fit of the path, ``init_path="laplace"``) and from the prior (``init_path="prior"``, the start
before issue 14).

**Problems** (``tests/test_guide.py``'s ``LinearProblem``: ``dX = A X dt + G dW``,
``x_0 ~ N(0, I)``, observations ``y_j ~ N(H x_{k_j}, noise² I)``; exact references from
``tests/reference.py``):

- ``ou``: ``dX = -X dt + 0.7 dW`` on ``[0, 2]``, 40 steps, 8 observations with noise 0.1;
- ``ou3``: a 3-D OU with general noise (``G`` 3 × 3), observed through a 2 × 3 ``H``, on a
  non-uniform grid of 300 steps over ``[0, 3]``, 30 observations with noise 0.05;
- ``oscillator``: position–velocity, noise on the velocity only (rank-deficient ``G``), the
  position observed, non-uniform 200 steps over ``[0, 4]``, noise 0.02;
- ``far``: the ``ou`` problem with the data moved to ``8 + sin(3 t)``, eight prior sds away.

**Best ELBO of the family**: ``log p(y)`` for ``covariance="full"`` (the exact posterior is in
the family); for ``"prior"`` the mean-shift optimum ``log p(y) - gap`` less what a diagonal
``q(x_0)`` loses. **Optimizer**: what :func:`pyro_nsde.fit_svi` does with ``steps`` steps
(ClippedAdam, lr 0.03 decaying to 0.003 over the run, 8 vectorized particles); ``--steps``
steps from the Laplace start, ``--prior-steps`` from the prior. Every ``--every`` steps the
ELBO is estimated from ``--eval-particles`` importance weights (exact ``Trace_ELBO``
average); the table gives the first such step within 0.05 nats and the training wall time to
it (evaluation excluded).

Run (about 15 minutes on one core)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy/convergence.py
"""

import argparse
import sys
import time
from functools import cached_property
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from reference import mean_field_init_gap
from test_guide import LinearProblem, estimate_elbo

from pyro_nsde import GirsanovGuide

TOLERANCE = 0.05


class NonUniform(LinearProblem):
    """A :class:`LinearProblem` on a fixed random non-uniform grid (steps vary by 3×)."""

    @cached_property
    def times(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        steps = 0.5 + torch.rand(self.num_steps, generator=generator)
        times = torch.cat([torch.zeros(1), torch.cumsum(steps, 0)])
        return times / times[-1] * self.end_time


class FarData(LinearProblem):
    """A :class:`LinearProblem` with the data moved by ``offset`` from the prior."""

    offset = 8.0

    @cached_property
    def y(self) -> torch.Tensor:
        return super().y + self.offset


PROBLEMS = {
    "ou": LinearProblem(((-1.0,),), ((0.7,),), ((1.0,),), "diagonal", 40, 5, 0.1, end_time=2.0),
    "ou3": NonUniform(
        ((-1.0, 0.5, 0.0), (-0.3, -0.8, 0.2), (0.1, 0.0, -0.5)),
        ((0.5, 0.1, 0.0), (0.2, 0.6, 0.1), (0.1, 0.3, 0.4)),
        ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),
        "general",
        300,
        10,
        0.05,
        end_time=3.0,
    ),
    "oscillator": NonUniform(
        ((0.0, 1.0), (-4.0, -0.2)),
        ((0.0,), (0.8,)),
        ((1.0, 0.0),),
        "general",
        200,
        10,
        0.02,
        end_time=4.0,
    ),
    "far": FarData(((-1.0,),), ((0.7,),), ((1.0,),), "diagonal", 40, 5, 0.1, end_time=2.0),
}


def best_elbo(problem: LinearProblem, covariance: str) -> float:
    post = problem.posterior
    if covariance == "full":
        return post.log_py
    return post.log_py - post.mean_shift_gap() - mean_field_init_gap(post)


def run(problem, control, covariance, init_path, *, steps, every, eval_particles, seed):
    """Returns ``(first step within TOLERANCE or None, training seconds to it, gap at step 0,
    last gap)``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = GirsanovGuide(
        problem.model, control=control, covariance=covariance, init_path=init_path
    )
    start = time.perf_counter()
    guide(problem.y)  # set up (the Laplace fit, for init_path="laplace") counts as training
    seconds = time.perf_counter() - start
    best = best_elbo(problem, covariance)

    def gap():
        return (
            best - estimate_elbo(problem.model, guide, problem.y, num_samples=eval_particles).mean
        )

    first = gap()
    if first < TOLERANCE:
        return 0, seconds, first, first
    optim = pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.1 ** (1 / steps), "clip_norm": 10.0})
    svi = SVI(problem.model, guide, optim, Trace_ELBO(num_particles=8, vectorize_particles=True))
    last = first
    for step in range(1, steps + 1):
        begin = time.perf_counter()
        svi.step(problem.y)
        seconds += time.perf_counter() - begin
        if step % every == 0:
            last = gap()
            if last < TOLERANCE:
                return step, seconds, first, last
    return None, seconds, first, last


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--controls", default="affine,linear")
    parser.add_argument("--covariances", default="prior,full")
    parser.add_argument("--steps", type=int, default=500, help="steps from the Laplace start")
    parser.add_argument("--prior-steps", type=int, default=1500, help="steps from the prior")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--eval-particles", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        f"steps to within {TOLERANCE} nats of the family's best ELBO (checked every {args.every})"
    )
    print(
        "| problem | control | covariance | start | gap at step 0 | steps | train s | final gap |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.problems.split(","):
        for control in args.controls.split(","):
            for covariance in args.covariances.split(","):
                for init_path, steps in (("laplace", args.steps), ("prior", args.prior_steps)):
                    found, seconds, first, last = run(
                        PROBLEMS[name],
                        control,
                        covariance,
                        init_path,
                        steps=steps,
                        every=args.every,
                        eval_particles=args.eval_particles,
                        seed=args.seed,
                    )
                    reached = f"> {steps}" if found is None else str(found)
                    print(
                        f"| {name} | {control} | {covariance} | {init_path} | {first:.3f} | "
                        f"{reached} | {seconds:.1f} | {last:.3f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
