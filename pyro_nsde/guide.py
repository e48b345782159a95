"""The Girsanov guide: one guide for a whole model with Euler–Maruyama path sites."""

from contextlib import ExitStack
from operator import attrgetter

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.autoguide import AutoGuide, AutoNormal
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam
from pyro.ops.tensor_utils import periodic_repeat
from pyro.poutine.runtime import NonlocalExit
from torch import nn

from .controls import MIN_SCALE, AffineControl, ControlNet, check_covariance, inverse_softplus
from .euler_maruyama import EulerMaruyama
from .girsanov import ESTIMATORS


def unwrap_path_distribution(fn):
    """Return ``(EulerMaruyama, reinterpreted_ndims)`` under mask/``to_event`` wrappers, or
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


class GirsanovGuide(AutoGuide):
    r"""A guide for models with :class:`~pyro_nsde.EulerMaruyama` path sites, for
    ``SVI(model, guide, optim, Trace_ELBO())``.

    Every path site is sampled from ``prior.girsanov(control, init=q(x_0), context=c)``, where
    ``prior`` is the model's own distribution at that site *given the values this guide drew
    upstream* (SDE parameters with priors, random initial states, plates): the guide runs the
    model, conditioned on its draws so far, up to the site. The posterior increments are

        ``ΔW_k ~ N(h_k u_k, h_k S_k S_kᵀ)``,  ``(u_k, S_k) = control(t_k, x_k, c_k)``,

    so the posterior drift is ``f + G u`` and the per-step KL is
    ``½[tr(S Sᵀ) + h |u|² - m - log det(S Sᵀ)]``. Every other latent site gets a mean-field
    normal in unconstrained space (an internal :class:`~pyro.infer.autoguide.AutoNormal`).

    :param callable model: a Pyro model.
    :param control: ``"affine"`` (an :class:`~pyro_nsde.AffineControl` per site, with one set
        of coefficients per series of the site's batch), ``"mlp"`` (a
        :class:`~pyro_nsde.ControlNet`), a module/callable ``u(t, x, context)``, or a dict
        ``{site_name: one of these}``.
    :param nn.Module encoder: optional; ``encoder(*model_args, **model_kwargs)`` returns a
        context ``batch + (c,)`` (static) or ``batch + (K+1, c)`` (per step) for the controls
        (amortized inference). The posterior of ``x_0`` is then a function of the context.
    :param float init_scale: initial posterior scale of ``x_0`` and of the mean-field sites.
    :param str estimator: ``"girsanov"``, ``"plain"`` or ``"stl"``; see
        :class:`~pyro_nsde.girsanov.GirsanovEulerMaruyama`.
    :param str covariance: ``"prior"`` (the pure Girsanov mean shift), ``"diagonal"`` or
        ``"full"`` (a learned increment covariance ``S_k``; see :mod:`pyro_nsde.controls`).
        With ``"full"`` the posterior of ``x_0`` is a full-rank normal (else diagonal), so
        that with an affine control the exact posterior of a linear SDE is in the family.
    :param callable init_loc_fn: initialization of the mean-field and ``x_0`` locations
        (default :func:`~pyro.infer.autoguide.initialization.init_to_median`).
    :param tuple hidden_dims: hidden widths of ``"mlp"`` controls.
    :param callable create_plates: as for :class:`~pyro.infer.autoguide.AutoGuide`.
    :param int checkpoint_every: simulate path sites in blocks of this many steps under
        gradient checkpointing (memory-lean training on long paths).
    :param bool compile_step: simulate path sites with the Euler–Maruyama step compiled by
        :func:`torch.compile` (see :class:`~pyro_nsde.girsanov.GirsanovEulerMaruyama`).

    The encoder is called inside the ``pyro.plate`` contexts of the path sites, so with data
    subsampling (``pyro.plate(..., subsample_size=n)``) it can select the current minibatch
    with ``pyro.subsample(data, event_dim=...)`` and see only those series; a context for all
    series is also accepted and is indexed by the subsample.
    """

    def __init__(
        self,
        model,
        *,
        control="mlp",
        encoder=None,
        init_scale: float = 0.1,
        estimator: str = "girsanov",
        covariance: str = "prior",
        init_loc_fn=init_to_median,
        hidden_dims=(64, 64),
        create_plates=None,
        checkpoint_every: int | None = None,
        compile_step: bool = False,
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, but got {estimator!r}")
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, but got {init_scale!r}")
        if encoder is not None and not callable(encoder):
            raise TypeError(f"encoder must be callable, but got {type(encoder).__name__}")
        specs = control.values() if isinstance(control, dict) else [control]
        for spec in specs:
            if not (spec in ("affine", "mlp") or callable(spec)):
                raise ValueError(
                    f"control must be 'affine', 'mlp', a callable u(t, x, context) or a dict "
                    f"of these, but got {spec!r}"
                )
        self._raw_model = (model,)
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)
        self._control_spec = control
        self.encoder = encoder
        self.init_scale = float(init_scale)
        self.estimator = estimator
        self.covariance = check_covariance(covariance)
        self.init_loc_fn = init_loc_fn
        self.hidden_dims = tuple(hidden_dims)
        self.checkpoint_every = checkpoint_every
        if not isinstance(compile_step, bool):
            raise TypeError(f"compile_step must be True or False, but got {compile_step!r}")
        self.compile_step = compile_step

    # ----------------------------------------------------------------------------- setup

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self._path_sites = {}
        other = []
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            prior, ndims = unwrap_path_distribution(site["fn"])
            if prior is not None:
                self._path_sites[name] = ndims
            elif site["fn"].support.is_discrete:
                raise NotImplementedError(
                    f"GirsanovGuide does not handle discrete latent site {name!r}; "
                    f"enumerate it out in the model"
                )
            else:
                other.append(name)
        if not self._path_sites:
            raise ValueError(
                "GirsanovGuide found no EulerMaruyama sample site in the model; use an "
                "AutoGuide such as AutoNormal for models without latent paths"
            )
        self.mean_field = None
        if other:
            hidden = poutine.block(self._raw_model[0], hide=list(self._path_sites))
            self.mean_field = AutoNormal(
                hidden, init_loc_fn=self.init_loc_fn, init_scale=self.init_scale
            )
        context = None
        if self.encoder is not None:
            with torch.no_grad(), poutine.block():
                context = self._encode(self._create_plates(*args, **kwargs), args, kwargs)
            if not isinstance(context, torch.Tensor):
                raise TypeError(
                    f"encoder must return a tensor of shape batch + (c,) or batch + (K+1, c), "
                    f"but returned {type(context).__name__}"
                )
            if context.dim() < 1:
                raise ValueError(
                    "encoder must return a tensor of shape batch + (c,) or batch + (K+1, c), "
                    "but returned a scalar"
                )
        self.controls = PyroModule()
        self.x0_locs = PyroModule()
        self.x0_scales = PyroModule()
        self.x0_heads = nn.ModuleDict()
        self._context_per_step = {}
        for name in self._path_sites:
            self._setup_site(name, context)

    def _full_batch_shape(self, site, shape):
        shape = list(shape)
        for frame in site["cond_indep_stack"]:
            full = frame.full_size or frame.size
            if -frame.dim <= len(shape):
                shape[frame.dim] = full if shape[frame.dim] != 1 else 1
        return torch.Size(shape)

    def _setup_site(self, name, context):
        site = self.prototype_trace.nodes[name]
        prior, _ = unwrap_path_distribution(site["fn"])
        d, m, num_steps = prior.state_dim, prior.noise_dim, prior.num_steps
        batch = self._full_batch_shape(site, prior.batch_shape)
        context_dim = 0
        if context is not None:
            per_step = (
                context.dim() > len(prior.batch_shape) + 1 and context.shape[-2] == num_steps + 1
            )
            self._context_per_step[name] = per_step
            context_dim = context.shape[-1]
            context_batch = context.shape[: -2 if per_step else -1]
            if not any(_broadcasts(context_batch, b) for b in (prior.batch_shape, batch)):
                raise ValueError(
                    f"encoder must return a context of shape batch + (c,) or batch + "
                    f"({num_steps + 1}, c) with batch broadcastable to the batch shape "
                    f"{tuple(prior.batch_shape)} of path site {name!r}, but returned shape "
                    f"{tuple(context.shape)}"
                )
        spec = self._control_spec
        if isinstance(spec, dict):
            if name not in spec:
                raise ValueError(f"control dict has no entry for path site {name!r}")
            spec = spec[name]
        like = {"device": site["value"].device, "dtype": site["value"].dtype}
        if spec == "affine":
            control = AffineControl(num_steps, d, m, batch_shape=batch, covariance=self.covariance)
            control = control.to(**like)
        elif spec == "mlp":
            control = ControlNet(
                d, m, context_dim, hidden_dims=self.hidden_dims, covariance=self.covariance
            ).to(**like)
        else:
            control = spec
        deep_setattr(self.controls, name, control)

        if not isinstance(prior.init, torch.distributions.Distribution):
            return  # a known x_0 stays known
        x0 = site["value"].detach()[..., 0, :]
        if context is None:
            for frame in site["cond_indep_stack"]:
                full = frame.full_size or frame.size
                if full != frame.size:
                    x0 = periodic_repeat(x0, full, frame.dim - 1).contiguous()
            x0 = x0.expand(batch + (d,)).clone()
            deep_setattr(self.x0_locs, name, PyroParam(x0, event_dim=1))
            if self.covariance == "full":  # a full-rank q(x_0), so the family holds the
                # exact posterior of a linear SDE (with an affine control)
                scale = torch.diag_embed(torch.full_like(x0, self.init_scale))
                param = PyroParam(scale, dist.constraints.lower_cholesky, event_dim=2)
            else:
                scale = torch.full_like(x0, self.init_scale)
                param = PyroParam(scale, dist.constraints.softplus_positive, event_dim=1)
            deep_setattr(self.x0_scales, name, param)
        else:
            head = nn.Linear(context_dim, 2 * d).to(**like)
            nn.init.zeros_(head.weight)
            with torch.no_grad():
                head.bias[:d] = x0.reshape(-1, d).mean(0)
                head.bias[d:] = inverse_softplus(max(self.init_scale - MIN_SCALE, MIN_SCALE))
            self.x0_heads[_module_key(name)] = head

    def _check_prototype(self, part_trace):
        for name, part_site in part_trace.nodes.items():
            if part_site["type"] != "sample":
                continue
            site = self.prototype_trace.nodes[name]
            if part_site["value"].shape != site["value"].shape:
                raise ValueError(
                    f"site {name!r} changed shape between traces of the model: "
                    f"{tuple(site['value'].shape)} vs {tuple(part_site['value'].shape)}"
                )

    # ----------------------------------------------------------------------------- running

    def prior(self, name, values, plates, *args, **kwargs) -> EulerMaruyama:
        """The model's distribution at path site ``name`` given upstream ``values``.

        Runs the model (blocked, conditioned on ``values`` and on the plates' subsamples) up to
        the site and returns its :class:`~pyro_nsde.EulerMaruyama`.
        """
        data = dict(values)
        for plate_name, plate in plates.items():
            data[plate_name] = plate.indices
        model = poutine.condition(self._raw_model[0], data=data)
        model = poutine.escape(model, escape_fn=lambda msg: msg["name"] == name)
        try:
            poutine.block(model)(*args, **kwargs)
        except NonlocalExit as site_container:
            # The handlers inside have popped themselves; do not reset_stack(), which would
            # also reset the caller's handlers (e.g. clear the trace recording this guide).
            prior, _ = unwrap_path_distribution(site_container.site["fn"])
            return prior
        raise RuntimeError(f"the model did not reach path site {name!r} on this call")

    def _context_for(self, name, context, site, plates):
        """Select the subsampled series of the encoder's context."""
        event_dims = 2 if self._context_per_step[name] else 1
        for frame in site["cond_indep_stack"]:
            plate = plates[frame.name]
            dim = frame.dim - event_dims
            full = frame.full_size or frame.size
            if full != frame.size and context.dim() >= -dim and context.shape[dim] == full:
                context = context.index_select(dim, plate.indices.to(context.device))
        return context

    def _init_posterior(self, name, prior, context):
        if not isinstance(prior.init, torch.distributions.Distribution):
            return None
        d = prior.state_dim
        if context is None:
            loc = attrgetter(name)(self.x0_locs)
            scale = attrgetter(name)(self.x0_scales)
            if scale.dim() > loc.dim():
                return dist.MultivariateNormal(loc, scale_tril=scale)
        else:
            first = context[..., 0, :] if self._context_per_step[name] else context
            out = self.x0_heads[_module_key(name)](first)
            loc, scale = out[..., :d], MIN_SCALE + nn.functional.softplus(out[..., d:])
        return dist.Normal(loc, scale).to_event(1)

    def _posterior(self, name, prior, context, plates):
        site = self.prototype_trace.nodes[name]
        if context is not None:
            context = self._context_for(name, context, site, plates)
        init = self._init_posterior(name, prior, context)
        control = attrgetter(name)(self.controls)
        posterior = prior.girsanov(
            control,
            init=init,
            context=context,
            estimator=self.estimator,
            context_per_step=self._context_per_step.get(name),
            checkpoint_every=self.checkpoint_every,
            compile_step=self.compile_step,
        )
        ndims = self._path_sites[name]
        return posterior.to_event(ndims) if ndims else posterior

    def _site_plates(self, names, plates):
        """Enter (once each) the plates of the given path sites."""
        stack = ExitStack()
        entered = set()
        for name in names:
            for frame in self.prototype_trace.nodes[name]["cond_indep_stack"]:
                if frame.vectorized and frame.name not in entered:
                    entered.add(frame.name)
                    stack.enter_context(plates[frame.name])
        return stack

    def _encode(self, plates, args, kwargs):
        """Call the encoder inside the path sites' plates (so ``pyro.subsample`` works)."""
        if self.encoder is None:
            return None
        with self._site_plates(self._path_sites, plates):
            return self.encoder(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """Sample every latent site; returns a dict ``{site name: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        values = {} if self.mean_field is None else self.mean_field(*args, **kwargs)
        context = self._encode(plates, args, kwargs)
        for name in self._path_sites:
            prior = self.prior(name, values, plates, *args, **kwargs)
            with self._site_plates([name], plates):
                posterior = self._posterior(name, prior, context, plates)
                values[name] = pyro.sample(name, posterior)
        return values

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """Mean-field medians, and for each path site the noise-free controlled path from
        the posterior mean of ``x_0`` (the posterior mean path for linear SDEs with an affine
        control). Not available for models with subsampled plates."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if any(f.full_size not in (None, f.size) for f in self._prototype_frames.values()):
            raise NotImplementedError("median() is not available with subsampled plates")
        plates = self._create_plates(*args, **kwargs)
        values = {} if self.mean_field is None else self.mean_field.median(*args, **kwargs)
        with poutine.block():
            context = self._encode(plates, args, kwargs)
            for name in self._path_sites:
                prior = self.prior(name, values, plates, *args, **kwargs)
                with self._site_plates([name], plates):
                    posterior = self._posterior(name, prior, context, plates)
                    if self._path_sites[name]:
                        posterior = posterior.base_dist
                    values[name] = posterior.skeleton()
        return values


def _broadcasts(shape, batch_shape) -> bool:
    try:
        return torch.broadcast_shapes(shape, batch_shape) == batch_shape
    except RuntimeError:
        return False


def _module_key(name: str) -> str:
    return name.replace(".", "__")
