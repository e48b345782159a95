"""One path site of a model, as the :class:`~pyro_nsde.GirsanovGuide` handles it.

A :class:`PathSite` holds everything the guide knows about one
:class:`~pyro_nsde.EulerMaruyama` site: where it sits (plates, batch shape at full plate
sizes, ``to_event`` dims), its control, its law of ``x_0`` (:mod:`~pyro_nsde.guide.initial`),
the encoder context it gets and its conditional strategy
(:mod:`~pyro_nsde.guide.conditionals`). Given the prior at the site for the values drawn
upstream, it builds the posterior path law.
"""

from contextlib import ExitStack
from operator import attrgetter

import torch
from pyro.infer.autoguide.utils import deep_setattr
from torch.distributions import Distribution

from ..posterior.controls import PerStepCoefficients, context_has_steps
from ..posterior.gauss_markov import GaussMarkovEulerMaruyama, LinearCoefficients
from ..posterior.warped import PathWarp, WarpedEulerMaruyama
from ..sde.checks import broadcasts_to
from ..sde.sites import full_size, unwrap_path_distribution
from . import sweep
from .conditionals import site_coordinates
from .control_factory import ControlSettings, make_control
from .initial import EncodedInitialState, KnownInitialState, LearnedInitialState
from .slots import ParamSlot


