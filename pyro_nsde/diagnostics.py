r"""Posterior diagnostics in ArviZ, and the importance-sampling check of a variational fit.

:func:`to_inference_data` turns a fit of a Pyro model (a trained guide, or a finished
:class:`~pyro.infer.MCMC` run) into an ArviZ object, with the path sites laid out as paths:
dims ``(chain, draw, *plate_dims, "time", "state")`` and the ``time`` coordinate taken from the
site's Euler–Maruyama grid.

ArviZ 0.x returns an :class:`arviz.InferenceData`, ArviZ ≥ 1 an :class:`xarray.DataTree`, with
other function names and results. :func:`summary`, :func:`loo` (a :class:`LOO` record),
:func:`plot_ppc`, :func:`plot_trace`, :func:`to_netcdf` and :func:`from_netcdf` give the same
results on both lines (same summary columns, one NetCDF-4 file format) by calling whichever
ArviZ is installed.

:func:`variational_diagnostics` measures how well a guide ``q`` matches the posterior
``p(z | y)`` through the importance weights of its draws,

    ``log w_s = log p(z_s, y) - log q(z_s)``,  ``z_s ~ q``,  ``s = 1..S``,

whose mean is the ELBO, whose log-mean-exp is an importance-sampling estimate of ``log p(y)``,
and whose upper tail gives the Pareto shape ``k̂`` of Yao et al. (2018) (see
:func:`pareto_khat` and ``docs/diagnostics.md``).

**References:**

[1] Yuling Yao, Aki Vehtari, Daniel Simpson, Andrew Gelman (2018), "Yes, but Did It Work?:
    Evaluating Variational Inference", ICML.
[2] Aki Vehtari, Daniel Simpson, Andrew Gelman, Yuling Yao, Jonah Gabry (2024), "Pareto
    Smoothed Importance Sampling", JMLR.
"""

import dataclasses
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.importance import vectorized_importance_weights
from pyro.infer.util import plate_log_prob_sum
from pyro.ops.stats import fit_generalized_pareto
from pyro.poutine.util import prune_subsample_sites

from . import _arviz
from ._arviz import LOO, from_netcdf, loo, plot_ppc, plot_trace, summary, to_netcdf
from .guide import unwrap_path_distribution
from .importance import KHAT_THRESHOLD, importance_resample

_DRAW_PLATE = "_pyro_nsde_draws"


# --------------------------------------------------------------------------- variational fit


@dataclasses.dataclass(frozen=True)
class VariationalDiagnostics:
    """Importance-sampling summary of a guide against its model, from ``S`` guide draws.

    :ivar float pareto_k: the Pareto shape ``k̂`` of the upper tail of the weights
        (:func:`pareto_khat`); ``< 0.5`` good, ``0.5–0.7`` usable with care, ``> 0.7`` the
        guide is far from the posterior (``nan`` when ``S`` is too small to fit a tail).
    :ivar float elbo: ``mean_s log w_s``, an unbiased estimate of the ELBO.
    :ivar float elbo_stderr: its Monte Carlo standard error.
    :ivar float log_evidence: ``log mean_s w_s``, the importance-sampling estimate of
        ``log p(y)`` (a lower bound in expectation, tighter than the ELBO).
    :ivar float ess: the effective sample size ``(Σ w)² / Σ w²`` of the ``S`` draws.
    :ivar int num_draws: ``S``.
    """

    pareto_k: float
    elbo: float
    elbo_stderr: float
    log_evidence: float
    ess: float
    num_draws: int

    @classmethod
    def from_log_weights(cls, log_weights: torch.Tensor) -> "VariationalDiagnostics":
        """Summarize log importance weights ``(S,)``."""
        lw = log_weights.detach().reshape(-1).double()
        num = lw.numel()
        normalized = lw - lw.logsumexp(0)
        return cls(
            pareto_k=pareto_khat(lw),
            elbo=float(lw.mean()),
            elbo_stderr=float(lw.std() / math.sqrt(num)) if num > 1 else math.nan,
            log_evidence=float(lw.logsumexp(0) - math.log(num)),
            ess=float(1.0 / (2 * normalized).logsumexp(0).exp()),
            num_draws=num,
        )


