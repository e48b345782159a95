r"""How a path's coefficients start and follow the parameters drawn with the path.

An affine or linear control (and ``q(x_0)``) can start at the Laplace approximation of the
path's posterior (:func:`~pyro_nsde.posterior.laplace.laplace`), and its coefficients can
follow the parameters ``θ`` drawn with the path, so that ``q(path | θ)`` moves with them. Each
way is a small strategy class with one interface, chosen once per path site when the guide is
set up (:func:`choose_conditional`):

- :class:`PriorStart`: no approximation; the control starts at the prior (zero control);
- :class:`LaplaceStart`: the coefficients start at the Laplace fit and are moved with it at
  each refresh (what SVI learned on top is kept); they do not depend on ``θ``;
- :class:`TaylorConditional`: coefficients and ``E[x_0]`` affine in the centred unconstrained
  parameters ``η - η̂`` (those that share no plate with the path, and each series' own, in the
  path's plates: series ``i`` follows ``η_i``), slopes from central differences of the fit (see
  :class:`~pyro_nsde.posterior.controls.PerStepCoefficients`);
- :class:`KalmanConditional`: for every draw of ``θ``, the Kalman smoother of the model
  linearized about the fitted path gives the coefficients and ``q(x_0 | θ)``, differentiably;
  the control's parameters are learned corrections on top.

Every strategy offers ``fit`` (at given values of the other sites: returns the fitted path, or
``None``), ``inputs`` (what the control needs for the drawn values: centred parameters and a
base of coefficients) and its saved ``state``.
"""

import functools
import math
import warnings

import torch
from pyro.distributions.transforms import biject_to
from torch.distributions import Distribution

from ..posterior.kalman import GaussianSites, smooth
from ..posterior.laplace import (
    coefficients_of,
    init_of,
    is_linear_gaussian,
    laplace,
    linearize,
    posterior_mode,
    quadratic_sites,
)
from ..sde.sites import is_subsampled, outside_inference, path_log_likelihood
from . import sweep

#: Optimizer steps on coefficients that start at (and follow) a Laplace approximation are this
#: many times as large in their units as on an unconstrained parameter: they start near their
#: optimum, and full-size steps of Adam on noisy gradients would walk them away from it.
LAPLACE_STEP_SCALE = 0.1
#: The step ``ε`` (in unconstrained units) of the central differences that give the derivatives
#: of a path's Laplace approximation in the parameters it depends on.
SENSITIVITY_STEP = 0.05


class PriorStart:
    """The path's guide starts at the prior and does not follow the parameters: other
    controls, encoders, subsampled plates, ``init_path="prior"``, or a first Laplace fit
    that was not finite."""

    #: Optimizer step scale of the coefficients and ``q(x_0)``.
    step_scale = 1.0
    #: Whether the learned ``q(x_0)`` corrects a law given per draw.
    corrects_init = False
    #: Whether the law given per draw is the exact conditional posterior of the path, with
    #: nothing left for learned corrections to do (they are then left out).
    exact = False
    #: Whether the strategy fits a Laplace approximation.
    fits = False

    def __init__(self):
        self.param_sites = []
        self.local_sites = frozenset()

    def fit(self, guide, site, values, plates, args, kwargs):
        return None

    def inputs(self, guide, site, prior, values, plates, args, kwargs):
        """``(params, base)``: centred parameters and per-draw coefficients (``None``)."""
        return None, None

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