class PathSite:
    """A path site of the model and the parts of its posterior.

    :param guide: the guide (its containers ``controls``, ``x0_locs``, ``x0_scales``,
        ``x0_slopes``, ``x0_heads`` receive this site's parameters).
    :param str name: the site's name.
    :param int ndims: the ``to_event`` dims around its :class:`~pyro_nsde.EulerMaruyama`.
    :param context: the encoder's context on the prototype's data, or ``None``.
    :param conditional: the site's conditional strategy.
    """

    def __init__(self, guide, name: str, ndims: int, context, conditional):
        options = guide.options
        node = guide.prototype_trace.nodes[name]
        prior, _ = unwrap_path_distribution(node["fn"])
        self.name, self.ndims, self.node = name, ndims, node
        self.conditional = conditional
        self.prototype_batch = prior.batch_shape
        self.batch = _full_batch_shape(node, prior.batch_shape)
        self.full_init = options.covariance == "full"
        self.context_per_step = None
        context_dim = 0
        if context is not None:
            self.context_per_step = context_has_steps(
                context, len(prior.batch_shape), prior.num_steps
            )
            context_dim = context.shape[-1]
            self._check_context(context, prior)
        param_dim = sum(
            site_coordinates(guide.prototype_trace, s, conditional.local_sites)
            for s in conditional.param_sites
        )
        settings = ControlSettings(
            site=name,
            batch=self.batch,
            covariance=options.covariance,
            gain=options.gain,
            context_dim=context_dim,
            param_dim=param_dim,
            step_scale=conditional.step_scale,
            hidden_dims=options.hidden_dims,
        )
        control = make_control(options.control_for(name), prior, settings, node["value"])
        deep_setattr(guide.controls, name, control)
        self._controls, self._warps = guide.controls, guide.warps
        self.warped = options.warp is not None
        if self.warped:
            warp = PathWarp(prior.state_dim).to(node["value"].dtype)
            warp.calibrate(node["value"])
            deep_setattr(guide.warps, name, warp)
        self.initial = self._initial_state(guide, prior, context, context_dim, param_dim)

    def _initial_state(self, guide, prior, context, context_dim, param_dim):
        if not isinstance(prior.init, Distribution):
            return KnownInitialState()  # a known x_0 stays known
        if context is not None:
            key = self.name.replace(".", "__")
            per_step = self.context_per_step
            return EncodedInitialState(
                guide,
                key,
                self.node,
                context_dim,
                per_step,
                guide.options.init_scale,
                self.node["value"],
            )
        return LearnedInitialState(
            (guide.x0_locs, guide.x0_scales, guide.x0_slopes),
            self.name,
            self.node,
            self.batch,
            full=self.full_init,
            init_scale=guide.options.init_scale,
            step_scale=self.conditional.step_scale,
            slope_dim=param_dim if self.conditional.param_sites else 0,
            corrections=self.conditional.corrects_init,
        )

    def _check_context(self, context, prior):
        batch = context.shape[: -2 if self.context_per_step else -1]
        if not any(broadcasts_to(batch, b) for b in (prior.batch_shape, self.batch)):
            num_steps = prior.num_steps
            raise ValueError(
                f"encoder must return a context of shape batch + (c,) or batch + "
                f"({num_steps + 1}, c) with batch broadcastable to the batch shape "
                f"{tuple(prior.batch_shape)} of path site {self.name!r}, but returned shape "
                f"{tuple(context.shape)}"
            )

    @property
    def control(self):
        """The site's control (a module or callable)."""
        return attrgetter(self.name)(self._controls)

    @property
    def warp(self):
        """The site's :class:`~pyro_nsde.posterior.warped.PathWarp`, or ``None``."""
        return attrgetter(self.name)(self._warps) if self.warped else None

    def control_slot(self, attr: str) -> ParamSlot:
        """The control's parameter ``attr`` as a :class:`~pyro_nsde.guide.slots.ParamSlot`."""
        return ParamSlot(self.control, attr)

    def plates(self, plates) -> ExitStack:
        """Enter the site's vectorized plates (from the guide's ``plates``)."""
        return enter_plates([self.node], plates)

    def select_context(self, context, plates):
        """The encoder's context for the plates' current subsample of series."""
        event_dims = 2 if self.context_per_step else 1
        return sweep.take(context, self.node["cond_indep_stack"], plates, event_dims)

    def take(self, path, plates):
        """The rows of the plates' current subsample of a path-shaped tensor kept for every
        series (``None`` stays ``None``)."""
        if path is None:
            return None
        return sweep.take(path, self.node["cond_indep_stack"], plates, event_dims=2)

    def put(self, full, path, plates):
        """``full`` with the rows of the plates' current subsample set to ``path`` (see
        :func:`~pyro_nsde.guide.sweep.put`)."""
        return sweep.put(full, path, self.node["cond_indep_stack"], plates, event_dims=2)

    def posterior(self, prior, context, plates, options, params=None, base=None):
        """The posterior path law given the prior at the site, the encoder's context, the
        centred parameters ``params`` and a per-draw ``base`` of coefficients."""
        if context is not None:
            context = self.select_context(context, plates)
        corrected = not self.conditional.exact  # an exact base law is taken as it is
        init = self.initial.law(context, params, base, corrected)
        control = self.control
        if isinstance(control, PerStepCoefficients):
            control = control(context, params, base, self.context_per_step, corrected)
        if isinstance(control, LinearCoefficients):
            posterior = GaussMarkovEulerMaruyama(
                prior, control, init=init, estimator=options.estimator
            )
            if self.warped:
                posterior = WarpedEulerMaruyama(posterior, self.warp, options.estimator)
        else:
            posterior = prior.girsanov(
                control,
                init=init,
                context=context,
                estimator=options.estimator,
                context_per_step=self.context_per_step,
                checkpoint_every=options.checkpoint_every,
                compile_step=options.compile_step,
                drift_free=options.subsample_steps is not None,
            )
        return posterior.to_event(self.ndims) if self.ndims else posterior


def enter_plates(nodes, plates) -> ExitStack:
    """Enter (once each) the vectorized plates of the given sites (trace nodes)."""
    stack = ExitStack()
    entered = set()
    for node in nodes:
        for frame in node["cond_indep_stack"]:
            if frame.vectorized and frame.name not in entered:
                entered.add(frame.name)
                stack.enter_context(plates[frame.name])
    return stack


def _full_batch_shape(node, shape) -> torch.Size:
    """``shape`` with the dims of subsampled plates at their full sizes."""
    shape = list(shape)
    for frame in node["cond_indep_stack"]:
        if -frame.dim <= len(shape):
            shape[frame.dim] = full_size(frame) if shape[frame.dim] != 1 else 1
    return torch.Size(shape)


__all__ = ["PathSite", "enter_plates"]
