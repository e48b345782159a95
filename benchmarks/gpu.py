"""The accelerator table of issue 23 in one command: one SVI step of the sequential, the
Gauss–Markov and the subsampled guides against the hand-written loop at ``K = 1000``,
``B = 16`` and ``512``, ``d = 8`` (``bench.py``'s problem and implementations), then one
training step of the Lorenz latent SDE at full size (``lorenz_latent_sde.py``: the tutorial's
sequential and Gauss–Markov guides and the diagonal family trained on 25 of its 148 steps).

    python benchmarks/gpu.py                  # on cuda where there is one, else the CPU
    python benchmarks/gpu.py --device cpu --quick

Rows:

- ``plain-loop``: a hand-written Euler–Maruyama ELBO loop (the floor);
- ``pyro-nsde``: ``GirsanovGuide`` with a network control, simulated step by step;
- ``pyro-nsde-linear-series``: the Gauss–Markov family (full gains and covariances), one set
  of coefficients per series, the path drawn by the parallel scan;
- ``pyro-nsde-subsampled``: the diagonal Gauss–Markov family on ``subsample_steps(model, 100)``.

On a GPU the whole table takes a few minutes; on one CPU core the ``B = 512`` rows alone take
several (``--quick`` runs a small grid). The device runs everything; the Lorenz part puts its
tensors there with ``torch.set_default_device``.
"""

import argparse
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
import lorenz_latent_sde  # noqa: E402

IMPLS = "plain-loop,pyro-nsde,pyro-nsde-linear-series,pyro-nsde-subsampled"
CONFIGS = "1000x16x8,1000x512x8"
QUICK_CONFIGS = "200x8x2"
LORENZ_IMPLS = "pyro-nsde,pyro-nsde-linear,pyro-nsde-diagonal"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"cpu or cuda (default {default})")
    parser.add_argument("--quick", action="store_true", help="a small grid, for a smoke run")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmark_outputs"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(args.device)}")
    else:
        print(f"device: cpu, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    bench.main(
        [
            *("--configs", configs, "--impls", IMPLS, "--device", args.device),
            *("--steps", "2", "--repeats", "3", "--warmup", "1", "--threads", "1"),
            *("--no-memory", "--sanity-repeats", "0"),
        ]
    )
    print(f"\nbench: {time.perf_counter() - start:.0f} s\n")
    lorenz = [
        *("--impls", LORENZ_IMPLS, "--subsample", "25", "--steps", "3", "--warmup", "1"),
        *("--draws", "2", "--covariance", "diagonal", "--out", str(args.out)),
        *(["--quick"] if args.quick else []),
    ]
    with torch.device(args.device):
        lorenz_latent_sde.main(lorenz)
    print(f"\nall: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
