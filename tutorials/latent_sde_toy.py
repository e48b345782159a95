"""Li et al.'s 1-D latent SDE toy: a posterior over paths through a few points of a cosine.

The prior is an Ornstein–Uhlenbeck process started at its stationary law,

    ``dX = θ (μ - X) dt + σ dW``,  ``X_0 ~ N(μ, σ² / 2θ)``,  ``θ = 1``, ``μ = 0``, ``σ = 0.5``,

and 20 points of ``y = cos(2π t)`` are observed in two segments, ``t ∈ [0.3, 0.8]`` and
``[1.2, 1.5]``, with a Laplace likelihood of scale 0.05 (Li et al. 2020, section 7.1; torchsde's
``examples/latent_sde.py``). The posterior path law is learned by a
:class:`~pyro_nsde.GirsanovGuide` whose control is a posterior-drift network over the state and
time features (:class:`~pyro_nsde.zoo.nn.PosteriorDriftControl`, frequencies 1, 2, 4, 8), on the
Euler–Maruyama grid through the observation times (:class:`~pyro_nsde.zoo.series.GriddedSeries`,
step ≤ 0.01 on ``[0, 2]``). The posterior is tight on the data and spreads out between the
segments and beyond them, back towards the prior.

The KL term is annealed from 0 to 1 over the first iterations with ``poutine.scale`` on the
path site, in the model *and* in the guide (see ``docs/neural_sdes.md``): the ELBO optimized
early on is ``E_q[log p(y | x)] - β KL(q ‖ p)``. The reported ELBO is always the full one
(``β = 1``).

Run::

    python tutorials/latent_sde_toy.py --out tutorial_outputs
    PYRO_NSDE_FAST=1 python tutorials/latent_sde_toy.py --out /tmp/toy   # a quick run (CI)

Writes ``latent_sde_toy.png`` (prior and posterior bands, sample paths and the data) and
``latent_sde_toy.json`` (the ELBO before and after training, timings) to ``--out``.

**References:**

[1] Xuechen Li, Ting-Kam Leonard Wong, Ricky T. Q. Chen, David Duvenaud (2020), "Scalable
    Gradients for Stochastic Differential Equations", AISTATS.
"""

import argparse
import json
import math
import os
import pathlib
import time

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.zoo.nn import PosteriorDriftControl
from pyro_nsde.zoo.series import GriddedSeries

FAST = os.environ.get("PYRO_NSDE_FAST") == "1"
THETA, MU, SIGMA, SCALE = 1.0, 0.0, 0.5, 0.05
SETTINGS = {  # (max_step, particles, steps, anneal steps, hidden, lr, draws for the figure)
    False: (0.01, 256, 2000, 100, (200, 200), 0.01, 1024),
    True: (0.02, 16, 120, 30, (64, 64), 0.02, 256),
}


def segmented_cosine() -> GriddedSeries:
    """20 points of ``cos(2π t)`` on ``[0.3, 0.8] ∪ [1.2, 1.5]``, on a grid over ``[0, 2]``."""
    times = torch.cat([torch.linspace(0.3, 0.8, 10), torch.linspace(1.2, 1.5, 10)])
    values = torch.cos(2 * math.pi * times)
    max_step = SETTINGS[FAST][0]
    return GriddedSeries.from_series([times], [values], max_step=max_step, start=0.0, end=2.0)


def ou_drift(t, x):
    return THETA * (MU - x)


def model(data: GriddedSeries, kl_scale: float = 1.0):
    stationary = dist.Normal(torch.full((1,), MU), SIGMA / math.sqrt(2 * THETA)).to_event(1)
    with pyro.plate("series", data.num_series):
        prior = EulerMaruyama(
            lambda t, x: THETA * (MU - x), torch.tensor([SIGMA]), stationary, data.times
        )
        with poutine.scale(scale=kl_scale):
            x = pyro.sample("x", prior)
        likelihood = dist.Laplace(x, SCALE).mask(data.mask).to_event(2)
        pyro.sample("y", likelihood, obs=data.values)


def elbo(guide, data, num_particles=512) -> float:
    """The full ELBO (``β = 1``), estimated with many particles."""
    loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    with torch.no_grad():
        return -loss.loss(model, guide, data)


def plot(data, prior_paths, posterior_paths, path):
    times = data.times.numpy()
    seen = data.mask[0, :, 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, paths, title in (
        (axes[0], prior_paths, "prior"),
        (axes[1], posterior_paths, "posterior"),
    ):
        draws = paths[:, 0, :, 0].numpy()
        for level, alpha in ((0.99, 0.15), (0.9, 0.25), (0.5, 0.35)):
            low, high = torch.tensor(draws).quantile(
                torch.tensor([(1 - level) / 2, (1 + level) / 2]), dim=0
            )
            ax.fill_between(
                times, low, high, color="C0", alpha=alpha, lw=0, label=f"{int(level * 100)} % band"
            )
        for j in range(3):
            ax.plot(times, draws[j], color="C1", lw=0.8, label="sample paths" if j == 0 else None)
        ax.scatter(
            times[seen], data.values[0, seen, 0], marker="x", color="k", zorder=3, label="data"
        )
        ax.set_title(title)
        ax.set_xlabel("$t$")
        ax.set_ylim(-1.75, 1.75)
    axes[0].set_ylabel("$x_t$")
    axes[1].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: pathlib.Path, seed: int = 0):
    out.mkdir(parents=True, exist_ok=True)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    _, particles, steps, anneal, hidden, lr, draws = SETTINGS[FAST]
    data = segmented_cosine()
    control = PosteriorDriftControl(
        ou_drift,
        torch.tensor([SIGMA]),
        1,
        hidden_dims=hidden,
        time_frequencies=(1.0, 2.0, 4.0, 8.0),
    )
    guide = GirsanovGuide(model, control=control)

    def annealed_guide(data, kl_scale=1.0):
        with poutine.scale(scale=kl_scale):
            return guide(data, kl_scale)

    elbo_before = elbo(guide, data)
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)})
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True)
    svi = SVI(model, annealed_guide, optim, loss)
    start = time.perf_counter()
    for step in range(steps):
        kl_scale = min(1.0, (step + 1) / anneal)
        value = svi.step(data, kl_scale)
        if step % max(1, steps // 10) == 0:
            print(f"step {step:5d}  annealed loss {value:10.2f}  KL weight {kl_scale:.2f}")
    seconds = (time.perf_counter() - start) / steps
    elbo_after = elbo(guide, data)
    print(f"ELBO {elbo_before:.2f} -> {elbo_after:.2f}  ({seconds * 1e3:.1f} ms per SVI step)")

    with torch.no_grad():
        prior_paths = Predictive(model, num_samples=draws, parallel=True)(data)["x"]
        posterior_paths = Predictive(model, guide=guide, num_samples=draws, parallel=True)(data)[
            "x"
        ]
    plot(data, prior_paths, posterior_paths, out / "latent_sde_toy.png")
    summary = {
        "fast": FAST,
        "grid_steps": data.num_steps,
        "svi_steps": steps,
        "particles": particles,
        "elbo_before": elbo_before,
        "elbo_after": elbo_after,
        "seconds_per_step": seconds,
    }
    (out / "latent_sde_toy.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'latent_sde_toy.png'} and {out / 'latent_sde_toy.json'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tutorial_outputs"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.out, args.seed)