class LaplaceStart(PriorStart):
    """Coefficients and ``q(x_0)`` start at the path's Laplace approximation and are re-based
    on it at every refresh (see the module docstring)."""

    step_scale = LAPLACE_STEP_SCALE
    fits = True

    def __init__(self):
        super().__init__()
        self.path = None  # the last fitted path
        self.bases = {}  # {parameter: the value of the last fit it was set or moved to}
        self.centre = None  # the parameter values the coefficients are expanded about

    def state(self) -> dict:
        return {"path": self.path, "bases": dict(self.bases), "centre": self.centre}

    def load_state(self, state: dict) -> None:
        self.path, self.bases = state.get("path"), dict(state.get("bases", {}))
        self.centre = state.get("centre")

    def fit(self, guide, site, values, plates, args, kwargs):
        """Fit the Laplace approximation of the path at ``values`` (all ``2n + 1``
        perturbations of the parameter sites at once, see :meth:`_perturbed`) and move the
        control's coefficients and ``q(x_0)`` there. Returns the fitted path (``None`` if the
        fit is not finite: a first fit then leaves the guide at the prior, a refresh keeps
        the previous one). Must run outside of any inference handler."""
        sites = self.param_sites if site.control.param_dim else []
        batched, directions = _perturbed(guide, values, sites, self.local_sites)
        prior = guide.prior(site.name, batched, plates, *args, **kwargs)
        data = {**batched, **sweep.indices(plates)}
        log_likelihood = path_log_likelihood(guide.raw_model, site.name, data, args, kwargs)
        posterior, path = laplace(prior, log_likelihood, self.path)
        if not _finite_fit(posterior, path):
            self._warn_not_finite(site.name)
            return None
        self.path = path
        if sites:  # the coefficients are expanded about this point (see _centred)
            self.centre = {k: values[k].detach().clone() for k in sites}
        return self._rebase(site, posterior, path, directions)

    def _rebase(self, site, posterior, path, directions):
        """Move the coefficients and ``q(x_0)`` to a fit ``(2n + 1)`` times stacked along the
        dims left of the path's batch; returns the unperturbed path."""
        size = 2 * site.control.param_dim + 1 if directions is not None else 1
        split = functools.partial(
            _split_fits,
            size=size,
            batch_ndim=posterior.chain.h.dim() - 1,
            proto_batch=site.prototype_batch,
        )
        fits = {k: split(v) for k, v in coefficients_of(site.control, posterior).items()}
        for attr, value in fits.items():
            self._move(site.control_slot(attr), value[0], attr)
        if directions is not None:
            weight = _sensitivities(fits, site.control, directions)
            self._move(site.control_slot("param_weight"), weight, "param_weight")
        slots = site.initial.slots()
        if slots:
            loc, scale = init_of(posterior, site.full_init)
            loc = split(loc)
            self._move(slots["x0_loc"], loc[0], "x0_loc")
            self._move(slots["x0_scale"], split(scale)[0], "x0_scale")
            if directions is not None:
                n = site.control.param_dim
                slope = ((loc[1 : n + 1] - loc[n + 1 :]) / directions).movedim(0, -1)
                self._move(slots["x0_slope"], slope, "x0_slope")
        return split(path)[0]

    def _move(self, slot, value, key):
        self.bases[key] = slot.move(value, self.bases.get(key))

    def _warn_not_finite(self, name):
        if self.path is not None:
            message = "is not finite at the current values; its refresh is skipped"
        else:
            message = (
                "is not finite at the initial values (a path or likelihood that overflows); "
                "its guide starts at the prior, as with init_path='prior'"
            )
        warnings.warn(
            f"the Laplace approximation of path site {name!r} {message}",
            RuntimeWarning,
            stacklevel=5,
        )


class TaylorConditional(LaplaceStart):
    """Coefficients affine in the centred unconstrained values ``η - η̂`` of the latent sites
    the path follows (``param_sites``, see :func:`followed_sites`): slopes from central
    differences of the Laplace fit at refreshes, then learned. A site in the path's plates
    (``local_sites``) has its coordinates per plate element: perturbing coordinate ``j`` of
    every series at once gives each series' slope in its own ``η_{ij}``, as the series are
    independent given their parameters."""

    def __init__(self, param_sites, local_sites=()):
        super().__init__()
        self.param_sites = list(param_sites)
        self.local_sites = frozenset(local_sites)

    def inputs(self, guide, site, prior, values, plates, args, kwargs):
        return _centred(guide, self, values, len(prior.batch_shape)), None


