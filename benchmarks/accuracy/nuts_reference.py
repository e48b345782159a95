"""NUTS reference posteriors of the demo's and the command line's models, on all latents.

Pyro's NUTS samples every latent site of each problem of :mod:`problems` (the rates or OU
coefficients, the process and observation noise scales and the whole Euler–Maruyama path) from
``init_to_median``, chains run one after the other in one process on one thread, each with its
own seed. For every element of every parameter it records the posterior mean, sd, 5 % and 95 %
quantiles, effective sample size and split R-hat (Pyro's ``effective_sample_size`` and
``split_gelman_rubin`` over the chains), the mean of each chain (a chain stuck in another mode
shows there), the divergences, the adapted step sizes and the wall and CPU time, and writes them
into ``nuts_reference.json`` (problems not run keep their earlier entry).

The models run in double precision (``--dtype float32`` for the default dtype of the command
line): the same density, with less rounding in the leapfrog integrator.

Run from the repository root (about 25 minutes for ``lv`` with the defaults, 8 for ``ou``)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy/nuts_reference.py --problems lv,ou,lv_short
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import init_to_median, init_to_value
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import REFERENCE_PROBLEMS, build, parse_problems, provenance

REFERENCE = Path(__file__).resolve().parent / "nuts_reference.json"


def element_draws(samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split each parameter site into its scalar elements.

    :param samples: ``{site: (chains, draws, *shape)}``, the path site left out.
    :returns: ``{key: (chains, draws)}``, keyed ``name`` for a one-element site and
        ``name[i]`` (flat index) otherwise, in site order.
    """
    out = {}
    for name, value in samples.items():
        flat = value.reshape(value.shape[:2] + (-1,))
        if flat.shape[-1] == 1:
            out[name] = flat[..., 0]
        else:
            out.update({f"{name}[{i}]": flat[..., i] for i in range(flat.shape[-1])})
    return out


def summarize(draws: torch.Tensor) -> dict:
    """Mean, sd, 5 %/95 % quantiles, ESS, split R-hat and chain means of ``(chains, draws)``."""
    draws = draws.double()
    flat = draws.reshape(-1).numpy()
    q05, q95 = np.quantile(flat, [0.05, 0.95])
    return {
        "mean": float(flat.mean()),
        "sd": float(flat.std(ddof=1)),
        "q05": float(q05),
        "q95": float(q95),
        "ess": float(effective_sample_size(draws, chain_dim=0, sample_dim=1)),
        "r_hat": float(split_gelman_rubin(draws, chain_dim=0, sample_dim=1)),
        "chain_means": draws.mean(1).tolist(),
    }


def init_strategy(values: dict | None):
    """``init_to_median``, except for the sites in ``values`` (started there)."""
    if not values:
        return init_to_median
    return init_to_value(values=values, fallback=init_to_median)


def summarize_path(paths: list[torch.Tensor]) -> dict:
    """The worst ESS and split R-hat over all elements of the path sites
    (each ``(chains, draws, *shape)``)."""
    path = torch.cat([site.reshape(site.shape[:2] + (-1,)) for site in paths], -1).double()
    ess = effective_sample_size(path, chain_dim=0, sample_dim=1)
    r_hat = split_gelman_rubin(path, chain_dim=0, sample_dim=1)
    return {"min_ess": float(ess.min()), "max_r_hat": float(r_hat.max())}


