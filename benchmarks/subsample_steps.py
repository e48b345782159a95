"""One SVI step of a neural SDE with and without time subsampling (issue 23).

A latent SDE with an MLP drift (``DriftNet``, width 64, learned with ``pyro.module``), a learned
constant diagonal diffusion, ``d = 8``, ``K = 1000`` Euler–Maruyama steps and ``B`` series,
observed every 10 steps; the guide is the Gauss–Markov family ``GirsanovGuide(model,
control="linear")`` (path drawn by the parallel scan; its coefficients learned, not re-fitted; with
``subsample_steps=R`` for the subsampled model).
Timed in the same process, interleaved: ``SVI(model, guide)`` against
``SVI(subsample_steps(model, R), guide)``, milliseconds per step (median of rounds), and the
standard deviation of the subsampled estimate of ``log p(path)`` for one path against ``R``.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/subsample_steps.py
    python benchmarks/subsample_steps.py --batch 16 512 --draws 50 100 200
"""

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_nsde import EulerMaruyama, GirsanovGuide, subsample_steps
from pyro_nsde.sde.subsample import SubsampledEulerMaruyama
from pyro_nsde.zoo.nn import DriftNet

STATE, STEPS, WIDTH = 8, 1000, 64


def make_model(batch):
    times = torch.linspace(0.0, 10.0, STEPS + 1)
    obs = torch.arange(10, STEPS + 1, 10)
    drift_net = DriftNet(STATE, (WIDTH, WIDTH))

    def model(y):
        net = pyro.module("drift", drift_net)
        scale = pyro.param("sigma", torch.full((STATE,), 0.5), constraint=dist.constraints.positive)
        with pyro.plate("series", batch, dim=-1):
            init = dist.Normal(torch.zeros(STATE), 1.0).to_event(1)
            x = pyro.sample("x", EulerMaruyama(net, scale, init, times))
            pyro.sample("y", dist.Normal(x[..., obs, :], 0.1).to_event(2), obs=y)

    y = torch.randn(batch, len(obs), STATE).cumsum(1) * 0.1
    return model, y, drift_net


def time_steps(svis, y, rounds, steps):
    times = {name: [] for name in svis}
    for _ in range(rounds):
        for name, svi in svis.items():
            start = time.perf_counter()
            for _ in range(steps):
                svi.step(y)
            times[name].append((time.perf_counter() - start) / steps * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def estimate_sd(model, y, net, draws, repeats=200):
    """The sd of the subsampled ``log p(path)`` of one path, per ``R``, with the drift
    network's weights drawn at random (its last layer starts at zero)."""
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.05)
    trace = poutine.trace(model).get_trace(y)
    law = trace.nodes["x"]["fn"]
    while not isinstance(law, EulerMaruyama):
        law = law.base_dist
    with torch.no_grad():
        path = law.sample()[:1].clone()
        law = law.expand(torch.Size([1]))
        result = {}
        for num in draws:
            sub = SubsampledEulerMaruyama(law, num)
            values = torch.stack([sub.log_prob(path) for _ in range(repeats)])
            result[num] = float(values.std())
    return result


#: The Gauss–Markov families timed: the guide's default (full gains and step covariances) and
#: the cheap one (``gain="diagonal"``, diagonal step covariances).
FAMILIES = {
    "full": {"gain": "full", "covariance": "full"},
    "diagonal": {"gain": "diagonal", "covariance": "diagonal"},
}


def svi_of(model, y, family, num=None):
    """A warmed-up ``SVI`` of the model (subsampled to ``num`` steps) and a guide of
    ``family``, with parameters of its own."""
    pyro.clear_param_store()
    options = {"control": "linear", "conditional": None, "init_path": "prior", **FAMILIES[family]}
    guide = GirsanovGuide(model, subsample_steps=num, **options)
    target = model if num is None else subsample_steps(model, num)
    elbo = Trace_ELBO(max_plate_nesting=1)
    svi = SVI(target, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    svi.step(y)  # set up, warm
    store = pyro.get_param_store().get_state()

    def step(y):
        pyro.get_param_store().set_state(store)
        return svi.step(y)

    return argparse.Namespace(step=step)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--draws", type=int, nargs="+", default=[100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"K = {STEPS}, d = {STATE}, MLP width {WIDTH}, threads {torch.get_num_threads()}")
    print("ms per SVI step (speed-up against the full family on all steps):")
    columns = [(family, num) for family in FAMILIES for num in (None, *args.draws)]
    names = [f"{family} {'all steps' if num is None else f'R={num}'}" for family, num in columns]
    print("| B | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(columns))
    for batch in args.batch:
        model, y, _ = make_model(batch)
        svis = {column: svi_of(model, y, *column) for column in columns}
        ms = time_steps(svis, y, args.rounds, args.steps)
        base = ms[("full", None)]
        cells = [f"{ms[column]:.0f} ({base / ms[column]:.1f}x)" for column in columns]
        print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)
    model, y, net = make_model(1)
    sds = estimate_sd(model, y, net, sorted({10, 25, 50, 100, 200, 500, *args.draws}))
    print("sd of the subsampled log p(path) of one path (K = 1000, d = 8):")
    print("  " + ", ".join(f"{name}: {sd:.1f}" for name, sd in sds.items()))


if __name__ == "__main__":
    main()