class KalmanConditional(LaplaceStart):
    """For every draw of the parameters, the coefficients and ``q(x_0)`` of the Kalman
    smoother of the model linearized about the last fitted path, as differentiable functions
    of the parameters; the control's parameters and ``q(x_0)``'s are corrections on top.

    For a model linear-Gaussian in the path (affine drift, diffusion free of the state,
    Gaussian observations linear in it: checked at the first fit by
    :func:`~pyro_nsde.posterior.laplace.is_linear_gaussian`) and a family that holds the
    smoother's chain (``covariance="full"``, or one dimension) the smoother is the exact
    posterior of the path given the parameters, so the corrections could only be wrong:
    they are left out (:attr:`exact`). Learned, SVI's noise moved them away from zero: on
    ``fit``'s trend model of 162 quarters of US real GDP the ELBO was 361 with them and 371
    without, the Pareto ``k̂`` of the importance weights 1.79 and 0.48."""

    corrects_init = True
    #: The reference path need not be precise: it is only where the model is linearized, and
    #: a refresh moves it by one Gauss–Newton step from the last one.
    tolerance = 1e-3

    def __init__(self):
        super().__init__()
        self.exact = None  # decided at the first finite fit

    def state(self) -> dict:
        return {**super().state(), "exact": self.exact}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        # A checkpoint from before the check carries learned corrections: it resumes with them.
        self.exact = state.get("exact", False)

    def fit(self, guide, site, values, plates, args, kwargs):
        """Fit the reference path (the mode of the path's posterior at ``values``) about which
        the smoother linearizes the model at each draw; ``None`` if it is not finite (at the
        first fit, also if the smoother there is not). With subsampled plates the reference is
        kept for every series (:mod:`~pyro_nsde.guide.sweep`) and this fits the plates'
        current subsample."""
        prior = guide.prior(site.name, values, plates, *args, **kwargs)
        data = {**values, **sweep.indices(plates)}
        log_likelihood = path_log_likelihood(guide.raw_model, site.name, data, args, kwargs)
        reference = None if self.path is None else site.take(self.path, plates)
        if reference is None or not bool(torch.isfinite(reference).all()):
            posterior, path = laplace(prior, log_likelihood, tolerance=self.tolerance)
            finite = _finite_fit(posterior, path)
        else:
            path = posterior_mode(
                prior, log_likelihood, reference, tolerance=self.tolerance, max_iterations=1
            )
            finite = bool(torch.isfinite(path).all())
        if not finite:
            self._warn_not_finite(site.name)
            return None
        if self.exact is None:
            self.exact = _holds_the_smoother(site, prior) and is_linear_gaussian(
                prior, log_likelihood, path
            )
        self.path = site.put(self.path, path, plates)
        return path

    def inputs(self, guide, site, prior, values, plates, args, kwargs):
        reference = site.take(self.path, plates)
        return None, _kalman_base(guide, site, prior, values, reference, plates, args, kwargs)


def choose_conditional(spec, options, *, subsampled, encoded, followed):
    """The strategy of a path site with control ``spec``: a Laplace start for affine and
    linear controls without an encoder (unless ``init_path="prior"``), following the
    parameters as ``options.conditional`` says (``"auto"``: Kalman for ``"affine"``, Taylor
    for ``"linear"``; Taylor without parameters to follow is a plain Laplace start). With
    subsampled plates only the Kalman conditional fits (its reference paths are kept for
    every series; the others move per-series coefficients, which SVI then learns from the
    prior)."""
    if not (spec in ("affine", "linear") and options.init_path == "laplace" and not encoded):
        return PriorStart()
    conditional = options.conditional
    if conditional == "auto":
        conditional = "kalman" if spec == "affine" else "taylor"
    if conditional == "kalman":
        return KalmanConditional()
    if subsampled:
        return PriorStart()
    sites, local = followed
    if conditional == "taylor" and sites:
        return TaylorConditional(sites, local)
    return LaplaceStart()


def followed_sites(trace, name, others):
    """``(sites, local)``: the latent sites among ``others`` that path site ``name``'s
    coefficients may follow: those that share no plate with it, and those whose batch dims are
    all plates of the path (``local``: a series' own parameters); none of them subsampled.
    Raises for a site in the path's plates with other batch dims (a Taylor expansion per
    series would not know which of its values a series' path depends on)."""
    stack = trace.nodes[name]["cond_indep_stack"]
    frames = {f.name for f in stack}
    chosen, local = [], []
    for site_name in others:
        node = trace.nodes[site_name]
        own = node["cond_indep_stack"]
        if any(is_subsampled(f) for f in own):
            continue
        shared = [f for f in own if f.name in frames]
        if shared:
            sizes = [f.size for f in own if f.vectorized]
            if math.prod(node["fn"].batch_shape) != math.prod(sizes) or len(shared) < len(own):
                raise ValueError(
                    f"conditional='taylor' cannot follow site {site_name!r}: it is in the plates "
                    f"of path site {name!r} but has batch shape {tuple(node['fn'].batch_shape)} "
                    f"beyond them; use conditional='kalman' (it follows any site)"
                )
            local.append(site_name)
        chosen.append(site_name)
    return chosen, local


def site_coordinates(trace, site_name, local) -> int:
    """The unconstrained coordinates of a followed site: all of them, or per plate element for
    a site in ``local``."""
    node = trace.nodes[site_name]
    transform = biject_to(node["fn"].support)
    size = transform.inv(node["value"]).numel()
    if site_name in local:
        size //= math.prod(node["fn"].batch_shape)
    return size


