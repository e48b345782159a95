r"""A start for the hierarchical family: each series' likelihood on its nodes, and the
hyperparameters at the Laplace approximation of their marginal posterior.

For the family of :mod:`~pyro_nsde.guide.hierarchical`, with the paths integrated out by the
guide's Kalman conditional (as in :mod:`~pyro_nsde.guide.global_laplace`), the log-likelihood
of series ``i`` at a value ``η`` of its parameter is

    ``ℓ_i(η) = log p(y_i, x̄_i | η) - log q(x̄_i | η)``

at the mean path ``x̄_i`` of ``q(· | η)`` (exact for a linear SDE observed with Gaussian noise,
where the ratio does not depend on the path). All series are evaluated at once, a few nodes at
a time (vectorized along a points dim), and set as the family's ``λ_{ij}``. With them, the
hyperparameters' marginal posterior is a cheap function,

    ``log p(g | y) ≈ log p(g) + Σ_i log Σ_j exp(λ_{ij}) N(η_{ij}; μ(g), σ(g)²) Δ_i``,

whose mode (L-BFGS) and curvature (central differences) start ``q(g)``. This runs twice: first
on :data:`COARSE_NODES` nodes over the family's initial span (the population law at the
initial hyperparameters, wide), then on the family's own nodes spanning each series'
conditional under a population :data:`WIDENING` times as wide as at the first start.
"""

import math

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to

from ..sde.sites import outside_inference, run_to_sites, site_scale
from . import sweep
from .global_laplace import POINTS_PLATE, inverse_hessian, set_family

#: The least log-likelihood of a node relative to its series' best (a weight of ``e^-50``:
#: none, while keeping the family's entropy finite).
LOG_LIKELIHOOD_FLOOR = -50.0
#: Nodes per series of the first, coarse evaluation.
COARSE_NODES = 16
#: Path coordinates (nodes × series × steps × dims) evaluated together: the nodes of one run.
STATES_PER_RUN = 8_000_000
#: Refined nodes span each series' conditional under a population this many times wider (its
#: law raised to the power ``1 / WIDENING²``)...
WIDENING = 2.0
#: ... this many of that conditional's sds either way.
REFINED_SPAN = 6.0


def population_start(guide, args, kwargs) -> bool:
    """Start ``guide``'s hierarchical family as the module docstring says; returns whether the
    hyperparameters' start was applied (their mode finite, their curvature positive
    definite)."""
    with outside_inference():  # not part of the trace of the call that sets the guide up
        return _population_start(guide, args, kwargs)


def _population_start(guide, args, kwargs) -> bool:
    family = guide.latent_guide
    for name in family.local:
        grid = family.node_grid(name)
        family.set_nodes(name, grid[..., 0], grid[..., -1], num_nodes=COARSE_NODES)
        _evaluate_nodes(guide, name, args, kwargs)
    applied = family.global_guide is None or _start_globals(guide, args, kwargs)
    for name in family.local:
        _refine_nodes(guide, name, args, kwargs)
        _evaluate_nodes(guide, name, args, kwargs)
    if family.global_guide is not None:
        applied = _start_globals(guide, args, kwargs)
    guide.refresh_all(*args, **kwargs)
    return applied


def _series_chunks(guide, args, kwargs):
    """Yield the guide's plates for each chunk of series (all of them at once without
    subsampled plates; see :mod:`~pyro_nsde.guide.sweep`)."""
    for data in sweep.chunks(guide._prototype_frames):
        with guide.fixed_subsample(data):
            yield guide._create_plates(*args, **kwargs)


def _medians(family, args, kwargs, but: str) -> dict:
    """The medians of the family's sites (for the plates' current subsample) other than
    ``but``: the hyperparameters, and the series' other parameters."""
    medians = family.median(*args, **kwargs)
    return {k: v.detach() for k, v in medians.items() if k != but}


