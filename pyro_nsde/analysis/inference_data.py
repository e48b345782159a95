"""Conversion of a fit of a Pyro model to ArviZ, with path sites laid out as paths.

:func:`to_inference_data` turns a trained guide or a finished :class:`~pyro.infer.MCMC` run into
an ArviZ object (an :class:`arviz.InferenceData` on ArviZ 0.x, an :class:`xarray.DataTree` on
ArviZ 1.x), with the path sites' dims ``(chain, draw, *plate_dims, "time", "state")`` and the
``time`` coordinate taken from the site's Euler–Maruyama grid.
"""

import dataclasses

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import MaskedDistribution

from ..sde.checks import check_positive_int
from . import arviz_adapter
from .diagnostics import VariationalDiagnostics
from .draws import Draws, SiteInfo, guide_draws, mcmc_draws, per_draw, prior_draws, resampled_draws
from .layout import check_dims, default_layout, flat_coords, grid_coordinate


def _to_numpy(tensor: torch.Tensor, num_chains: int) -> np.ndarray:
    """``(S, ...)`` → ``(chains, S / chains, ...)`` numpy."""
    array = tensor.detach().cpu().numpy()
    return array.reshape((num_chains, array.shape[0] // num_chains, *array.shape[1:]))


def _observation_terms(site: SiteInfo, node: dict, num_draws: int):
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
    log_lik = per_draw(fn.log_prob(node["value"]), num_draws, site.pad, pointwise)
    predictive = per_draw(node["fn"].sample(), num_draws, site.pad, site.shape)
    observed = torch.ones((num_draws, *pointwise), dtype=torch.bool)
    for mask in masks:
        observed = observed & per_draw(torch.as_tensor(mask), num_draws, site.pad, pointwise)
    if not (observed == observed[:1]).all():
        raise ValueError(
            f"the mask of observed site {site.name!r} changes between draws; "
            f"to_inference_data needs masks that do not depend on latent values"
        )
    return log_lik, predictive, observed[0]


def _draw_groups(draws: Draws, prefix: str, log_likelihood: bool) -> tuple[dict, dict]:
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
            value = per_draw(node["value"], num, site.pad, site.shape)
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


def _assemble(groups, coords, dims, extra_coords, attrs, container):
    """Build the ArviZ object, then attach the coordinates ``from_dict`` cannot express."""
    data = arviz_adapter.build(groups, coords=coords, dims=dims, container=container)
    for group in groups:
        data = arviz_adapter.update_group(
            data, group, coords=extra_coords.get(group), attrs=attrs.get(group)
        )
    return data


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
    importance_resampling: bool | dict | str = "auto",
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
        importance resampling (:func:`~pyro_nsde.analysis.importance.importance_resample`:
        proposals from the guide widened into Student-t laws, Pareto-smoothed weights):
        ``"auto"`` (the default: when a draw has at most :data:`MAX_WEIGHTED_DIM` latent
        coordinates), ``True``, ``False``, or a dict of its options (``num_proposals``,
        ``df``, ``inflate``, ``rounds``). The draws are replaced only if the weights' Pareto
        ``k̂`` is below 0.7, else the guide's own draws are kept with a warning;
        ``sample_stats.attrs`` records ``importance_pareto_k``, ``importance_ess``,
        ``importance_proposals`` (how many weighted proposals the draws were resampled from)
        and ``importance_resampled``. The ``log_weight`` statistic (of the guide's own draws)
        is then left out, and ``lp`` is that of the returned draws.
    :returns: :class:`arviz.InferenceData` or :class:`xarray.DataTree`.
    """
    if (guide is None) == (mcmc is None) and not (guide is None and prior):
        raise ValueError("give exactly one of guide= and mcmc= (or neither, with prior=True)")
    check_positive_int("num_samples", num_samples)
    check_positive_int("num_chains", num_chains)
    container = arviz_adapter.check_container(container)
    kwargs = {} if model_kwargs is None else dict(model_kwargs)
    runs = []
    if guide is not None:
        importance = _importance_options(importance_resampling)
        draws = guide_draws(model, guide, model_args, kwargs, num_chains * num_samples, num_chains)
        diagnostics = VariationalDiagnostics.from_log_weights(draws.log_weights)
        if importance_resampling == "auto" and not _weighable(draws):
            importance = None
        if importance is not None:
            draws = resampled_draws(model, guide, draws, model_args, kwargs, importance)
        draws.attrs = {**dataclasses.asdict(diagnostics), **draws.attrs}
        runs.append(("posterior", draws))
    elif mcmc is not None:
        runs.append(("posterior", mcmc_draws(model, mcmc, model_args, kwargs)))
    if prior:
        runs.append(("prior", prior_draws(model, model_args, kwargs, num_samples)))
    return _convert(runs, coords, dims, log_likelihood, container)


#: ``importance_resampling="auto"`` weights the guide's draws when they have at most this many
#: latent coordinates (a path of a few thousand states and its parameters): beyond, the weights
#: of any guide short of exact degenerate, and proposals of that size cost more than they give.
MAX_WEIGHTED_DIM = 20000


def _weighable(draws) -> bool:
    """Whether ``"auto"`` importance resampling applies to a guide's draws: at most
    :data:`MAX_WEIGHTED_DIM` latent coordinates per draw."""
    size = sum(site.shape.numel() for site in draws.sites.values() if site.kind == "latent")
    return size <= MAX_WEIGHTED_DIM


def _importance_options(importance_resampling):
    """The options of importance resampling (``None``: none)."""
    if importance_resampling is True or importance_resampling == "auto":
        return {}
    if importance_resampling is False:
        return None
    if not isinstance(importance_resampling, dict):
        raise TypeError(
            f"importance_resampling must be 'auto', a bool or a dict of options, but got "
            f"{importance_resampling!r}"
        )
    return importance_resampling


def _convert(runs, coords, dims, log_likelihood, container):
    """The ArviZ object of ``[(prefix, Draws)]``."""
    groups, masks, sites, attrs = {}, {}, {}, {}
    for prefix, draws in runs:
        new_groups, new_masks = _draw_groups(draws, prefix, log_likelihood)
        for group, values in new_groups.items():
            groups.setdefault(group, {}).update(values)
        masks.update(new_masks)
        sites.update(draws.sites)
        if draws.attrs:
            attrs["sample_stats"] = draws.attrs
    default_dims, default_coords = default_layout(sites)
    dims = {**default_dims, **(dims or {})}
    check_dims(sites, dims)
    coords = {**default_coords, **(coords or {})}
    extra_coords = _extra_coords(groups, sites, masks, dims, coords)
    library = {"inference_library": "pyro", "inference_library_version": pyro.__version__}
    attrs = {group: {**library, **attrs.get(group, {})} for group in groups}
    return _assemble(groups, coords, dims, extra_coords, attrs, container)


def _extra_coords(groups, sites, masks, dims, coords) -> dict:
    """``{group: {name: (dims, values)}}``: the per-series grid of path sites, and the
    positions of the observed entries of masked sites (whose ``dims`` are updated to the
    flattened ``"{site}_obs"``)."""
    extra = {}
    for name, site in sites.items():
        grid = None
        if site.path is not None:
            grid = grid_coordinate(site.path.times, dims[name], site.shape)
        if grid is not None:
            for group in ("posterior", "prior"):
                if name in groups.get(group, {}):
                    extra.setdefault(group, {})[grid[0]] = grid[1:]
        if name in masks:
            pointwise = masks[name].dim()
            flat = flat_coords(name, dims[name][:pointwise], masks[name], coords)
            dims[name] = [f"{name}_obs", *dims[name][pointwise:]]
            for group in groups:
                if name in groups[group]:
                    extra.setdefault(group, {}).update(flat)
    return extra


__all__ = ["to_inference_data"]
