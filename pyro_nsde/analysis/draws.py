"""Posterior (or prior) draws of a Pyro model, and the model's trace vectorized over them.

Every analysis of a fit starts here: ``S`` draws of the latent sites (from a guide, a finished
:class:`~pyro.infer.MCMC` run, or the prior) are put back into the model in one run, with the
draws on an extra batch dim left of all of the model's plates (as
``Predictive(parallel=True)`` does). :class:`SiteInfo` describes each sample site as seen in
an unbatched trace, so that values can be laid out per draw (:func:`per_draw`).
"""

import dataclasses
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from pyro.infer.util import plate_log_prob_sum
from pyro.poutine.util import prune_subsample_sites

from ..sde.sites import (
    diverged_draws_allowed,
    is_subsampled,
    log_joint,
    plate_nesting,
    unwrap_path_distribution,
)
from .importance import KHAT_THRESHOLD, importance_resample

#: The name of the plate over draws in a vectorized trace.
DRAW_PLATE = "_pyro_nsde_draws"
#: Rounds of guide draws :func:`guide_draws` takes to replace draws that are not finite.
MAX_DRAW_ROUNDS = 4


@dataclasses.dataclass
class SiteInfo:
    """A sample site of the model, as seen in an unbatched trace.

    ``shape`` is the value's shape for one draw; in a trace vectorized over draws along dim
    ``-(max_plate_nesting + 1)`` the value is ``(S, *(1,) * pad, *shape)`` (``pad=None``:
    unknown in advance).
    """

    name: str
    kind: str  # "latent", "deterministic" or "observed"
    shape: torch.Size
    pad: int | None
    dims: list
    value: torch.Tensor
    path: object  # the EulerMaruyama at a path site, else None


@dataclasses.dataclass
class Draws:
    """``S`` draws of the latent sites and the model trace vectorized over them."""

    trace: object
    sites: dict
    num_draws: int
    num_chains: int
    sample_stats: dict
    log_weights: torch.Tensor | None = None
    nesting: int | None = None
    attrs: dict = dataclasses.field(default_factory=dict)


def describe_sites(trace, max_plate_nesting: int, conditioned=()) -> dict:
    """``{name: SiteInfo}`` of the sample sites of an unbatched model trace, in execution
    order; ``conditioned`` names observed sites that are latent draws (conditioned on)."""
    sites = {}
    for name, site in prune_subsample_sites(trace).nodes.items():
        if site["type"] != "sample" or isinstance(site["fn"], dist.Unit):
            continue
        for frame in site["cond_indep_stack"]:
            if is_subsampled(frame):
                raise ValueError(
                    f"plate {frame.name!r} is subsampled ({frame.size} of {frame.full_size}); "
                    f"run the model on the full data without subsample_size"
                )
        if site["infer"].get("_deterministic"):
            kind = "deterministic"
        elif site["is_observed"] and name not in conditioned:
            kind = "observed"
        else:
            kind = "latent"
        fn = site["fn"]
        shape = site["value"].shape
        if kind == "observed":
            shape = torch.broadcast_shapes(shape, fn.batch_shape + fn.event_shape)
        batch_ndim = len(fn.batch_shape)
        plates = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
        dims = [plates.get(i - batch_ndim, f"{name}_dim_{i}") for i in range(len(shape))]
        path, _ = unwrap_path_distribution(fn)
        sites[name] = SiteInfo(
            name=name,
            kind=kind,
            shape=shape,
            # The value of a deterministic site broadcasts like the values it is computed from.
            pad=None if kind == "deterministic" else max_plate_nesting - batch_ndim,
            dims=dims,
            value=site["value"].detach(),
            path=path,
        )
    return sites


def per_draw(value, num_draws: int, pad: int | None, shape) -> torch.Tensor:
    """Drop the vectorization padding: a value broadcastable to ``(S, *(1,) * pad, *shape)``
    becomes ``(S, *shape)``. ``pad=None`` reads the padding off ``value.dim()``."""
    value = torch.as_tensor(value)
    if pad is None:
        pad = max(value.dim() - 1 - len(shape), 0)
    full = torch.broadcast_shapes(value.shape, (num_draws,) + (1,) * pad + tuple(shape))
    return value.expand(full).reshape((num_draws, *shape))