def _perturbed(guide, values, sites, local=()):
    """``values`` with the parameter ``sites`` stacked along a new dim left of all plates
    (dim ``-(nesting + 1)``): ``η̂``, ``η̂ + ε e_j`` and ``η̂ - ε e_j`` for every
    unconstrained coordinate ``j`` (``ε`` = :data:`SENSITIVITY_STEP`; a coordinate of a site
    in ``local`` is moved in every plate element at once). Returns ``(values, 2ε)``
    (``(values, None)`` without sites). The model must broadcast them, as
    ``Predictive(parallel=True)`` needs too."""
    if not sites:
        return values, None
    trace = guide.prototype_trace
    sizes = [site_coordinates(trace, site_name, local) for site_name in sites]
    n = sum(sizes)
    eye = SENSITIVITY_STEP * torch.eye(n, dtype=values[sites[0]].dtype)
    steps = torch.cat([torch.zeros(1, n, dtype=eye.dtype), eye, -eye])  # (2n + 1, n)
    batched, offset = dict(values), 0
    for site_name, size in zip(sites, sizes, strict=True):
        node = trace.nodes[site_name]
        transform = biject_to(node["fn"].support)
        eta = transform.inv(values[site_name])
        step = steps[:, offset : offset + size].to(eta.device)
        if site_name in local:  # the same step in every plate element
            batch_ndim = len(node["fn"].batch_shape)
            step = step.reshape((2 * n + 1,) + (1,) * batch_ndim + eta.shape[batch_ndim:])
            moved = eta + step
        else:
            moved = eta.reshape(-1) + step
        pad = (1,) * (guide.nesting - len(node["fn"].batch_shape))
        batched[site_name] = transform(moved.reshape((2 * n + 1, *pad, *node["value"].shape)))
        offset += size
    return batched, 2 * SENSITIVITY_STEP


def _centred(guide, conditional, values, batch_ndim):
    """``η - η̂``: the unconstrained values of the parameter sites, flattened, minus their
    values at the last Laplace fit (about which the coefficients and their slopes were
    expanded), with batch dims that broadcast with the path's (``batch_ndim`` of them at
    most). Without a fit (it was not finite) the slopes are zero and so is ``η - η̂``."""
    centre = values if conditional.centre is None else conditional.centre
    pieces = []
    for site_name in conditional.param_sites:
        node = guide.prototype_trace.nodes[site_name]
        transform = biject_to(node["fn"].support)
        centred = transform.inv(values[site_name]) - transform.inv(centre[site_name]).detach()
        prefix = centred.shape[: centred.dim() - node["value"].dim()]
        batch = node["fn"].batch_shape
        if site_name not in conditional.local_sites:
            batch = (1,) * len(batch)  # the slots of the site's own plates
        pieces.append(centred.reshape(prefix + tuple(batch) + (-1,)))
    shape = torch.broadcast_shapes(*(p.shape[:-1] for p in pieces))
    params = torch.cat([p.expand(shape + p.shape[-1:]) for p in pieces], dim=-1)
    while params.dim() > batch_ndim + 1 and params.shape[0] == 1:
        params = params.squeeze(0)
    return params


def _holds_the_smoother(site, prior) -> bool:
    """Whether the site's family takes a smoother's chain as it is: full gains, a full step
    scale and a full ``q(x_0)`` (diagonal ones only in one dimension; none for a known
    ``x_0``). The mean shift (``covariance="prior"``) drops the step covariance, which the
    corrections then make up for."""
    one_dim = prior.state_dim == 1 and prior.noise_dim == 1
    covariance = site.control.covariance
    full = covariance == "full" or (covariance == "diagonal" and one_dim)
    gains = not getattr(site.control, "diagonal_gain", False) or one_dim
    known_init = not isinstance(prior.init, Distribution)
    return full and gains and (site.full_init or one_dim or known_init)