def pareto_khat(log_weights: torch.Tensor) -> float:
    r"""The Pareto shape ``k̂`` of the upper tail of importance weights ``w = exp(log_weights)``.

    The ``M = ⌈min(S / 5, 3 √S)⌉`` largest weights are fitted with a generalized Pareto law
    ``GPD(k, σ)`` of their excess ``w - u`` over the threshold ``u`` (the next largest weight),
    with the estimator of Zhang & Stephens and the weakly informative prior of Vehtari et al.
    (:func:`pyro.ops.stats.fit_generalized_pareto`). If ``P(w > t) ~ t^{-1/k}``, the weights
    have a finite variance for ``k < 1/2`` and a finite mean for ``k < 1``. As in
    :func:`pyro.infer.importance.psis_diagnostic`, tail weights below ``1e-15`` times the
    largest are dropped, and if fewer than 10 remain the weights are degenerate: ``k̂ = inf``.

    :param torch.Tensor log_weights: ``(S,)`` log weights (up to an additive constant).
    :returns: ``k̂``; ``nan`` when ``S < 50`` (``M < 10``) or the tail weights are all equal.
    """
    lw = torch.as_tensor(log_weights).detach().reshape(-1).double()
    if not torch.isfinite(lw).all():
        raise ValueError("log_weights must be finite, but some entries are inf or nan")
    lw = (lw - lw.max()).sort().values
    tail_size = math.ceil(min(0.2 * lw.numel(), 3.0 * math.sqrt(lw.numel())))
    if tail_size < 10:
        return math.nan
    threshold = float(lw[-tail_size - 1])
    if threshold == 0.0:
        return math.nan
    tail = lw[-tail_size:]
    tail = tail[tail > max(math.log(1e-15), threshold)]
    if tail.numel() < 10:
        return math.inf
    k, _ = fit_generalized_pareto(tail.exp() - math.exp(threshold))
    return float(k)


def variational_diagnostics(
    model,
    guide,
    *,
    model_args=(),
    model_kwargs=None,
    num_draws: int = 1000,
) -> VariationalDiagnostics:
    """Pareto ``k̂``, ELBO and importance-sampling evidence of ``guide`` against ``model``.

    Draws ``S = num_draws`` samples ``z_s ~ q`` in one vectorized run (the model must have all
    its batch dims in plates, as for ``Predictive(parallel=True)``) and summarizes
    ``log w_s = log p(z_s, y) - log q(z_s)``; see :class:`VariationalDiagnostics`.
    ``docs/diagnostics.md`` explains what a large ``k̂`` means for a path posterior.

    :param callable model: the Pyro model.
    :param callable guide: its trained guide (e.g. a :class:`~pyro_nsde.GirsanovGuide`).
    :param tuple model_args: positional arguments of model and guide (the data).
    :param dict model_kwargs: keyword arguments of model and guide.
    :param int num_draws: ``S``; ``k̂`` needs a few hundred at least.
    """
    _check_count("num_draws", num_draws)
    return _guide_draws(model, guide, model_args, model_kwargs or {}, num_draws).diagnostics


# --------------------------------------------------------------------------- model traces


@dataclasses.dataclass
class _Site:
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
class _Draws:
    """``S`` draws of the latent sites and the model trace vectorized over them."""

    trace: object
    sites: dict
    num_draws: int
    num_chains: int
    sample_stats: dict
    diagnostics: VariationalDiagnostics | None = None
    attrs: dict = dataclasses.field(default_factory=dict)


def _plate_nesting(*traces) -> int:
    """Number of batch dims the model uses: plate dims and distribution batch dims."""
    nesting = 0
    for trace in traces:
        for site in prune_subsample_sites(trace).nodes.values():
            if site["type"] == "sample":
                plates = [-f.dim for f in site["cond_indep_stack"] if f.vectorized]
                nesting = max([nesting, len(site["fn"].batch_shape), *plates])
    return nesting


