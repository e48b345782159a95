"""pyro-nsde's documented defaults against NumPyro's NUTS on the same discretized SDE models.

For each problem the model is written twice, once as a Pyro model on
:class:`pyro_nsde.EulerMaruyama` and once as a NumPyro model on
``numpyro.distributions.EulerMaruyama`` (same priors, grid, path law and likelihood, float32 on
both sides), and two posteriors are computed one after the other in this process:

- NumPyro: ``MCMC(NUTS(model), num_warmup=500, num_samples=1000, num_chains=1)`` on every
  latent (parameters and the whole path); the wall time of ``.run`` includes JAX's compilation;
- pyro-nsde, defaults only: ``GirsanovGuide(model)``, ``fit_svi(model, guide, y)`` and
  ``to_inference_data(..., importance_resampling=True)``, timed together. One-time imports are
  not counted: ``arviz`` is imported and a throwaway ``torch.optim.Adam`` stepped (torch imports
  ``torch._dynamo`` lazily on the first step) before timing.

Per parameter element: ``z = (mean_pyro - mean_nuts) / sd_nuts`` and ``sd_pyro / sd_nuts``; it
passes if ``|z| < 0.5`` and ``0.75 <= sd ratio <= 1.33``. Before timing, the script checks that
the two path laws agree on a random path, and the two joint densities at one point, to a
relative 1e-5 (it stops otherwise). If pyro-nsde raises, its traceback is printed and the other
problems still run; its warnings are printed. Problems:

- ``lv``: the demo, ``LotkaVolterra`` on the lynx-hare pelts 1900-1920 (:mod:`problems`);
- ``ou``: ``OrnsteinUhlenbeck`` on 40 standardized Nile values (:mod:`problems`);
- ``counts``: a latent OU log-intensity ``dx = θ(μ - x) dt + σ dW`` (70 steps of 0.5,
  ``x_0 ~ N(0, 1)``) observed at every 2nd step as Poisson counts ``y ~ Poisson(exp x)``;
  ``θ ~ LogNormal(0, 1)``, ``μ ~ N(log 5, 1)``, ``σ ~ LogNormal(log 0.3, 1)``; data simulated
  once (seed :data:`DATA_SEED`) with ``θ = 0.5``, ``μ = log 5``, ``σ = 0.3``.

NUTS is the reference, not the truth: one chain of 1000 draws (Monte Carlo error of a mean about
0.1 sd). On ``ou`` the Euler-Maruyama chain has a second mode of ``θ`` beyond ``θh > 1``
(README, ``ou_quadrature.py``: 1.7 % of the exact posterior's mass, which triples θ's sd) that
NUTS does not visit; a few pyro-nsde draws there make θ's sd ratio exceed 1.33.

Run from the repository root, on one core (about a minute)::

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/accuracy/vs_numpyro.py [--problems lv,ou]

The script also sets ``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)`` and, before importing
JAX, ``XLA_FLAGS`` to one thread. NumPyro and JAX are extras of this benchmark only
(``pip install numpyro jax``), never dependencies of pyro-nsde.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pyro
import pyro.distributions as dist
import torch
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import log_density
from pyro import poutine

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import build, parse_problems, provenance

import pyro_nsde
from pyro_nsde.analysis import arviz_adapter

PROBLEMS = ("lv", "ou", "counts")
MAX_Z, SD_RATIO_BOUNDS = 0.5, (0.75, 1.33)
DATA_SEED = 2024


class PoissonOU:
    """The ``counts`` model in Pyro, laid out as the zoo's models (``times``, ``obs_index``,
    ``path_law``): scalar parameters and the path outside any plate."""

    times = torch.arange(71, dtype=torch.float32) * 0.5
    obs_index = torch.arange(2, 71, 2)
    truth = {"theta": 0.5, "mu": math.log(5.0), "sigma": 0.3}

    def path_law(self, params: dict) -> pyro_nsde.EulerMaruyama:
        theta, mu, sigma = params["theta"], params["mu"], params["sigma"]

        def drift(t, x):
            return theta[..., None] * (mu[..., None] - x)

        init = dist.Normal(self.times.new_zeros(1), 1.0).to_event(1)
        return pyro_nsde.EulerMaruyama(drift, sigma[..., None], init, self.times)

    def __call__(self, y=None):
        zero = self.times.new_tensor(0.0)
        params = {
            "theta": pyro.sample("theta", dist.LogNormal(zero, 1.0)),
            "mu": pyro.sample("mu", dist.Normal(zero + math.log(5.0), 1.0)),
            "sigma": pyro.sample("sigma", dist.LogNormal(zero + math.log(0.3), 1.0)),
        }
        x = pyro.sample("x", self.path_law(params))
        rate = x[..., self.obs_index, 0].exp()
        return pyro.sample("y", dist.Poisson(rate).to_event(1), obs=y)


@dataclass
class Case:
    """A problem in both libraries: the Pyro model (``times``, ``obs_index``, ``path_law``) and
    its data, and NumPyro's priors (``() -> params``), drift ``(params, x) -> f``, site of the
    diagonal diffusion, law of ``x_0`` and likelihood ``(states at the observations, params)``."""

    name: str
    model: Callable
    y: torch.Tensor
    priors: Callable
    drift: Callable
    diffusion: str
    init: ndist.Distribution
    likelihood: Callable

    @property
    def num_steps(self) -> int:
        return self.model.times.shape[0] - 1

    def law(self, params: dict) -> ndist.EulerMaruyama:
        def sde_fn(x, t):
            return self.drift(params, x), jnp.broadcast_to(params[self.diffusion], x.shape)

        return ndist.EulerMaruyama(jnp.asarray(self.model.times.numpy()), sde_fn, self.init)

    def numpyro_model(self, y):
        params = self.priors()
        x = numpyro.sample("x", self.law(params))
        states = x[self.model.obs_index.numpy()]
        numpyro.sample("y", self.likelihood(states, params).to_event(y.ndim), obs=y)


def lognormal(median: float, scale: float) -> ndist.LogNormal:
    return ndist.LogNormal(math.log(median), scale)


def mean_reverting(p: dict, x):
    return p["theta"] * (p["mu"] - x)


STANDARD_INIT = ndist.Normal(jnp.zeros(1), 1.0).to_event(1)


def lv_case() -> Case:
    problem = build("lv", torch.float32)
    model = problem.model

    def priors():
        rates = zip(model.rate_names, model.rate_medians, strict=True)
        p = {n: numpyro.sample(n, lognormal(m, model.rate_scale)) for n, m in rates}
        with numpyro.plate("series", 2):
            p["sigma_process"] = numpyro.sample("sigma_process", ndist.LogNormal(-2.0, 1.0))
            p["sigma_obs"] = numpyro.sample("sigma_obs", ndist.LogNormal(-1.0, 1.0))
        return p

    def drift(p, x):  # (α - β e^v, -γ + δ e^u)
        a, b = jnp.stack([p["alpha"], -p["gamma"]]), jnp.stack([-p["beta"], p["delta"]])
        return a + b * jnp.exp(x[::-1])

    def likelihood(states, p):
        return ndist.LogNormal(states, p["sigma_obs"])

    init = ndist.Normal(model.init_loc.numpy(), model.init_scale).to_event(1)
    return Case("lv", model, problem.y, priors, drift, "sigma_process", init, likelihood)


def ou_case() -> Case:
    problem = build("ou", torch.float32)

    def priors():
        with numpyro.plate("series", 1):
            return {
                "theta": numpyro.sample("theta", ndist.LogNormal(0.0, 1.0)),
                "mu": numpyro.sample("mu", ndist.Normal(0.0, 1.0)),
                "sigma_process": numpyro.sample("sigma_process", ndist.LogNormal(0.0, 1.0)),
                "sigma_obs": numpyro.sample("sigma_obs", lognormal(0.1, 1.0)),
            }

    def likelihood(states, p):
        return ndist.Normal(states, p["sigma_obs"])

    args = (priors, mean_reverting, "sigma_process", STANDARD_INIT, likelihood)
    return Case("ou", problem.model, problem.y, *args)


def counts_case() -> Case:
    model = PoissonOU()
    pyro.set_rng_seed(DATA_SEED)
    y = pyro.condition(model, data={k: torch.tensor(v) for k, v in model.truth.items()})()

    def priors():
        return {
            "theta": numpyro.sample("theta", ndist.LogNormal(0.0, 1.0)),
            "mu": numpyro.sample("mu", ndist.Normal(math.log(5.0), 1.0)),
            "sigma": numpyro.sample("sigma", lognormal(0.3, 1.0)),
        }

    def likelihood(states, p):
        return ndist.Poisson(jnp.exp(states[..., 0]))

    return Case("counts", model, y, priors, mean_reverting, "sigma", STANDARD_INIT, likelihood)


CASES = {"lv": lv_case, "ou": ou_case, "counts": counts_case}


def check_twins(case: Case, seed: int) -> str:
    """The path's log density on a random path and the joint log density at one point (prior
    draw of the parameters), in both libraries; stops if they differ by a relative 1e-5."""
    with numpyro.handlers.seed(rng_seed=seed):
        params = case.priors()
    shape = (case.num_steps + 1, *case.init.event_shape)
    walk = np.random.default_rng(seed).standard_normal(shape).cumsum(0)
    values = {**params, "x": (case.init.mean + 0.1 * walk).astype(jnp.float32)}
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in values.items()}
    trace = poutine.trace(poutine.condition(case.model, tensors)).get_trace(case.y)
    pairs = {
        "path": (
            case.law(params).log_prob(values["x"]),
            case.model.path_law(tensors).log_prob(tensors["x"]),
        ),
        "joint": (
            log_density(case.numpyro_model, (case.y.numpy(),), {}, values)[0],
            trace.log_prob_sum(),
        ),
    }
    parts = []
    for what, (a, b) in pairs.items():
        a, b = float(a), float(b)
        rel = abs(a - b) / max(1.0, abs(a))
        parts.append(f"{what} {a:.6g} (NumPyro) vs {b:.6g} (pyro-nsde), rel. diff {rel:.1e}")
        if not rel <= 1e-5:
            raise SystemExit(f"{case.name}: the twins' log densities differ: {parts[-1]}")
    return "; ".join(parts)


def elements(draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{site: (S, *shape)}`` → ``{name or name[i]: (S,)}``."""
    out = {}
    for name, value in draws.items():
        flat = np.asarray(value, dtype=np.float64).reshape(value.shape[0], -1)
        if flat.shape[1] == 1:
            out[name] = flat[:, 0]
        else:
            out.update({f"{name}[{i}]": flat[:, i] for i in range(flat.shape[1])})
    return out


