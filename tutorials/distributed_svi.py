"""Data-parallel SVI on many series with ``torch.distributed``.

Each of ``P`` processes holds a shard of ``N`` Ornstein–Uhlenbeck series that share one drift
rate ``θ``:

    ``θ ~ LogNormal(0, 0.5)``,  ``dX_s = -θ X_s dt + σ dW_s``,  ``X_s(0) ~ N(0, 1)``,
    ``y_{s,j} ~ N(X_s(t_j), 0.1²)``,  ``s = 1, ..., N``,

discretized by Euler–Maruyama on ``K`` steps. The model's plate over series has the global
size ``N`` and takes this process's series as ``subsample=idx``, so Pyro scales the shard's
terms by ``N / n_i``; :class:`~pyro_nsde.app.distributed.DataParallelSVI` averages the gradients
(weights ``n_i / N``) so every process takes the step of the full-data ELBO and the parameters
stay identical everywhere (see :mod:`pyro_nsde.app.distributed`).

Run on CPU with two processes (``gloo``), on two GPUs (``nccl``), or as one plain process::

    torchrun --standalone --nproc_per_node=2 tutorials/distributed_svi.py
    torchrun --standalone --nproc_per_node=2 tutorials/distributed_svi.py --device cuda
    python tutorials/distributed_svi.py

The data are simulated from the prior with ``θ = 1.5`` and the same seed on every process (a
real job would load only its shard). Process 0 prints the loss per series and the posterior
median of ``θ`` as it trains (it approaches the simulated value slowly: the pure mean-shift
guide needs on the order of a thousand steps), and a last line of JSON with the timing
(``series_per_second`` counts every series of every step, after ``--warmup`` steps), which
``benchmarks/distributed_scaling.py`` reads.
"""

import argparse
import json
import math
import os
import time

import pyro
import pyro.distributions as dist
import torch
import torch.distributed
from pyro.infer import Trace_ELBO

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.app.distributed import DataParallelSVI, shard_indices

TRUE_THETA = 1.5


def make_model(times: torch.Tensor, obs_steps: torch.Tensor, num_series: int):
    """The model ``model(y, idx)``: ``y`` ``(n, J)`` observations of the series ``idx`` ``(n,)``
    (global indices), or ``None`` to simulate. Every tensor follows the device of ``times``."""
    zero = times.new_zeros(())
    sigma = times.new_full((1,), 0.5)

    def model(y, idx):
        theta = pyro.sample("theta", dist.LogNormal(zero, 0.5))
        with pyro.plate("series", num_series, subsample=idx, dim=-1):
            init = dist.Normal(zero.expand(1), 1.0).to_event(1)
            prior = EulerMaruyama(lambda t, x: -theta[..., None] * x, sigma, init, times)
            x = pyro.sample("x", prior)
            pyro.sample("y", dist.Normal(x[..., obs_steps, 0], 0.1).to_event(1), obs=y)

    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    fast = os.environ.get("PYRO_NSDE_FAST") == "1"  # a quick run (CI)
    parser.add_argument(
        "--num-series", type=int, default=8 if fast else 64, help="N, over all processes"
    )
    parser.add_argument("--num-steps", type=int, default=30 if fast else 1000, help="SVI steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--time-steps", type=int, default=40, help="K, Euler–Maruyama steps")
    parser.add_argument("--num-particles", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.num_steps:
        parser.error(f"--warmup must be in [0, --num-steps), but got {args.warmup}")

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    device = torch.device(args.device)
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if distributed:
        torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    world_size = torch.distributed.get_world_size() if distributed else 1

    num_series, time_steps = args.num_series, args.time_steps
    times = torch.linspace(0.0, 2.0, time_steps + 1, device=device)
    every = max(time_steps // 8, 1)
    obs_steps = torch.arange(every, time_steps + 1, every, device=device)
    model = make_model(times, obs_steps, num_series)

    # The same simulated data set on every process; each keeps its shard.
    pyro.set_rng_seed(args.seed)
    every_series = torch.arange(num_series, device=device)
    truth = {"theta": times.new_tensor(TRUE_THETA)}
    trace = pyro.poutine.trace(pyro.condition(model, data=truth)).get_trace(None, every_series)
    idx = shard_indices(num_series, device=device)
    y = trace.nodes["y"]["value"][idx]

    # Independent noise on each process; the initial parameters are broadcast from process 0.
    pyro.set_rng_seed(args.seed + 1 + rank)
    pyro.clear_param_store()
    # One affine control per series (built on the device of the model's path site).
    guide = GirsanovGuide(
        model,
        control="affine",
        covariance="prior",
        latents="normal",
        create_plates=lambda y, idx: pyro.plate("series", num_series, subsample=idx, dim=-1),
    )
    elbo = Trace_ELBO(
        num_particles=args.num_particles, vectorize_particles=True, max_plate_nesting=1
    )
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1 / args.num_steps)})
    svi = DataParallelSVI(model, guide, optim, elbo, shard_fraction=len(idx) / num_series)

    for step in range(args.num_steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        loss = svi.step(y, idx)
        if rank == 0 and (step % 100 == 0 or step == args.num_steps - 1):
            theta = math.exp(pyro.param("GirsanovGuide.latent_guide.locs.theta").item())
            print(
                f"step {step:4d}  loss / series {loss / num_series:9.3f}  θ {theta:.3f}", flush=True
            )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start

    if rank == 0:
        loc = pyro.param("GirsanovGuide.latent_guide.locs.theta").item()
        scale = pyro.param("GirsanovGuide.latent_guide.scales.theta").item()
        print(
            f"θ: median {math.exp(loc):.3f}, sd of log θ {scale:.3f} (simulated with {TRUE_THETA})"
        )
        timed = args.num_steps - args.warmup
        report = {
            "processes": world_size,
            "threads_per_process": torch.get_num_threads(),
            "device": str(device),
            "num_series": num_series,
            "time_steps": time_steps,
            "num_particles": args.num_particles,
            "timed_steps": timed,
            "seconds": elapsed,
            "series_per_second": num_series * timed / elapsed,
        }
        print(json.dumps(report), flush=True)
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