def vectorized_trace(model, samples: dict, sites: dict, num_draws: int, nesting: int, args, kwargs):
    """Run ``model`` once on ``S`` draws: ``samples[name]`` is ``(S, *site.shape)``; the draws
    sit on dim ``-(nesting + 1)``. Unconditioned latent sites are drawn from the model."""
    data = {
        name: value.reshape((num_draws,) + (1,) * sites[name].pad + tuple(sites[name].shape))
        for name, value in samples.items()
    }
    with torch.no_grad(), poutine.block():
        with pyro.plate(DRAW_PLATE, num_draws, dim=-(nesting + 1)):
            trace = poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)
    return prune_subsample_sites(trace)


def conditioned_trace(model, samples: dict, args, kwargs):
    """The model run on draws ``samples`` ``{site: (S, *shape)}`` of (some of) its latent
    sites: ``(vectorized trace, {name: SiteInfo}, plate nesting)``."""
    num_draws = next(iter(samples.values())).shape[0]
    with torch.no_grad(), poutine.block():
        first = {k: v[0] for k, v in samples.items()}
        reference = poutine.trace(poutine.condition(model, data=first)).get_trace(*args, **kwargs)
    nesting = plate_nesting(reference)
    sites = describe_sites(reference, nesting, conditioned=samples)
    latent = {k: v for k, v in samples.items() if k in sites and sites[k].kind == "latent"}
    trace = vectorized_trace(model, latent, sites, num_draws, nesting, args, kwargs)
    return trace, sites, nesting


def guide_draws(model, guide, args, kwargs, num_draws: int, num_chains: int = 1) -> Draws:
    """``num_draws`` draws of ``guide`` and the model replayed on them, with the importance
    weights ``log p(z, y) - log q(z)`` (``log_weights``).

    A draw whose path or likelihood is not finite (an Euler–Maruyama chain that is unstable
    at the draw's parameters, e.g. a damping rate past ``2/h`` in the guide's tail) has no
    finite weight: such draws are left out, with a warning, and replaced by further draws (at
    most :data:`MAX_DRAW_ROUNDS` rounds): the draws are then of the guide restricted to
    finite paths."""
    with torch.no_grad(), poutine.block(), diverged_draws_allowed():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        reference = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        nesting = plate_nesting(reference, guide_trace)
        sites = describe_sites(reference, nesting)
        rounds, kept = [], 0
        for _ in range(MAX_DRAW_ROUNDS):
            log_weights, trace, _ = vectorized_importance_weights(
                model, guide, *args, num_samples=num_draws, max_plate_nesting=nesting, **kwargs
            )
            log_weights = log_weights.reshape(-1)
            finite = torch.isfinite(log_weights)
            rounds.append((log_weights, trace, finite))
            kept += int(finite.sum())
            if kept >= num_draws:
                break
    if len(rounds) > 1 or not bool(finite.all()):
        trace, log_weights = _finite_draws(model, rounds, sites, num_draws, nesting, args, kwargs)
        joint = log_joint(trace, DRAW_PLATE)
    else:
        joint = plate_log_prob_sum(trace, trace.plate_to_symbol["num_particles_vectorized"])
    return Draws(
        trace=trace,
        sites=sites,
        num_draws=num_draws,
        num_chains=num_chains,
        sample_stats={"lp": joint.reshape(-1), "log_weight": log_weights},
        log_weights=log_weights,
        nesting=nesting,
    )


def _finite_draws(model, rounds, sites, num_draws, nesting, args, kwargs):
    """The first ``num_draws`` draws with finite weights of ``rounds`` (``(log weights,
    vectorized trace, finite)`` each): the model's trace on them and their weights."""
    kept = sum(int(f.sum()) for *_, f in rounds)
    left_out = sum(len(f) for *_, f in rounds) - kept
    if kept < num_draws:
        raise ValueError(
            f"{left_out} of {left_out + kept} guide draws have a path or likelihood that is not "
            f"finite (an Euler-Maruyama chain unstable at the parameters drawn): the guide puts "
            f"too much mass where the model diverges"
        )
    warnings.warn(
        f"{left_out} guide draws with a path or likelihood that is not finite (an "
        f"Euler-Maruyama chain unstable at the parameters drawn) were left out and replaced",
        RuntimeWarning,
        stacklevel=4,
    )
    samples, weights = {}, []
    for log_weights, trace, finite in rounds:
        weights.append(log_weights[finite])
        for name, site in sites.items():
            if site.kind == "latent":
                value = per_draw(trace.nodes[name]["value"], len(finite), site.pad, site.shape)
                samples.setdefault(name, []).append(value[finite])
    samples = {name: torch.cat(values)[:num_draws] for name, values in samples.items()}
    trace = vectorized_trace(model, samples, sites, num_draws, nesting, args, kwargs)
    return trace, torch.cat(weights)[:num_draws]