def run_numpyro(case: Case, seed: int) -> tuple[dict, dict]:
    """NUTS on every latent: ``(stats, {parameter element: draws})``."""
    mcmc = MCMC(
        NUTS(case.numpyro_model), num_warmup=500, num_samples=1000, num_chains=1, progress_bar=False
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), jnp.asarray(case.y.numpy()), extra_fields=("diverging",))
    samples = jax.block_until_ready(mcmc.get_samples())
    wall = time.perf_counter() - start
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())
    draws = elements({k: np.asarray(v) for k, v in samples.items() if k != "x"})
    return {"wall_s": wall, "divergences": divergences}, draws


def run_pyro_nsde(case: Case, seed: int, sites) -> tuple[dict, dict]:
    """The documented path with its defaults: ``(stats, {parameter element: draws})``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        guide = pyro_nsde.GirsanovGuide(case.model)
        history = pyro_nsde.fit_svi(case.model, guide, case.y, progress=False)
        idata = pyro_nsde.to_inference_data(
            case.model, guide=guide, model_args=(case.y,), importance_resampling=True
        )
        wall = time.perf_counter() - start
    posterior = arviz_adapter.group(idata, "posterior")
    draws = {n: posterior[n].values.reshape(-1, *posterior[n].shape[2:]) for n in sites}
    k_hat = arviz_adapter.group(idata, "sample_stats").attrs.get("importance_pareto_k")
    stats = {
        "wall_s": wall,
        "svi_steps": len(history),
        "converged": history.converged,
        "pareto_k": None if k_hat is None else float(k_hat),
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    }
    return stats, elements(draws)


ROW_KEYS = ("parameter", "nuts_mean", "nuts_sd", "pyro_mean", "pyro_sd", "z", "sd_ratio", "passes")


def compare(nuts: dict, vi: dict) -> list[dict]:
    """One row per parameter element: means, sds, ``z``, sd ratio and whether it passes."""
    rows = []
    for name, ref in nuts.items():
        mean, sd = ref.mean(), ref.std(ddof=1)
        vi_mean, vi_sd = vi[name].mean(), vi[name].std(ddof=1)
        z, ratio = (vi_mean - mean) / sd, vi_sd / sd
        ok = abs(z) < MAX_Z and SD_RATIO_BOUNDS[0] <= ratio <= SD_RATIO_BOUNDS[1]
        values = (name, *(float(v) for v in (mean, sd, vi_mean, vi_sd, z, ratio)), bool(ok))
        rows.append(dict(zip(ROW_KEYS, values, strict=True)))
    return rows


def warm_up_imports() -> None:
    """Pay the one-time imports before timing: ArviZ, and torch._dynamo (the first Adam step)."""
    import arviz  # noqa: F401

    weight = torch.zeros(1, requires_grad=True)
    weight.grad = torch.ones(1)
    torch.optim.Adam([weight]).step()


HEADER = (
    "| problem | K | parameters | NumPyro s | pyro-nsde s | ratio | max abs z | sd ratio "
    "| all pass | k̂ |"
)


def print_tables(results: dict) -> None:
    """The summary table (one row per problem), then one table per problem."""
    print(f"\n{HEADER}\n" + "|---" * HEADER.count(" | ") + "|---|")
    for name, r in results.items():
        nuts, vi, rows = r["numpyro"], r.get("pyro_nsde"), r.get("rows")
        if rows is None:
            print(f"| {name} | {r['K']} | | {nuts['wall_s']:.1f} | failed | | | | no | |")
            continue
        ratios, worst = [row["sd_ratio"] for row in rows], max(abs(row["z"]) for row in rows)
        k_hat = "-" if vi["pareto_k"] is None else f"{vi['pareto_k']:.2f}"
        passes = "yes" if all(row["passes"] for row in rows) else "no"
        print(
            f"| {name} | {r['K']} | {len(rows)} | {nuts['wall_s']:.1f} | {vi['wall_s']:.1f} | "
            f"{vi['wall_s'] / nuts['wall_s']:.2f} | {worst:.2f} | "
            f"{min(ratios):.2f}-{max(ratios):.2f} | {passes} | {k_hat} |"
        )
    for name, r in results.items():
        if "rows" not in r:
            continue
        vi = r["pyro_nsde"]
        print(
            f"\n{name}: NUTS {r['numpyro']['divergences']} divergences; pyro-nsde "
            f"{vi['svi_steps']} SVI steps (converged: {vi['converged']})\n\n"
            "| parameter | NUTS | pyro-nsde | z | sd ratio |\n|---|---|---|---|---|"
        )
        for row in r["rows"]:
            print(
                f"| {row['parameter']} | {row['nuts_mean']:.4g} ± {row['nuts_sd']:.3g} | "
                f"{row['pyro_mean']:.4g} ± {row['pyro_sd']:.3g} | {row['z']:+.2f} | "
                f"{row['sd_ratio']:.2f}{'' if row['passes'] else ' (fails)'} |"
            )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="seed of NUTS and of pyro-nsde")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    names = parse_problems(args.problems, PROBLEMS)
    torch.set_num_threads(1)
    warm_up_imports()
    cases = {name: CASES[name]() for name in names}
    for case in cases.values():
        print(f"check {case.name}: {check_twins(case, args.seed)}", flush=True)
    results = {}
    for name, case in cases.items():
        nuts, nuts_draws = run_numpyro(case, args.seed)
        results[name] = {"K": case.num_steps, "numpyro": nuts}
        print(f"{name}: NumPyro NUTS {nuts['wall_s']:.1f} s", flush=True)
        sites = dict.fromkeys(n.split("[")[0] for n in nuts_draws)
        try:
            vi, vi_draws = run_pyro_nsde(case, args.seed, sites)
        except Exception:
            results[name]["error"] = traceback.format_exc()
            print(f"{name}: pyro-nsde failed\n{results[name]['error']}", flush=True)
            continue
        print(f"{name}: pyro-nsde {vi['wall_s']:.1f} s", flush=True)
        for message in vi["warnings"]:
            print(f"{name}: pyro-nsde warning: {message}", flush=True)
        results[name].update(pyro_nsde=vi, rows=compare(nuts_draws, vi_draws))
    print_tables(results)
    if args.json is not None:
        versions = {"numpyro": numpyro.__version__, "jax": jax.__version__}
        out = {"provenance": {**provenance(), **versions}, **results}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