def _describe(trace, max_plate_nesting: int, conditioned=()) -> dict:
    """The sample sites of an unbatched model trace, in execution order."""
    sites = {}
    for name, site in prune_subsample_sites(trace).nodes.items():
        if site["type"] != "sample" or isinstance(site["fn"], dist.Unit):
            continue
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.full_size != frame.size:
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
        sites[name] = _Site(
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


def _per_draw(value, num_draws: int, pad: int | None, shape) -> torch.Tensor:
    """Drop the vectorization padding: a value broadcastable to ``(S, *(1,) * pad, *shape)``
    becomes ``(S, *shape)``. ``pad=None`` reads the padding off ``value.dim()``."""
    value = torch.as_tensor(value)
    if pad is None:
        pad = max(value.dim() - 1 - len(shape), 0)
    full = torch.broadcast_shapes(value.shape, (num_draws,) + (1,) * pad + tuple(shape))
    return value.expand(full).reshape((num_draws, *shape))


def _vectorized_trace(
    model, samples: dict, sites: dict, num_draws: int, nesting: int, args, kwargs
):
    """Run ``model`` once on ``S`` draws: ``samples[name]`` is ``(S, *site.shape)``; the draws
    sit on dim ``-(nesting + 1)``. Unconditioned latent sites are drawn from the model."""
    data = {
        name: value.reshape((num_draws,) + (1,) * sites[name].pad + tuple(sites[name].shape))
        for name, value in samples.items()
    }
    with torch.no_grad(), poutine.block():
        with pyro.plate(_DRAW_PLATE, num_draws, dim=-(nesting + 1)):
            trace = poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)
    return prune_subsample_sites(trace)


def _log_joint(trace, plate_name: str) -> torch.Tensor:
    """``log p(z_s, y)`` for each draw ``s`` of a vectorized trace, ``(S,)``."""
    trace.compute_log_prob()
    trace.pack_tensors()
    return plate_log_prob_sum(trace, trace.plate_to_symbol[plate_name]).reshape(-1)


def _guide_draws(
    model, guide, args, kwargs, num_draws: int, num_chains: int = 1, importance=None
) -> _Draws:
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        reference = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        nesting = _plate_nesting(reference, guide_trace)
        log_weights, trace, _ = vectorized_importance_weights(
            model, guide, *args, num_samples=num_draws, max_plate_nesting=nesting, **kwargs
        )
    log_joint = plate_log_prob_sum(trace, trace.plate_to_symbol["num_particles_vectorized"])
    log_weights = log_weights.reshape(-1)
    draws = _Draws(
        trace=trace,
        sites=_describe(reference, nesting),
        num_draws=num_draws,
        num_chains=num_chains,
        sample_stats={"lp": log_joint.reshape(-1), "log_weight": log_weights},
        diagnostics=VariationalDiagnostics.from_log_weights(log_weights),
    )
    if importance is not None:
        draws = _resampled(model, guide, draws, nesting, args, kwargs, importance)
    return draws


def _resampled(model, guide, draws: _Draws, nesting: int, args, kwargs, options) -> _Draws:
    """Replace the guide's draws by importance-resampled ones (:func:`importance_resample`)
    when their Pareto ``k̂`` is below :data:`KHAT_THRESHOLD`; else keep them and warn."""
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
        name: _per_draw(result.model_trace.nodes[name]["value"], num, site.pad, site.shape)[
            result.indices
        ]
        for name, site in draws.sites.items()
        if site.kind == "latent"
    }
    trace = _vectorized_trace(model, samples, draws.sites, draws.num_draws, nesting, args, kwargs)
    return dataclasses.replace(
        draws, trace=trace, sample_stats={"lp": _log_joint(trace, _DRAW_PLATE)}
    )


