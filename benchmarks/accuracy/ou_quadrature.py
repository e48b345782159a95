"""The posterior of the ``ou`` problem by quadrature: an MCMC-free check of its NUTS reference.

With the path integrated out (:class:`problems.OrnsteinUhlenbeckMarginal`) the observations are
Gaussian given ``(θ, μ, σ, τ)`` and their mean is linear in ``μ``, so ``μ`` (prior
``N(m, s²)``) is integrated out too: with ``S = C(θ, σ) + τ² I``, ``u`` the mean's slope in
``μ`` and ``r = y - offset - m u``,

    ``log p(y | θ, σ, τ) = log N(r; 0, S) - ½ log(1 + s² α) + ½ s² β² / (1 + s² α)``,
    ``α = uᵀS⁻¹u``, ``β = uᵀS⁻¹r``,

and ``μ | θ, σ, τ, y ~ N((m/s² + β + m α) / P, 1/P)``, ``P = 1/s² + α``. The
remaining three parameters are integrated on a uniform grid in their logarithms (midpoint
rule, priors read from the model's own sites), which gives the posterior mean, sd and 5 %/95 %
quantiles of every parameter (``μ``'s as a mixture of the Gaussians above). The grid is also
evaluated at half the resolution: the change is printed as the quadrature error.

Run from the repository root (a few minutes)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy/ou_quadrature.py

writes the entry ``ou_quadrature`` of ``nuts_reference.json``.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nuts_reference import REFERENCE
from problems import build, provenance

#: Ranges of ``log θ``, ``log σ``, ``log τ`` (far past the posterior's 0.1 % and 99.9 %).
RANGES = {"theta": (-6.0, 2.5), "sigma_process": (-4.0, 2.0), "sigma_obs": (-8.5, 1.5)}


def priors(model) -> dict:
    """``{site: (loc, scale)}`` of the model's priors (normal for ``mu``, lognormal otherwise)."""
    trace = poutine.trace(model.sample_parameters).get_trace(pyro.plate("series", 1, dim=-1))
    return {
        name: (float(site["fn"].loc), float(site["fn"].scale))
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
    }


def log_posterior(marginal, y, grids, prior, chunk=4096):
    """The unnormalized log posterior of ``(log θ, log σ, log τ)`` on the grid, and the mean
    and precision of ``μ`` given each grid point: three ``(n_θ, n_σ, n_τ)`` arrays."""
    names = ("theta", "sigma_process", "sigma_obs")
    log_theta, log_sigma, log_tau = torch.meshgrid(*grids, indexing="ij")
    points = torch.stack([log_theta, log_sigma, log_tau], -1).reshape(-1, 3)
    m, s = prior["mu"]
    out = []
    for batch in points.split(chunk):
        theta, sigma, tau = batch.exp().unbind(-1)
        offset, slope, cov = marginal.moments(theta, sigma)
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
        chol, info = torch.linalg.cholesky_ex(cov + tau[:, None, None] ** 2 * eye)
        ok = info == 0
        chol = torch.where(ok[:, None, None], chol, eye)
        resid = y - offset - m * slope
        solved = torch.cholesky_solve(torch.stack([resid, slope], -1), chol)
        rr, ur = (resid * solved[..., 0]).sum(-1), (slope * solved[..., 0]).sum(-1)
        uu = (slope * solved[..., 1]).sum(-1)
        logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        n = y.shape[-1]
        loglik = -0.5 * (rr + n * math.log(2 * math.pi) + logdet)
        loglik = loglik - 0.5 * torch.log1p(s**2 * uu) + 0.5 * s**2 * ur**2 / (1 + s**2 * uu)
        logprior = sum(
            torch.distributions.Normal(*prior[name]).log_prob(value)
            for name, value in zip(names, batch.unbind(-1), strict=True)
        )
        precision = 1 / s**2 + uu
        mean = (m / s**2 + ur + m * uu) / precision
        logpost = torch.where(ok, loglik + logprior, torch.full_like(loglik, -math.inf))
        out.append(torch.stack([logpost, mean, precision], -1))
    shape = tuple(len(grid) for grid in grids)
    return [value.reshape(shape).numpy() for value in torch.cat(out).unbind(-1)]


def quantiles_on_grid(grid: np.ndarray, mass: np.ndarray, probs=(0.05, 0.95)) -> list[float]:
    """Quantiles of a density given by cell masses at the midpoints ``grid`` (uniform)."""
    step = grid[1] - grid[0]
    edges = np.concatenate([grid - step / 2, grid[-1:] + step / 2])
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    return [float(np.interp(p, cdf, edges)) for p in probs]


