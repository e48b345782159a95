"""Path sites in Pyro models: finding them, and running a model around them.

The guide, the ArviZ conversion, forecasts and prediction all need to look at a model's
:class:`~pyro_nsde.EulerMaruyama` sample sites and to run the model in special ways. Those runs
live here, each written once:

- :func:`unwrap_path_distribution`: the path law under mask and ``to_event`` wrappers;
- :func:`plate_nesting`: how many batch dims the sample sites of traces use (and
  :func:`guided_plate_nesting`: of a model replayed on its guide);
- :func:`is_subsampled`, :func:`full_size`: a plate frame's subsampling;
- :func:`run_to_sites`: run a model, conditioned and blocked, up to some sites;
- :func:`path_log_likelihood`: ``x ↦ log p(everything else | x)`` for a path site;
- :func:`log_joint`: the log joint of each draw of a trace vectorized over draws;
- :func:`outside_inference`: side computations as if no Pyro handler were active.
"""

import warnings
from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.runtime import _DIM_ALLOCATOR, _PYRO_STACK, NonlocalExit
from pyro.poutine.util import prune_subsample_sites

from .euler_maruyama import EulerMaruyama


def unwrap_path_distribution(fn):
    """``(EulerMaruyama, reinterpreted_ndims)`` under mask/``to_event`` wrappers, or
    ``(None, 0)`` if ``fn`` is not a path distribution."""
    ndims = 0
    while True:
        if isinstance(fn, EulerMaruyama):
            return fn, ndims
        if isinstance(fn, MaskedDistribution):
            fn = fn.base_dist
        elif isinstance(fn, dist.Independent):
            ndims += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        else:
            return None, 0


def full_size(frame) -> int:
    """The size of a plate frame before subsampling."""
    return frame.full_size or frame.size


def is_subsampled(frame) -> bool:
    """Whether a plate frame holds a subsample of its plate."""
    return full_size(frame) != frame.size


def plate_nesting(*traces) -> int:
    """The number of batch dims the sample sites of ``traces`` use: the dims of their
    vectorized plates and the lengths of their distributions' batch shapes (subsample sites
    left out)."""
    nesting = 0
    for trace in traces:
        for site in prune_subsample_sites(trace).nodes.values():
            if site["type"] != "sample":
                continue
            dims = [-frame.dim for frame in site["cond_indep_stack"] if frame.vectorized]
            nesting = max([nesting, len(site["fn"].batch_shape), *dims])
    return nesting


def guided_traces(model, guide, args, kwargs):
    """``(guide trace, model trace replayed on it)`` of one draw, blocked and without
    gradients."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def guided_plate_nesting(model, guide, args, kwargs) -> int:
    """The plate nesting of ``model`` replayed on a draw of ``guide`` (both traces)."""
    return plate_nesting(*guided_traces(model, guide, args, kwargs))


def latent_size(trace) -> int:
    """The number of latent coordinates in a trace (sample sites that are neither observed nor
    auxiliary; subsample sites left out)."""
    return sum(
        site["value"].numel()
        for site in prune_subsample_sites(trace).nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("is_auxiliary")
    )


def run_to_sites(model, names, data: dict, args, kwargs) -> dict:
    """The sites ``names`` of ``model(*args, **kwargs)`` from a blocked run conditioned on
    ``data``, stopped at the last of them (nothing after it runs): ``{name: site}``. Runs
    without validation: it repeats what the model's own (validated) runs in inference check.

    :raises RuntimeError: if the model does not reach them all.
    """
    names = set(names)
    found = {}

    def reached(msg):
        if msg["name"] in names:
            found[msg["name"]] = msg
        return found.keys() == names

    model = poutine.condition(model, data=data)
    model = poutine.escape(model, escape_fn=reached)
    try:
        with pyro.validation_enabled(False):
            poutine.block(model)(*args, **kwargs)
    except NonlocalExit:
        # The handlers inside have popped themselves; do not reset_stack(), which would
        # also reset the caller's handlers (e.g. clear the trace recording a guide).
        return found
    missing = sorted(names - found.keys())
    raise RuntimeError(f"the model did not reach site(s) {missing} on this call")


def run_to_site(model, name: str, data: dict, args, kwargs) -> dict:
    """The site ``name`` of ``model(*args, **kwargs)`` (see :func:`run_to_sites`)."""
    return run_to_sites(model, [name], data, args, kwargs)[name]


def path_log_likelihood(model, name: str, values: dict, args, kwargs):
    """``x ↦ log p(everything else | x)`` at the given values of the other sites: the log
    joint of the model conditioned on them and on path site ``name`` at ``x``, without the
    path's own term (sites upstream of it add a constant), in units of the path's own scale
    (:func:`site_scale`: a subsampled plate scales the path and its observations alike, and
    the path's conditional posterior does not change). Runs without validation, as
    :func:`run_to_site`."""

    def log_likelihood(x):
        conditioned = poutine.condition(model, data={**values, name: x})
        with poutine.block(), pyro.validation_enabled(False):
            trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
        total = trace.log_prob_sum(site_filter=lambda site_name, site: site_name != name)
        return total / site_scale(trace.nodes[name])

    return log_likelihood


def site_scale(site) -> float:
    """The scale of a trace's site (``poutine.scale``, a subsampled plate's ``N / n``) where
    it is one number; 1 where it varies over the site's elements."""
    scale = site["scale"]
    if isinstance(scale, torch.Tensor):
        return float(scale) if scale.numel() == 1 else 1.0
    return float(scale)


def log_joint(trace, plate_name: str):
    """``log p`` of a trace vectorized over draws in the plate ``plate_name`` (every sample
    site inside it): one entry per draw, ``(S,)``, the other dims summed."""
    trace.compute_log_prob()
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        frame = next(f for f in site["cond_indep_stack"] if f.name == plate_name)
        log_prob = site["log_prob"]
        missing = -frame.dim - log_prob.dim()
        log_prob = log_prob.reshape((1,) * max(missing, 0) + log_prob.shape).movedim(frame.dim, 0)
        total = total + log_prob.reshape(log_prob.shape[0], -1).sum(-1)
        size = frame.size
    return total.expand(size)


@contextmanager
def outside_inference():
    """Run side computations (e.g. the guide's Laplace fits of the paths at the current
    parameters) as if no Pyro handler were active: not recorded in the trace of the training
    step that triggered them, and not broadcast by its plates (e.g. the particle plate of
    ``Trace_ELBO(vectorize_particles=True)``)."""
    saved, dims = list(_PYRO_STACK), list(_DIM_ALLOCATOR._stack)
    _PYRO_STACK.clear()
    _DIM_ALLOCATOR._stack.clear()
    try:
        yield
    finally:
        _PYRO_STACK[:] = saved
        _DIM_ALLOCATOR._stack[:] = dims


@contextmanager
def diverged_draws_allowed():
    """Evaluate densities at draws whose path may overflow (the caller weighs them zero or
    leaves them out): no validation error, and no warning from Pyro for each ``NaN``."""
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        yield


__all__ = [
    "diverged_draws_allowed",
    "full_size",
    "guided_plate_nesting",
    "guided_traces",
    "is_subsampled",
    "latent_size",
    "log_joint",
    "outside_inference",
    "path_log_likelihood",
    "plate_nesting",
    "run_to_site",
    "run_to_sites",
    "site_scale",
    "unwrap_path_distribution",
]
