"""The guide's law of a path's initial state ``x_0``: known, learned, or from an encoder.

- :class:`KnownInitialState`: the prior's ``x_0`` is a tensor, and stays known.
- :class:`LearnedInitialState`: ``q(x_0) = N(m, C)`` with a learned mean and a diagonal or
  (``covariance="full"``) lower-triangular scale, in the containers ``x0_locs``,
  ``x0_scales``; with a Taylor conditional the mean is affine in the parameters drawn with
  the path (``m + D (η - η̂)``, slopes ``D`` in ``x0_slopes``), with a Kalman conditional
  ``m`` and ``C`` are corrections to the smoother's ``q(x_0 | θ)``.
- :class:`EncodedInitialState`: ``q(x_0) = N(μ(c), σ(c))`` from an encoder's context ``c``,
  by a linear head in ``x0_heads``.
"""

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam
from pyro.ops.tensor_utils import periodic_repeat
from torch import nn

from ..posterior.constraints import inverse_softplus, scaled
from ..posterior.controls import MIN_SCALE
from ..sde.sites import full_size, is_subsampled
from .slots import ParamSlot


class KnownInitialState:
    """A known ``x_0`` (the prior's ``init`` is a tensor): no law of its own."""

    def law(self, context=None, params=None, base=None, corrected=True):
        return None

    def slots(self) -> dict:
        return {}


class LearnedInitialState:
    """``q(x_0)``: a normal with learned mean and scale (see the module docstring).

    :param modules: the guide's ``(x0_locs, x0_scales, x0_slopes)`` containers.
    :param str name: the path site.
    :param node: the site in the prototype trace (its value gives the first ``x_0``).
    :param torch.Size batch: the path's batch shape at full plate sizes.
    :param bool full: a lower-triangular scale (else diagonal).
    :param float init_scale: the starting scale.
    :param float step_scale: optimizer step scale of the mean and scale.
    :param int slope_dim: parameters the mean follows (0: none).
    :param bool corrections: start at zero mean and unit scale, as corrections to a law
        given per draw (``base``).
    """

    def __init__(
        self,
        modules,
        name,
        node,
        batch,
        *,
        full,
        init_scale,
        step_scale,
        slope_dim=0,
        corrections=False,
    ):
        locs, scales, slopes = modules
        x0 = node["value"].detach()[..., 0, :]
        for frame in node["cond_indep_stack"]:
            if is_subsampled(frame):
                x0 = periodic_repeat(x0, full_size(frame), frame.dim - 1).contiguous()
        x0 = x0.expand(batch + x0.shape[-1:]).clone()
        if corrections:
            x0, init_scale = torch.zeros_like(x0), 1.0
        real = scaled(constraints.real, step_scale)
        deep_setattr(locs, name, PyroParam(x0, real, event_dim=1))
        if full:  # a full-rank q(x_0): the family then holds the exact posterior of a
            # linear SDE (with an affine control)
            scale = torch.diag_embed(torch.full_like(x0, init_scale))
            param = PyroParam(scale, scaled(constraints.lower_cholesky, step_scale), event_dim=2)
        else:
            scale = torch.full_like(x0, init_scale)
            constraint = scaled(constraints.softplus_positive, step_scale)
            param = PyroParam(scale, constraint, event_dim=1)
        deep_setattr(scales, name, param)
        self.loc, self.scale = ParamSlot.of(locs, name), ParamSlot.of(scales, name)
        self.slope = None
        if slope_dim:
            slope = x0.new_zeros(x0.shape + (slope_dim,))
            deep_setattr(slopes, name, PyroParam(slope, real, event_dim=2))
            self.slope = ParamSlot.of(slopes, name)
        self.full = full

    def slots(self) -> dict:
        """The parameters a Laplace fit re-bases, by their names in the saved state."""
        slots = {"x0_loc": self.loc, "x0_scale": self.scale}
        if self.slope is not None:
            slots["x0_slope"] = self.slope
        return slots

    def law(self, context=None, params=None, base=None, corrected=True):
        """``q(x_0)`` given centred parameters ``params`` and a per-draw ``base`` law
        ``{"init_loc", "init_scale"}`` that the learned values correct (with
        ``corrected=False`` the base law itself: an exact one)."""
        if base is not None and not corrected:
            loc, scale = base["init_loc"], base["init_scale"]
        else:
            loc, scale = self.loc.get(), self.scale.get()
            if params is not None and self.slope is not None:  # E[x_0] affine in η
                loc = loc + (self.slope.get() @ params[..., None]).squeeze(-1)
            if base is not None:
                loc = base["init_loc"] + loc
                base_scale = base["init_scale"]
                scale = base_scale @ scale if self.full else base_scale * scale
        if self.full:
            return dist.MultivariateNormal(loc, scale_tril=scale)
        return dist.Normal(loc, scale).to_event(1)


class EncodedInitialState:
    """``q(x_0 | c) = N(μ(c), diag σ(c)²)``, ``(μ, σ) = head(c_0)``, a linear head of the
    encoder's context (its first step for a per-step context), starting at the mean of the
    prototype's ``x_0`` and the scale ``init_scale``.

    The head lives in the guide's ``x0_heads`` and is reached through the guide at every
    call, so that Pyro registers its parameters (a plain module is registered when a
    :class:`~pyro.nn.PyroModule` hands it out)."""

    def __init__(self, guide, key, node, context_dim, per_step, init_scale, like):
        x0 = node["value"].detach()[..., 0, :]
        d = x0.shape[-1]
        head = nn.Linear(context_dim, 2 * d).to(like)
        nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias[:d] = x0.reshape(-1, d).mean(0)
            head.bias[d:] = inverse_softplus(max(init_scale - MIN_SCALE, MIN_SCALE))
        guide.x0_heads[key] = head
        self.guide, self.key, self.state_dim, self.per_step = guide, key, d, per_step

    def slots(self) -> dict:
        return {}

    def law(self, context=None, params=None, base=None, corrected=True):
        first = context[..., 0, :] if self.per_step else context
        out = self.guide.x0_heads[self.key](first)
        d = self.state_dim
        scale = MIN_SCALE + nn.functional.softplus(out[..., d:])
        return dist.Normal(out[..., :d], scale).to_event(1)


__all__ = ["EncodedInitialState", "KnownInitialState", "LearnedInitialState"]
