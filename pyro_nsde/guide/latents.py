"""The family of the latent sites that are not paths: Pyro's own autoguides, on the model with
its path sites hidden."""

from pyro import poutine
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

#: ``latents=`` names and the autoguide each builds (in unconstrained space).
LATENT_FAMILIES = {
    "normal": AutoNormal,
    "multivariate": AutoMultivariateNormal,
    "lowrank": AutoLowRankMultivariateNormal,
}


def latent_guide(model, path_sites, options, init_loc_fn):
    """The autoguide of ``options.latents`` over the sites of ``model`` other than
    ``path_sites`` (which are hidden from it)."""
    hidden = poutine.block(model, hide=list(path_sites))
    family = LATENT_FAMILIES[options.latents]
    kwargs = {"init_loc_fn": init_loc_fn, "init_scale": options.init_scale}
    if options.latents == "lowrank":
        kwargs["rank"] = options.latent_rank
    return family(hidden, **kwargs)


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
