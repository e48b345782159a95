"""Peak memory of one pyro-nsde training step on a long path, with and without gradient
checkpointing (``GirsanovGuide(..., checkpoint_every=N)``), next to the plain PyTorch loop.

The problem is the one of ``bench.py`` (an MLP drift and a :class:`~pyro_nsde.ControlNet` of
width 64, one series observed every 10 steps, ``B`` sample paths) at ``K = 10,000`` steps.
Reverse-mode differentiation of the Euler–Maruyama loop keeps the activations of both networks
at every step, ``O(K B width)`` floats; with ``checkpoint_every=N`` the loop runs in blocks of
``N`` steps under :func:`torch.utils.checkpoint.checkpoint`, which keeps only the states
between blocks (and the per-step quantities of the path density) and recomputes the networks
block by block in the backward pass, ``O(K B d + N B width)``.

Each row runs in a fresh process (a fork of a server that has only imported the libraries) and
reports the growth of the peak resident set over the resident set before training (CUDA: peak
allocated bytes), for ``--iterations`` SVI steps, and the wall time of the last step.

    python benchmarks/memory.py                       # K=10000, B=16, d=1, N=100
    python benchmarks/memory.py --checkpoint-every 10,100,1000
"""

import argparse
import shlex
import sys

import torch
from bench import Config, memory_context, run_memory


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="K")
    parser.add_argument("--paths", type=int, default=16, help="B, sample paths per step")
    parser.add_argument("--dim", type=int, default=1, help="d")
    parser.add_argument("--checkpoint-every", default="100", help="comma-separated block lengths N")
    parser.add_argument("--iterations", type=int, default=1, help="SVI steps measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-loop row")
    args = parser.parse_args(argv)
    blocks = [int(n) for n in args.checkpoint_every.split(",")]
    if args.iterations < 1 or min(blocks) < 1:
        parser.error("--iterations and --checkpoint-every must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    try:
        config = Config.parse(f"{args.steps}x{args.paths}x{args.dim}")
    except ValueError as error:
        parser.error(str(error))
    runs = [("plain-loop", {})] if not args.no_plain else []
    runs += [("pyro-nsde", {"checkpoint_every": n}) for n in [None, *blocks]]

    print(f"command: {shlex.join(['python', 'benchmarks/memory.py', *argv])}")
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads, float32")
    print()
    last = f"ms/iter (last of {args.iterations})"
    print(f"| K | B | d | implementation | checkpoint_every | peak MB | {last} |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    context = memory_context()
    for name, kwargs in runs:
        peak, ms = run_memory(
            context,
            name,
            config,
            args.device,
            args.seed,
            args.threads,
            False,
            args.iterations,
            **kwargs,
        )
        every = kwargs.get("checkpoint_every") or "–"
        print(
            f"| {config.steps} | {config.paths} | {config.dim} | {name} | {every} "
            f"| {peak:.1f} | {ms:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