def series_log_likelihood(guide, values: dict, name: str, args, kwargs) -> torch.Tensor:
    """``ℓ_i`` (see the module docstring) of every series at the values of the local site
    ``name`` in ``values``, which carry ``P`` points along dim ``-(nesting + 1)``:
    ``(P, *site shape)``, the terms of the sites in every plate of ``name`` other than the
    local sites' population laws, less the log density of the mean paths."""
    family, node = guide.latent_guide, guide.prototype_trace.nodes[name]
    frames = {f.name for f in node["cond_indep_stack"] if f.vectorized}
    num = next(iter(values.values())).shape[0]
    densities = []

    def mean_path(site_name, posterior):
        path = guide.mean_path(site_name, posterior)
        law = posterior.base_dist if guide.sites[site_name].ndims else posterior
        densities.append(law.log_density(path))
        return path

    with torch.no_grad(), outside_inference():
        with pyro.plate(POINTS_PLATE, num, dim=-(guide.nesting + 1)):
            plates = guide._create_plates(*args, **kwargs)
            with poutine.block():
                drawn = guide.draw_paths(values, mean_path, args, kwargs, plates)
            model = poutine.condition(guide.raw_model, data={**drawn, **sweep.indices(plates)})
            with pyro.validation_enabled(False):  # extreme nodes may overflow a path
                trace = poutine.trace(model).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    shape = (num, *values[name].shape[values[name].dim() - node["value"].dim() :])
    total = -sum(_per_series(d, guide.nesting, shape) for d in densities)
    # In units of the paths' scale: every series counts once (a subsampled plate scales its
    # sites by N / n).
    scale = site_scale(trace.nodes[next(iter(guide.sites))])
    for site_name, site in trace.nodes.items():
        if site["type"] != "sample" or site_name in family.local:
            continue
        if frames <= {f.name for f in site["cond_indep_stack"] if f.vectorized}:
            total = total + _per_series(site["log_prob"] / scale, guide.nesting, shape)
    return total


def _per_series(tensor, nesting, shape) -> torch.Tensor:
    """A log density with the points along dim ``-(nesting + 1)``, summed over every other dim
    left of the last ``len(shape) - 1`` (a site's own): laid out ``shape``."""
    ndim = max(tensor.dim(), nesting + 1)
    tensor = tensor.reshape((1,) * (ndim - tensor.dim()) + tensor.shape)
    own = len(shape) - 1
    summed = [d for d in range(-ndim, -own if own else 0) if d != -(nesting + 1)]
    if summed:
        tensor = tensor.sum(summed)
    return tensor.expand(shape)