def _mcmc_draws(model, mcmc, args, kwargs) -> _Draws:
    grouped = mcmc.get_samples(group_by_chain=True)
    if not grouped:
        raise ValueError("mcmc has no samples; call mcmc.run(...) first")
    num_chains, num_per_chain = next(iter(grouped.values())).shape[:2]
    num_draws = num_chains * num_per_chain
    samples = {k: v.reshape((num_draws,) + v.shape[2:]) for k, v in grouped.items()}
    with torch.no_grad(), poutine.block():
        first = {k: v[0] for k, v in samples.items()}
        reference = poutine.trace(poutine.condition(model, data=first)).get_trace(*args, **kwargs)
    nesting = _plate_nesting(reference)
    sites = _describe(reference, nesting, conditioned=samples)
    trace = _vectorized_trace(model, samples, sites, num_draws, nesting, args, kwargs)
    stats = {"lp": _log_joint(trace, _DRAW_PLATE)}
    divergences = mcmc.diagnostics().get("divergences")
    if divergences is not None:
        diverging = torch.zeros(num_chains, num_per_chain, dtype=torch.bool)
        for chain in range(num_chains):
            diverging[chain, list(divergences[f"chain {chain}"])] = True
        stats["diverging"] = diverging.reshape(-1)
    return _Draws(trace, sites, num_draws, num_chains, stats)


def _prior_draws(model, args, kwargs, num_draws: int) -> _Draws:
    with torch.no_grad(), poutine.block():
        reference = poutine.trace(model).get_trace(*args, **kwargs)
    nesting = _plate_nesting(reference)
    sites = _describe(reference, nesting)
    trace = _vectorized_trace(model, {}, sites, num_draws, nesting, args, kwargs)
    return _Draws(trace, sites, num_draws, 1, {})


# --------------------------------------------------------------------------- groups