def run_nuts(name: str, args) -> dict:
    """Run ``args.chains`` NUTS chains on problem ``name``; its JSON entry."""
    problem = build(name, getattr(torch, args.dtype))
    settings = {
        "chains": args.chains,
        "warmup": args.warmup,
        "draws": args.draws,
        "target_accept_prob": args.target_accept,
        "max_tree_depth": args.max_tree_depth,
        "init_strategy": "init_to_median"
        + ("" if not problem.init_values else f" ({', '.join(problem.init_values)} on the data)"),
        "jit_compile": not args.no_jit,
        "dtype": args.dtype,
        "num_steps": problem.model.times.shape[0] - 1,
        "seeds": [args.seed + chain for chain in range(args.chains)],
    }
    print(f"{name}: {problem.description}, {settings['num_steps']} Euler-Maruyama steps")
    chains, divergences, accept, step_sizes, chain_seconds = [], [], [], [], []
    wall, cpu = time.perf_counter(), time.process_time()
    for seed in settings["seeds"]:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        kernel = NUTS(
            problem.model,
            init_strategy=init_strategy(problem.init_values),
            target_accept_prob=args.target_accept,
            max_tree_depth=args.max_tree_depth,
            jit_compile=not args.no_jit,
            ignore_jit_warnings=True,
        )
        mcmc = MCMC(
            kernel,
            num_samples=args.draws,
            warmup_steps=args.warmup,
            num_chains=1,
            disable_progbar=not args.progress,
        )
        start = time.perf_counter()
        mcmc.run(problem.y)
        chain_seconds.append(time.perf_counter() - start)
        chains.append(mcmc.get_samples())
        diagnostics = mcmc.diagnostics()
        divergences.append(len(diagnostics["divergences"]["chain 0"]))
        accept.append(float(diagnostics["acceptance rate"]["chain 0"]))
        step_sizes.append(float(kernel.step_size))
        print(
            f"  chain seed {seed}: {chain_seconds[-1]:.0f} s, {divergences[-1]} divergences, "
            f"acceptance {accept[-1]:.2f}, step size {step_sizes[-1]:.3g}",
            flush=True,
        )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # Sites in the model's order (alpha, beta, ...), not get_samples' alphabetical one.
    trace = poutine.trace(problem.model).get_trace(problem.y)
    order = [site for site in trace.stochastic_nodes if site in chains[0]]
    samples = {site: torch.stack([chain[site] for chain in chains]) for site in order}
    paths = [samples.pop(site) for site in problem.path_sites]
    return {
        "description": problem.description,
        "settings": settings,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "chain_wall_time_s": chain_seconds,
        "divergences": sum(divergences),
        "divergences_per_chain": divergences,
        "acceptance_rate_per_chain": accept,
        "step_size_per_chain": step_sizes,
        "parameters": {key: summarize(value) for key, value in element_draws(samples).items()},
        "path": summarize_path(paths) if paths else None,
        **provenance(),
    }


def print_table(name: str, entry: dict) -> None:
    """Print one problem's reference as a Markdown table."""
    settings, path = entry["settings"], entry["path"]
    worst = (
        ""
        if path is None
        else (f"; path: min ESS {path['min_ess']:.0f}, max R-hat {path['max_r_hat']:.3f}")
    )
    print(
        f"\n{name}: {entry['description']}; {settings['chains']} chains x "
        f"({settings['warmup']} warmup + {settings['draws']} draws), {entry['divergences']} "
        f"divergences, {entry['wall_time_s']:.0f} s wall, {entry['cpu_time_s']:.0f} s CPU{worst}"
    )
    print("| parameter | mean | sd | 5% | 95% | ESS | R-hat |")
    print("|---|---|---|---|---|---|---|")
    for key, row in entry["parameters"].items():
        print(
            f"| {key} | {row['mean']:.4g} | {row['sd']:.3g} | {row['q05']:.4g} | "
            f"{row['q95']:.4g} | {row['ess']:.0f} | {row['r_hat']:.3f} |"
        )
    low = [key for key, row in entry["parameters"].items() if row["ess"] < 400]
    if low or entry["divergences"]:
        print(f"WARNING: ESS < 400 for {low or 'none'}; {entry['divergences']} divergences")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--problems",
        default=",".join(REFERENCE_PROBLEMS),
        help=f"comma-separated, from {', '.join(REFERENCE_PROBLEMS)}",
    )
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--target-accept", type=float, default=0.9)
    parser.add_argument("--max-tree-depth", type=int, default=10)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--no-jit", action="store_true", help="run NUTS without the JIT")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first chain")
    parser.add_argument("--out", type=Path, default=REFERENCE, help="the JSON file to update")
    parser.add_argument("--progress", action="store_true", help="show Pyro's progress bars")
    args = parser.parse_args(argv)
    names = parse_problems(args.problems, REFERENCE_PROBLEMS)
    torch.set_num_threads(1)
    for name in names:
        entry = run_nuts(name, args)
        # Read the file again: another run may have written other problems meanwhile.
        reference = json.loads(args.out.read_text()) if args.out.exists() else {}
        reference[name] = entry
        args.out.write_text(json.dumps(reference, indent=1) + "\n")
    for name in names:
        print_table(name, reference[name])


if __name__ == "__main__":
    main()