def resampled_draws(model, guide, draws: Draws, args, kwargs, options) -> Draws:
    """Replace the guide's draws by importance-resampled ones (:func:`importance_resample`)
    when their Pareto ``k̂`` is below :data:`KHAT_THRESHOLD`; else keep them and warn."""
    nesting = draws.nesting
    result = importance_resample(
        model,
        guide,
        *args,
        num_samples=draws.num_draws,
        max_plate_nesting=nesting,
        **options,
        **kwargs,
    )
    draws.attrs = {
        "importance_pareto_k": result.pareto_k,
        "importance_ess": result.ess,
        "importance_proposals": int(result.log_weights.numel()),
        "importance_resampled": int(result.reliable),
    }
    if not result.reliable:
        warnings.warn(
            f"importance resampling not applied: the Pareto k of its weights is "
            f"{result.pareto_k:.2f} >= {KHAT_THRESHOLD} (the guide misses too much of the "
            f"posterior for its draws to be corrected); the guide's own draws are returned",
            RuntimeWarning,
            stacklevel=4,
        )
        return draws
    num = result.log_weights.numel()
    samples = {
        name: per_draw(result.model_trace.nodes[name]["value"], num, site.pad, site.shape)[
            result.indices
        ]
        for name, site in draws.sites.items()
        if site.kind == "latent"
    }
    trace = vectorized_trace(model, samples, draws.sites, draws.num_draws, nesting, args, kwargs)
    return dataclasses.replace(
        draws, trace=trace, sample_stats={"lp": log_joint(trace, DRAW_PLATE)}
    )


def mcmc_draws(model, mcmc, args, kwargs) -> Draws:
    """The draws of a finished :class:`~pyro.infer.MCMC` run (chains kept), with ``lp`` and,
    for NUTS/HMC, ``diverging``."""
    grouped = mcmc.get_samples(group_by_chain=True)
    if not grouped:
        raise ValueError("mcmc has no samples; call mcmc.run(...) first")
    num_chains, num_per_chain = next(iter(grouped.values())).shape[:2]
    num_draws = num_chains * num_per_chain
    samples = {k: v.reshape((num_draws,) + v.shape[2:]) for k, v in grouped.items()}
    trace, sites, _ = conditioned_trace(model, samples, args, kwargs)
    stats = {"lp": log_joint(trace, DRAW_PLATE)}
    divergences = mcmc.diagnostics().get("divergences")
    if divergences is not None:
        diverging = torch.zeros(num_chains, num_per_chain, dtype=torch.bool)
        for chain in range(num_chains):
            diverging[chain, list(divergences[f"chain {chain}"])] = True
        stats["diverging"] = diverging.reshape(-1)
    return Draws(trace, sites, num_draws, num_chains, stats)


def prior_draws(model, args, kwargs, num_draws: int) -> Draws:
    """``num_draws`` draws of the model itself (one chain)."""
    with torch.no_grad(), poutine.block():
        reference = poutine.trace(model).get_trace(*args, **kwargs)
    nesting = plate_nesting(reference)
    sites = describe_sites(reference, nesting)
    trace = vectorized_trace(model, {}, sites, num_draws, nesting, args, kwargs)
    return Draws(trace, sites, num_draws, 1, {})


__all__ = [
    "DRAW_PLATE",
    "Draws",
    "SiteInfo",
    "conditioned_trace",
    "describe_sites",
    "guide_draws",
    "mcmc_draws",
    "per_draw",
    "prior_draws",
    "resampled_draws",
    "vectorized_trace",
]
