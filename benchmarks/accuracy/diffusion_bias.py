"""Variational EM of a diffusion scale: the mean-shift guide against the learned increment
covariance, at three step sizes (issue "Beyond the mean shift").

**The problem**: a random walk plus noise, ``dX = σ dW``, ``x_0 ~ N(0, 1)``, observed at unit
spacing ``y_j ~ N(x(j), 1)`` for ``j = 1, ..., 30``; one series simulated exactly with
``σ = 1`` (``RandomWalk`` in ``tests/test_covariance.py``). The model learns ``σ`` as a
``pyro.param`` jointly with an affine :class:`~pyro_nsde.GirsanovGuide` (``Trace_ELBO`` with 16
vectorized particles, 3000 steps of Adam at lr 0.05 decaying to 0.005).

**The references** (``tests/reference.py``, exact): the maximum-likelihood ``σ̂`` maximizes
``log p(y; σ)``; the best a mean-shift guide can do maximizes ``log p(y; σ) - gap(σ)``, where
``gap`` is the part of the KL no mean shift can remove on that grid. With ``covariance="full"``
the exact posterior is in the family, so variational EM is exact EM and finds ``σ̂``.

The table reports, per step and guide: the learned ``σ``, the exact optimum of that guide's
family, the bias of the learned ``σ`` and of ``σ²`` against ``σ̂``, and the ELBO gap
``log p(y; σ̂) - ELBO`` at the end of training (ELBO from 4000 particles). The plot shows the
variance bias against the step for both guides, with the exact mean-shift optimum on a finer
range of steps.

Run (about 10 minutes on one core)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy/diffusion_bias.py
"""

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))

from test_covariance import RandomWalk  # noqa: E402
from test_guide import estimate_elbo, fit  # noqa: E402

GUIDES = {"mean shift": "prior", "full covariance": "full"}


def measure(step, *, end_time, noise, steps):
    """Exact references and both guides' learned ``σ`` and ELBO at one step size."""
    problem = RandomWalk(step=step, end_time=end_time, noise=noise)
    mle = problem.argmax(problem.log_evidence)
    rows = []
    for name, covariance in GUIDES.items():
        optimum = mle if covariance == "full" else problem.argmax(problem.mean_shift_elbo)
        start = time.perf_counter()
        y = problem.y.float()
        guide = fit(problem.model, y, steps=steps, decay=0.1, covariance=covariance)
        seconds = time.perf_counter() - start
        learned = pyro.param("scale").item()
        elbo = estimate_elbo(problem.model, guide, y)
        rows.append(
            {
                "step": step,
                "K": len(problem.times) - 1,
                "guide": name,
                "learned": learned,
                "optimum": optimum,
                "mle": mle,
                "bias": learned / mle - 1,
                "variance bias": (learned / mle) ** 2 - 1,
                "elbo gap": problem.log_evidence(mle) - elbo.mean,
                "elbo stderr": elbo.stderr,
                "seconds": seconds,
            }
        )
    return rows


def plot(rows, reference_steps, reference_bias, path):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(
        reference_steps,
        [100 * b for b in reference_bias],
        "-",
        color="C0",
        alpha=0.5,
        label="mean shift, exact optimum",
    )
    for color, name in zip(("C0", "C1"), GUIDES, strict=True):
        mine = [r for r in rows if r["guide"] == name]
        ax.plot(
            [r["step"] for r in mine],
            [100 * r["variance bias"] for r in mine],
            "o",
            color=color,
            label=f"{name}, learned",
        )
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("Euler–Maruyama step h")
    ax.set_ylabel("bias of learned σ² vs MLE (%)")
    ax.set_title("Variational EM of a diffusion: random walk + noise")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-sizes", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--end-time", type=int, default=30)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps per fit")
    parser.add_argument("--plot", type=Path, default=HERE / "diffusion_bias.png")
    args = parser.parse_args(argv)

    rows = []
    print(
        "| step h | K | guide | learned σ | exact optimum σ | MLE σ̂ | σ bias | σ² bias "
        "| ELBO gap to log p(y; σ̂) (nats) | fit seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for step in args.step_sizes:
        for r in measure(step, end_time=args.end_time, noise=args.noise, steps=args.steps):
            rows.append(r)
            print(
                f"| {r['step']} | {r['K']} | {r['guide']} | {r['learned']:.3f} "
                f"| {r['optimum']:.3f} | {r['mle']:.3f} | {100 * r['bias']:+.1f} % "
                f"| {100 * r['variance bias']:+.1f} % "
                f"| {r['elbo gap']:.2f} ± {r['elbo stderr']:.2f} | {r['seconds']:.0f} |",
                flush=True,
            )
    reference_steps = [1.0, 0.5, 0.25, 0.125]
    reference_bias = []
    for step in reference_steps:
        problem = RandomWalk(step=step, end_time=args.end_time, noise=args.noise)
        ratio = problem.argmax(problem.mean_shift_elbo) / problem.argmax(problem.log_evidence)
        reference_bias.append(ratio**2 - 1)
    print(
        "exact mean-shift optimum, σ² bias by step: "
        + ", ".join(
            f"h={s}: {100 * b:+.1f} %" for s, b in zip(reference_steps, reference_bias, strict=True)
        )
    )
    plot(rows, reference_steps, reference_bias, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
