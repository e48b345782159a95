"""The family of the latent sites that are not paths: Pyro's own autoguides, or the structured
family of :mod:`~pyro_nsde.guide.hierarchical` for series with their own parameters, on the
model with its path sites hidden."""

from pyro import poutine
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from .hierarchical import AutoHierarchicalNormal

#: ``latents=`` names and the autoguide each builds (in unconstrained space).
LATENT_FAMILIES = {
    "normal": AutoNormal,
    "multivariate": AutoMultivariateNormal,
    "lowrank": AutoLowRankMultivariateNormal,
    "hierarchical": AutoHierarchicalNormal,
}


def latent_guide(model, path_sites, local, options, init_loc_fn):
    """The autoguide of ``options.latents`` over the sites of ``model`` other than
    ``path_sites`` (which are hidden from it); ``local`` are the sites in a path's plates."""
    hidden = poutine.block(model, hide=list(path_sites))
    kwargs = {"init_loc_fn": init_loc_fn, "init_scale": options.init_scale}
    if options.latents == "lowrank":
        kwargs["rank"] = options.latent_rank
    if options.latents == "hierarchical":
        return AutoHierarchicalNormal(hidden, local, **kwargs)
    return LATENT_FAMILIES[options.latents](hidden, **kwargs)


def latent_values(guide, args, kwargs, median: bool = False) -> dict:
    """Draws (or posterior medians) of a latent autoguide's sites; ``{}`` without one."""
    if guide is None:
        return {}
    if not median:
        return guide(*args, **kwargs)
    if guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)
    return dict(guide.median(*args, **kwargs))


__all__ = ["LATENT_FAMILIES", "latent_guide", "latent_values"]