def _kalman_base(guide, site, prior, values, reference, plates, args, kwargs) -> dict:
    """The smoother's coefficients and ``q(x_0)`` for ``site`` at the drawn ``values``: the
    Kalman smoother of the model linearized about the ``reference`` path.

    The likelihood's sites need a run of the whole model. The draws may be laid out for
    fewer plates than the model has (``Predictive`` guesses its nesting from the guide), so
    that run gets them with the draws left of all the model's plates, and the result is
    laid out back like the path."""
    num, prefix, model_values = _model_layout(guide, values)
    proto = site.prototype_batch
    target = torch.broadcast_shapes(prefix, proto, prior.batch_shape)
    path_reference = reference.expand(target + reference.shape[-2:]).contiguous()
    model_reference = reference
    if num > 1:
        pad = (1,) * (guide.nesting - len(proto))
        model_reference = reference.expand((num, *pad, *reference.shape))
    model_reference = model_reference.contiguous()
    data = {**model_values, **sweep.indices(plates)}
    log_likelihood = path_log_likelihood(guide.raw_model, site.name, data, args, kwargs)
    with outside_inference():
        chain = linearize(prior, path_reference, differentiable=True)
        sites = quadratic_sites(log_likelihood, model_reference, differentiable=True)
    sites_batch = torch.broadcast_shapes(prefix, proto) if num > 1 else proto
    sites = GaussianSites(
        sites.precision.reshape(
            sites.precision.shape[:1] + sites_batch + sites.precision.shape[-2:]
        ),
        sites.information.reshape(
            sites.information.shape[:1] + sites_batch + sites.information.shape[-1:]
        ),
    )
    posterior = smooth(chain.to(torch.float64), sites.to(torch.float64))
    base = {k: v.to(reference) for k, v in coefficients_of(site.control, posterior).items()}
    init_loc, init_scale = init_of(posterior, site.full_init)
    base["init_loc"], base["init_scale"] = init_loc.to(reference), init_scale.to(reference)
    return base


def _model_layout(guide, values):
    """``(S, prefix, values)``: the number ``S`` of draws in ``values`` (1 for values of
    the prototype's shapes), the batch shape ``prefix`` they have left of (and in the
    slots of) each site's plates, and the values with the draws moved to one dim left of
    all of the model's plates (dim ``-(nesting + 1)``)."""
    num, prefix = 1, torch.Size()
    moved = dict(values)
    for site_name, value in values.items():
        node = guide.prototype_trace.nodes.get(site_name)
        if node is None or site_name in guide.sites:
            continue
        shape = node["value"].shape
        extra = value.shape[: value.dim() - len(shape)]
        count = extra.numel()
        if count == 1:
            continue
        num = count
        prefix = extra + (1,) * len(node["fn"].batch_shape)
        pad = (1,) * (guide.nesting - len(node["fn"].batch_shape))
        moved[site_name] = value.reshape((count, *pad, *shape))
    return num, prefix, moved


def _finite_fit(posterior, path) -> bool:
    """Whether a Laplace fit (its path and Gauss–Markov posterior) is finite everywhere."""
    tensors = (
        path,
        posterior.control_loc,
        posterior.control_gain,
        posterior.step_cov,
        posterior.init_loc,
        posterior.init_cov,
    )
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _split_fits(value, *, size, batch_ndim, proto_batch):
    """A tensor of ``size`` stacked fits, ``(*batch, *event)`` with the fits along the dims of
    ``batch`` left of the path's own batch dims ``proto_batch``, as ``(size, *proto_batch,
    *event)`` (expanded from one fit where the path does not depend on the perturbed
    sites)."""
    event = value.shape[batch_ndim:]
    points = value.shape[:batch_ndim].numel() // max(1, proto_batch.numel())
    return value.reshape((points, *proto_batch, *event)).expand((size, *proto_batch, *event))


def _sensitivities(fits, control, step):
    """``∂ coefficient / ∂ η_j`` by central differences of stacked fits ``(2n + 1, ...)``:
    the control's ``param_weight`` ``(*batch, K, width, n)`` (``a``, ``vec B``, and the log
    of ``S``'s diagonal, whose rows :class:`~pyro_nsde.posterior.controls.PerStepCoefficients`
    scales)."""
    n = control.param_dim
    gain = fits["gain"]
    columns = [fits["loc"], gain if control.diagonal_gain else gain.flatten(-2)]
    if "scale" in fits:
        scale = fits["scale"]
        diagonal = scale if control.covariance == "diagonal" else scale.diagonal(dim1=-2, dim2=-1)
        columns.append(diagonal.log())
    stacked = torch.cat(columns, dim=-1)  # (2n + 1, *batch, K, width)
    derivative = (stacked[1 : n + 1] - stacked[n + 1 :]) / step
    return derivative.movedim(0, -1)


__all__ = [
    "LAPLACE_STEP_SCALE",
    "SENSITIVITY_STEP",
    "KalmanConditional",
    "LaplaceStart",
    "PriorStart",
    "TaylorConditional",
    "choose_conditional",
    "followed_sites",
    "site_coordinates",
]
