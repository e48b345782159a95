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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--draws", type=int, nargs="+", default=[100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"K = {STEPS}, d = {STATE}, MLP width {WIDTH}, threads {torch.get_num_threads()}")
    print(
        "| B | full ms/step | " + " | ".join(f"R={r} ms/step (speed-up)" for r in args.draws) + " |"
    )
    print("|---|---|" + "---|" * len(args.draws))
    options = {"control": "linear", "conditional": None, "init_path": "prior"}
    for batch in args.batch:
        pyro.clear_param_store()
        model, y, _ = make_model(batch)
        elbo = Trace_ELBO(max_plate_nesting=1)
        guide = GirsanovGuide(model, **options)
        svis = {"full": SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)}
        for num in args.draws:
            guide = GirsanovGuide(model, subsample_steps=num, **options)
            subsampled = subsample_steps(model, num)
            svis[num] = SVI(subsampled, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
        for svi in svis.values():
            svi.step(y)  # set up, warm
        ms = time_steps(svis, y, args.rounds, args.steps)
        cells = [f"{ms[num]:.0f} ({ms['full'] / ms[num]:.1f}x)" for num in args.draws]
        print(f"| {batch} | {ms['full']:.0f} | " + " | ".join(cells) + " |", flush=True)
    model, y, net = make_model(1)
    sds = estimate_sd(model, y, net, sorted({10, 25, 50, 100, 200, 500, *args.draws}))
    print("sd of the subsampled log p(path) of one path (K = 1000, d = 8):")
    print("  " + ", ".join(f"R={num}: {sd:.1f}" for num, sd in sds.items()))


if __name__ == "__main__":
    main()