def _to_numpy(tensor: torch.Tensor, num_chains: int) -> np.ndarray:
    """``(S, ...)`` → ``(chains, S / chains, ...)`` numpy."""
    array = tensor.detach().cpu().numpy()
    return array.reshape((num_chains, array.shape[0] // num_chains, *array.shape[1:]))


def _observation_terms(site: _Site, node: dict, num_draws: int):
    """Pointwise log-likelihood ``(S, *pointwise)``, predictive draws ``(S, *shape)`` and the
    mask of observed entries ``pointwise`` of an observed site in a vectorized trace.

    ``pointwise`` is the site's shape without the event dims of its innermost distribution
    (``Independent`` and masks unwrapped), so there is one term per observed scalar of a
    univariate likelihood.
    """
    fn = node["fn"]
    masks = [] if node["mask"] is None else [node["mask"]]
    while isinstance(fn, (dist.Independent, MaskedDistribution)):
        if isinstance(fn, MaskedDistribution):
            masks.append(fn._mask)
        fn = fn.base_dist
    pointwise = site.shape[: len(site.shape) - len(fn.event_shape)]
    log_lik = _per_draw(fn.log_prob(node["value"]), num_draws, site.pad, pointwise)
    predictive = _per_draw(node["fn"].sample(), num_draws, site.pad, site.shape)
    observed = torch.ones((num_draws, *pointwise), dtype=torch.bool)
    for mask in masks:
        observed = observed & _per_draw(torch.as_tensor(mask), num_draws, site.pad, pointwise)
    if not (observed == observed[:1]).all():
        raise ValueError(
            f"the mask of observed site {site.name!r} changes between draws; "
            f"to_inference_data needs masks that do not depend on latent values"
        )
    return log_lik, predictive, observed[0]


def _draw_groups(draws: _Draws, prefix: str, log_likelihood: bool) -> tuple[dict, dict]:
    """ArviZ groups of posterior or prior draws, as ``({group: {name: array}}, masks)``.

    An observed site with masked-out entries is flattened onto its observed entries; ``masks``
    maps its name to the boolean mask ``pointwise`` of the observed entries."""
    chains, num = draws.num_chains, draws.num_draws
    predictive_group = "posterior_predictive" if prefix == "posterior" else "prior_predictive"
    groups = {prefix: {}, predictive_group: {}, "observed_data": {}, "log_likelihood": {}}
    masks = {}
    for name, site in draws.sites.items():
        node = draws.trace.nodes[name]
        if site.kind != "observed":
            value = _per_draw(node["value"], num, site.pad, site.shape)
            groups[prefix][name] = _to_numpy(value, chains)
            continue
        log_lik, predictive, observed = _observation_terms(site, node, num)
        data = site.value.expand(site.shape)
        if not observed.all():
            masks[name] = observed
            log_lik, predictive, data = (
                log_lik[:, observed],
                predictive[:, observed],
                data[observed],
            )
        groups[predictive_group][name] = _to_numpy(predictive, chains)
        groups["observed_data"][name] = data.cpu().numpy()
        groups["log_likelihood"][name] = _to_numpy(log_lik, chains)
    if not log_likelihood or prefix == "prior":
        del groups["log_likelihood"]
    if prefix == "posterior" and draws.sample_stats:
        groups["sample_stats"] = {k: _to_numpy(v, chains) for k, v in draws.sample_stats.items()}
    return {k: v for k, v in groups.items() if v}, masks


# --------------------------------------------------------------------------- dims and coords


def _squeeze_grid(times: torch.Tensor) -> torch.Tensor:
    """A grid without leading singleton dims: ``(K+1,)`` or ``(*series, K+1)``."""
    times = times.detach()
    while times.dim() > 1 and times.shape[0] == 1:
        times = times[0]
    return times


def _default_layout(sites: dict):
    """Default dims of every site (path sites end in ``time``/``state`` dims, shared by all
    path sites with the same grid and state dimension) and the ``time`` coordinates."""
    dims, coords = {}, {}
    first = None
    for name, site in sites.items():
        dims[name] = list(site.dims)
        if site.path is None:
            continue
        times = _squeeze_grid(site.path.times)
        if first is None:
            first = (times, site.path.state_dim)
        same_grid = times.shape == first[0].shape and bool((times == first[0]).all())
        time_dim = "time" if same_grid else f"{name}_time"
        state_dim = "state" if site.path.state_dim == first[1] else f"{name}_state"
        dims[name][-2:] = [time_dim, state_dim]
        if times.dim() == 1:
            coords[time_dim] = times.cpu().numpy()
    return dims, coords


def _grid_coordinate(times: torch.Tensor, dims, shape) -> tuple | None:
    """For a path variable with ``dims`` and per-draw ``shape`` ``(*series, T, d)`` on a grid per
    series ``times`` ``(..., T)``: the coordinate ``"{time_dim}_value"`` over
    ``(*series dims, time_dim)`` holding each series' times, as ``(name, dims, values)``.
    ``None`` for a shared grid ``(T,)``."""
    times = _squeeze_grid(times)
    if times.dim() == 1:
        return None
    grid_ndim = times.dim() - 1
    coord_dims = tuple(dims[len(dims) - 2 - grid_ndim : len(dims) - 1])
    expanded = times.expand(tuple(shape[len(shape) - 2 - grid_ndim : -1]))
    return f"{dims[-2]}_value", coord_dims, expanded.cpu().numpy()


def _check_dims(sites: dict, dims: dict):
    for name, names in dims.items():
        if name in sites and len(names) != len(sites[name].shape):
            raise ValueError(
                f"dims[{name!r}] must name the {len(sites[name].shape)} dims of a draw of site "
                f"{name!r} (shape {tuple(sites[name].shape)}), but got {list(names)}"
            )


def _flat_coords(name: str, dims: list, mask: torch.Tensor, coords: dict) -> dict:
    """Coordinates ``"{site}_obs_{dim}"`` over the flattened observed entries of a masked site:
    the label (or index) of each entry along each original dim."""
    index = mask.nonzero(as_tuple=True)
    out = {}
    for dim, positions in zip(dims, index, strict=True):
        positions = positions.cpu().numpy()
        labels = np.asarray(coords[dim])[positions] if dim in coords else positions
        out[f"{name}_obs_{dim}"] = ((f"{name}_obs",), labels)
    return out


# --------------------------------------------------------------------------- containers


def _assemble(groups, coords, dims, extra_coords, attrs, container):
    """Build the ArviZ object, then attach the coordinates ``from_dict`` cannot express."""
    data = _arviz.build(groups, coords=coords, dims=dims, container=container)
    for group in groups:
        data = _arviz.update_group(
            data, group, coords=extra_coords.get(group), attrs=attrs.get(group)
        )
    return data


def _check_count(name, value):
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be a positive int, but got {value!r}")


# --------------------------------------------------------------------------- conversion


def to_inference_data(
    model,
    *,
    guide=None,
    mcmc=None,
    model_args=(),
    model_kwargs=None,
    num_samples: int = 1000,
    num_chains: int = 1,
    coords=None,
    dims=None,
    log_likelihood: bool = True,
    prior: bool = False,
    container: str | None = None,
    importance_resampling: bool | dict = False,
):
    r"""Convert a fit of ``model`` to ArviZ.

    Groups (ArviZ's schema; ``S`` draws arranged as ``(chain, draw)``):

    - ``posterior``: every latent and deterministic site. A path site (an
      :class:`~pyro_nsde.EulerMaruyama`, possibly masked or under ``to_event``) has dims
      ``(chain, draw, *plate_dims, "time", "state")``; ``time`` carries the grid
      ``t_0 < ... < t_K``. A grid per series ``(..., K+1)`` makes ``time`` the step index and
      adds the coordinate ``"time_value"`` over ``(*series dims, "time")``. Path sites with
      another grid (or state dimension) than the first get ``"{site}_time"``
      (``"{site}_state"``).
    - ``posterior_predictive``: each observed site redrawn from its likelihood at each draw.
    - ``observed_data``: the observed values.
    - ``log_likelihood`` (if ``log_likelihood``): ``log p(y_i | z_s)`` for each draw ``s`` and
      each observed scalar ``y_i`` (each event of a multivariate likelihood), so ``az.loo`` and
      ``az.waic`` apply. Observations masked out (``poutine.mask``, ``.mask(...)``) are left
      out: such a site is stored in the three groups above over one dim ``"{site}_obs"`` of the
      observed entries, with coordinates ``"{site}_obs_{dim}"`` giving their position along the
      site's dims.
    - ``sample_stats``: ``lp = log p(z_s, y)``; from MCMC also ``diverging`` (NUTS/HMC); from a
      guide also ``log_weight = log p(z_s, y) - log q(z_s)``, with the
      :class:`VariationalDiagnostics` of these weights (``pareto_k``, ``elbo``, ...) in the
      group's ``attrs``.
    - ``prior`` and ``prior_predictive`` (if ``prior``): ``num_samples`` draws of the model
      (one chain).

    Other dims are named after the :func:`pyro.plate` that holds them, else
    ``"{site}_dim_{i}"``; ``dims`` and ``coords`` override per variable / dim.

    Draws are taken in one vectorized run over an extra leftmost batch dim, as
    ``Predictive(parallel=True)`` does, so the model must put all its batch dims in plates.

    :param callable model: the Pyro model.
    :param guide: a trained guide: ``num_chains × num_samples`` draws are taken from it.
    :param mcmc: a finished :class:`~pyro.infer.MCMC`: its chains and draws are kept
        (``num_samples``, ``num_chains`` are then ignored). Give exactly one of ``guide`` and
        ``mcmc``, or neither with ``prior=True``.
    :param tuple model_args: positional arguments of the model (the data it was fitted to).
    :param dict model_kwargs: keyword arguments of the model.
    :param int num_samples: draws per chain from the guide, or from the prior.
    :param int num_chains: chains drawn from the guide (independent draws).
    :param dict coords: ``{dim: labels}``, e.g. ``{"state": ["hare", "lynx"]}``.
    :param dict dims: ``{variable: [dim names of one draw]}``.
    :param bool log_likelihood: include the ``log_likelihood`` group.
    :param bool prior: include ``prior`` and ``prior_predictive``.
    :param str container: ``"InferenceData"`` (ArviZ 0.x) or ``"DataTree"`` (ArviZ 1.x, or
        ``arviz-base`` with ArviZ 0.x); default: that of the installed ArviZ.
    :param importance_resampling: with a guide, correct its draws towards the posterior by
        importance resampling (:func:`~pyro_nsde.importance.importance_resample`: proposals
        from the guide widened into Student-t laws, Pareto-smoothed weights): ``True``, or a
        dict of its options (``num_proposals``, ``df``, ``inflate``, ``rounds``). The draws are
        replaced only if the weights' Pareto ``k̂`` is below 0.7, else the guide's own draws
        are kept with a warning; ``sample_stats.attrs`` records ``importance_pareto_k``,
        ``importance_ess``, ``importance_proposals`` (how many weighted proposals the draws
        were resampled from) and ``importance_resampled``. The ``log_weight`` statistic (of the
        guide's own draws) is then left out, and ``lp`` is that of the returned draws.
    :returns: :class:`arviz.InferenceData` or :class:`xarray.DataTree`.
    """
    if (guide is None) == (mcmc is None) and not (guide is None and prior):
        raise ValueError("give exactly one of guide= and mcmc= (or neither, with prior=True)")
    _check_count("num_samples", num_samples)
    _check_count("num_chains", num_chains)
    container = _arviz.check_container(container)
    kwargs = {} if model_kwargs is None else dict(model_kwargs)

    runs = []
    if guide is not None:
        num_draws = num_chains * num_samples
        importance = importance_resampling
        if importance is True:
            importance = {}
        elif importance is False:
            importance = None
        elif not isinstance(importance, dict):
            raise TypeError(
                f"importance_resampling must be a bool or a dict of options, but got "
                f"{importance_resampling!r}"
            )
        draws = _guide_draws(model, guide, model_args, kwargs, num_draws, num_chains, importance)
        runs.append(("posterior", draws))
    elif mcmc is not None:
        runs.append(("posterior", _mcmc_draws(model, mcmc, model_args, kwargs)))
    if prior:
        runs.append(("prior", _prior_draws(model, model_args, kwargs, num_samples)))

    groups, masks, sites, attrs = {}, {}, {}, {}
    for prefix, draws in runs:
        new_groups, new_masks = _draw_groups(draws, prefix, log_likelihood)
        for group, values in new_groups.items():
            groups.setdefault(group, {}).update(values)
        masks.update(new_masks)
        sites.update(draws.sites)
        if draws.diagnostics is not None:
            attrs["sample_stats"] = {**dataclasses.asdict(draws.diagnostics), **draws.attrs}

    default_dims, default_coords = _default_layout(sites)
    dims = {**default_dims, **(dims or {})}
    _check_dims(sites, dims)
    coords = {**default_coords, **(coords or {})}

    extra_coords = {}
    for name, site in sites.items():
        grid = None
        if site.path is not None:
            grid = _grid_coordinate(site.path.times, dims[name], site.shape)
        if grid is not None:
            for group in ("posterior", "prior"):
                if name in groups.get(group, {}):
                    extra_coords.setdefault(group, {})[grid[0]] = grid[1:]
        if name in masks:
            pointwise = masks[name].dim()
            flat = _flat_coords(name, dims[name][:pointwise], masks[name], coords)
            dims[name] = [f"{name}_obs", *dims[name][pointwise:]]
            for group in groups:
                if name in groups[group]:
                    extra_coords.setdefault(group, {}).update(flat)

    library = {"inference_library": "pyro", "inference_library_version": pyro.__version__}
    attrs = {group: {**library, **attrs.get(group, {})} for group in groups}
    return _assemble(groups, coords, dims, extra_coords, attrs, container)


__all__ = [
    "LOO",
    "VariationalDiagnostics",
    "from_netcdf",
    "loo",
    "pareto_khat",
    "plot_ppc",
    "plot_trace",
    "summary",
    "to_inference_data",
    "to_netcdf",
    "variational_diagnostics",
]