def _evaluate_nodes(guide, name, args, kwargs):
    """Set ``λ`` of local site ``name`` to ``ℓ_i`` at its nodes, the hyperparameters at the
    medians of their family."""
    family = guide.latent_guide
    node = guide.prototype_trace.nodes[name]
    transform = biject_to(node["fn"].support)
    states = sum(guide.prototype_trace.nodes[n]["value"].numel() for n in guide.sites)
    per_run = max(1, STATES_PER_RUN // max(1, states))
    full = None
    for plates in _series_chunks(guide, args, kwargs):
        others = _medians(family, args, kwargs, but=name)
        grid, _ = family.site_nodes(name, plates)  # (*site shape, J)
        pieces = []
        for start in range(0, grid.shape[-1], per_run):
            columns = grid[..., start : start + per_run].movedim(-1, 0)  # (P, *site shape)
            num = columns.shape[0]
            values = {
                k: _points_layout(guide, k, v.expand((num, *v.shape))) for k, v in others.items()
            }
            values[name] = _points_layout(guide, name, transform(columns))
            pieces.append(series_log_likelihood(guide, values, name, args, kwargs))
        log_likelihoods = _relative(torch.cat(pieces).movedim(0, -1))
        full = sweep.put(full, log_likelihoods, node["cond_indep_stack"], plates, event_dims=1)
    grid = family.node_grid(name)
    family.set_nodes(name, grid[..., 0], grid[..., -1], full, grid.shape[-1])


def _relative(log_likelihoods):
    """Log-likelihoods ``(..., J)`` less their maximum over the nodes, at least
    :data:`LOG_LIKELIHOOD_FLOOR` (a node where a path overflowed, not finite, gets the floor;
    a series with no finite node gets 0 everywhere: no information)."""
    finite = torch.isfinite(log_likelihoods)
    log_likelihoods = torch.where(finite, log_likelihoods, -torch.inf)
    top = log_likelihoods.amax(-1, keepdim=True)
    relative = (log_likelihoods - top).clamp(min=LOG_LIKELIHOOD_FLOOR)
    return torch.where(finite.any(-1, keepdim=True), relative, 0.0)


def _points_layout(guide, name, value):
    """A value ``(P, *site shape)`` with the points left of all of the model's plates."""
    node = guide.prototype_trace.nodes[name]
    pad = (1,) * (guide.nesting - len(node["fn"].batch_shape))
    return value.reshape((value.shape[0], *pad, *value.shape[1:]))


def _refine_nodes(guide, name, args, kwargs):
    """Nodes spanning each series' conditional under a population :data:`WIDENING` times as
    wide as at the hyperparameters' medians."""
    family = guide.latent_guide
    stack = guide.prototype_trace.nodes[name]["cond_indep_stack"]
    lower = upper = None
    with torch.no_grad(), outside_inference():
        for plates in _series_chunks(guide, args, kwargs):
            others = _medians(family, args, kwargs, but=name)
            population = family.local_law(name, others, plates, args, kwargs)
            law = family.conditional(name, population, plates, temper=WIDENING**-2)
            probs = law.log_probs.exp()
            centres = law.start + law.step * (torch.arange(probs.shape[-1]) + 0.5)
            mean = (probs * centres).sum(-1)
            spread = (probs * (centres - mean.unsqueeze(-1)).square()).sum(-1)
            sd = (spread + law.step.squeeze(-1).square()).sqrt()
            lower = sweep.put(lower, mean - REFINED_SPAN * sd, stack, plates, event_dims=0)
            upper = sweep.put(upper, mean + REFINED_SPAN * sd, stack, plates, event_dims=0)
    family.set_nodes(name, lower, upper)


def _start_globals(guide, args, kwargs) -> bool:
    """``q(g)`` at the Laplace approximation of the hyperparameters' marginal posterior (its
    density runs no paths, so each evaluation sums over all chunks of series)."""
    family = guide.latent_guide
    sites = []
    for name, node in family.global_guide.prototype_trace.iter_stochastic_nodes():
        transform = biject_to(node["fn"].support)
        sites.append((name, transform, transform.inv(node["value"]).shape))
    medians = family.global_guide.median(*args, **kwargs)

    def log_density(eta):
        values, log_jacobian, offset = {}, 0.0, 0
        for name, transform, shape in sites:
            free = eta[offset : offset + math.prod(shape)].reshape(shape)
            values[name] = transform(free)
            log_jacobian = log_jacobian + transform.log_abs_det_jacobian(free, values[name]).sum()
            offset += math.prod(shape)
        with outside_inference():
            reached = run_to_sites(family.raw_model, list(values), values, args, kwargs)
            total = log_jacobian + sum(reached[n]["fn"].log_prob(values[n]).sum() for n in values)
            for plates in _series_chunks(guide, args, kwargs):
                known = dict(values)  # the series' parameters drawn before a site: medians
                for name in family.local:
                    law = family.local_law(name, known, plates, args, kwargs)
                    conditional = family.conditional(name, law, plates)
                    total = total + conditional.normalizer.sum()
                    transform = biject_to(law.support)
                    known[name] = transform(conditional.median()).detach()
        return total

    eta = torch.cat([t.inv(medians[n]).reshape(-1) for n, t, _ in sites]).detach()
    eta.requires_grad_()
    optimizer = torch.optim.LBFGS(
        [eta],
        lr=1.0,
        max_iter=100,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-4,
        tolerance_change=1e-7,
    )

    def closure():
        optimizer.zero_grad()
        loss = -log_density(eta)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    mode = eta.detach()
    covariance = inverse_hessian(lambda points: torch.stack([log_density(p) for p in points]), mode)
    if covariance is None or not bool(torch.isfinite(mode).all()):
        return False
    set_family(family.global_guide, mode, covariance)
    return True


__all__ = ["population_start", "series_log_likelihood"]