def mixture_quantiles(means, sds, weights, probs=(0.05, 0.95)) -> list[float]:
    """Quantiles of the Gaussian mixture ``Σ w_i N(means_i, sds_i²)`` by bisection."""
    out = []
    for p in probs:
        low, high = float((means - 10 * sds).min()), float((means + 10 * sds).max())
        for _ in range(60):
            mid = 0.5 * (low + high)
            cdf = (
                weights * torch.distributions.Normal(means, sds).cdf(means.new_tensor(mid))
            ).sum()
            low, high = (mid, high) if cdf < p else (low, mid)
        out.append(0.5 * (low + high))
    return out


def summarize(marginal, y, points: int) -> dict:
    """Posterior moments and quantiles of every parameter on a grid of ``points`` per axis."""
    prior = priors(marginal.model)
    grids = [torch.linspace(*RANGES[name], points, dtype=y.dtype) for name in RANGES]
    logpost, mu_mean, mu_precision = log_posterior(marginal, y, grids, prior)
    weights = np.exp(logpost - logpost.max())
    weights /= weights.sum()
    out = {}
    for axis, (name, grid) in enumerate(zip(RANGES, grids, strict=True)):
        others = tuple(i for i in range(3) if i != axis)
        mass, values = weights.sum(others), grid.numpy()
        mean = float((mass * np.exp(values)).sum())
        sd = float(np.sqrt((mass * np.exp(2 * values)).sum() - mean**2))
        q05, q95 = np.exp(quantiles_on_grid(values, mass))
        edge = float(max(mass[0], mass[-1]))
        out[name] = {"mean": mean, "sd": sd, "q05": float(q05), "q95": float(q95), "edge": edge}
    # The mass where an Euler step overshoots the mean (θ h > 1): the aliased mode.
    theta = np.exp(grids[0].numpy())
    overshoot = weights.sum((1, 2))[theta * float(marginal.step) > 1].sum()
    out["theta"]["mass_theta_h_above_1"] = float(overshoot)
    keep = weights > 1e-14
    w, means = weights[keep], mu_mean[keep]
    sds = 1 / np.sqrt(mu_precision[keep])
    mean = float((w * means).sum())
    sd = float(np.sqrt((w * (sds**2 + means**2)).sum() - mean**2))
    q05, q95 = mixture_quantiles(*(torch.as_tensor(v) for v in (means, sds, w)))
    out["mu"] = {"mean": mean, "sd": sd, "q05": q05, "q95": q95, "edge": 0.0}
    return {name: out[name] for name in ("theta", "mu", "sigma_process", "sigma_obs")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=121, help="grid points per axis")
    parser.add_argument("--out", type=Path, default=REFERENCE, help="the JSON file to update")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = build("ou_exact")
    y = problem.y[:, 0]
    wall, cpu = time.perf_counter(), time.process_time()
    fine = summarize(problem.model, y, args.points)
    coarse = summarize(problem.model, y, (args.points + 1) // 2)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"ou by quadrature, {args.points}^3 grid ({(args.points + 1) // 2}^3 in brackets):")
    print("| parameter | mean | sd | 5% | 95% | mass in the edge cells |")
    print("|---|---|---|---|---|---|")
    for name, row in fine.items():
        other = coarse[name]
        print(
            f"| {name} | {row['mean']:.4f} ({other['mean']:.4f}) | {row['sd']:.4f} "
            f"({other['sd']:.4f}) | {row['q05']:.4f} | {row['q95']:.4f} | {row['edge']:.1e} |"
        )
    print(
        f"P(theta h > 1) = {fine['theta']['mass_theta_h_above_1']:.4f} "
        f"({coarse['theta']['mass_theta_h_above_1']:.4f}), the aliased mode"
    )
    print(f"{wall:.0f} s wall, {cpu:.0f} s CPU")
    entry = {
        "description": f"{problem.description}; mu integrated analytically, log theta, "
        "log sigma_process, log sigma_obs on a grid (midpoint rule)",
        "settings": {"points": args.points, "ranges": RANGES},
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "parameters": fine,
        "half_resolution": coarse,
        **provenance(),
    }
    reference = json.loads(args.out.read_text()) if args.out.exists() else {}
    reference["ou_quadrature"] = entry
    args.out.write_text(json.dumps(reference, indent=1) + "\n")


if __name__ == "__main__":
    main()
