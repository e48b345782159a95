"""The Girsanov guide: one guide for a whole model with Euler–Maruyama path sites."""

import functools
import warnings
from contextlib import ExitStack, contextmanager
from operator import attrgetter

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.transforms import biject_to, transform_to
from pyro.infer.autoguide import (
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam
from pyro.ops.tensor_utils import periodic_repeat
from pyro.poutine.runtime import _DIM_ALLOCATOR, _PYRO_STACK, NonlocalExit
from pyro.poutine.util import prune_subsample_sites
from torch import nn

from .controls import (
    MIN_SCALE,
    AffineControl,
    ControlNet,
    PerStepCoefficients,
    check_covariance,
    inverse_softplus,
    scaled,
)
from .euler_maruyama import EulerMaruyama
from .gauss_markov import (
    GaussMarkovEulerMaruyama,
    LinearCoefficients,
    LinearControl,
    check_linear_family,
)
from .girsanov import ESTIMATORS
from .kalman import GaussianSites, smooth
from .laplace import coefficients_of, init_of, laplace, linearize, quadratic_sites

CONTROL_NAMES = ("affine", "linear", "mlp")
#: Optimizer steps on coefficients that start at (and follow) a Laplace approximation are this
#: many times as large in their units as on an unconstrained parameter: they start near their
#: optimum, and full-size steps of Adam on noisy gradients would walk them away from it.
LAPLACE_STEP_SCALE = 0.1
#: The step ``ε`` (in unconstrained units) of the central differences that give the derivatives
#: of a path's Laplace approximation in the parameters it depends on.
SENSITIVITY_STEP = 0.05


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


LATENT_FAMILIES = {
    "normal": AutoNormal,
    "multivariate": AutoMultivariateNormal,
    "lowrank": AutoLowRankMultivariateNormal,
}
PATH_INITS = ("laplace", "prior")
CONDITIONALS = ("auto", "kalman", "taylor", None)


class GirsanovGuide(AutoGuide):
    r"""A guide for models with :class:`~pyro_nsde.EulerMaruyama` path sites, for
    ``SVI(model, guide, optim, Trace_ELBO())``.

    Every path site is sampled from ``prior.girsanov(control, init=q(x_0), context=c)``, where
    ``prior`` is the model's own distribution at that site *given the values this guide drew
    upstream* (SDE parameters with priors, random initial states, plates): the guide runs the
    model, conditioned on its draws so far, up to the site. The posterior increments are

        ``ΔW_k ~ N(h_k u_k, h_k S_k S_kᵀ)``,  ``(u_k, S_k) = control(t_k, x_k, c_k)``,

    so the posterior drift is ``f + G u`` and the per-step KL is
    ``½[tr(S Sᵀ) + h |u|² - m - log det(S Sᵀ)]``. Every other latent site gets a normal
    family in unconstrained space (``latents``), and the coefficients of ``"affine"`` and
    ``"linear"`` controls are affine functions of those sites' values (``conditional``), so
    that ``q(path | θ)`` moves with the parameters ``θ`` drawn with it.

    **Families of the path** (``control``):

    - ``"affine"``: ``u_k(x) = (a_k + B_k x) / sqrt(h_k)`` per step
      (:class:`~pyro_nsde.AffineControl`); exact in form for linear SDEs.
    - ``"linear"``: the posterior drift itself is affine, ``v_k(x) = (a_k + B_k x) /
      sqrt(h_k)`` and ``u = G⁺ (v - f)`` (:class:`~pyro_nsde.LinearControl`): a Gauss–Markov
      path sampled by a parallel scan, with no loop over steps
      (:class:`~pyro_nsde.GaussMarkovEulerMaruyama`).
    - ``"mlp"``: a :class:`~pyro_nsde.ControlNet` ``u(t, x, c)``; or any module/callable
      ``u(t, x, context)``; or a dict ``{site_name: one of these}``.

    **Initialization** (``init_path="laplace"``, the default, for ``"affine"`` and
    ``"linear"`` controls without an encoder): the coefficients and ``q(x_0)`` start at the
    Laplace approximation of the path's posterior at the initial values of the other latent
    sites (:func:`~pyro_nsde.laplace.laplace`: the most probable path and the Gauss–Markov
    chain of its Kalman smoother). For a linear SDE observed with Gaussian noise that *is* the
    optimum of the family (exactly, with ``covariance="full"``), so SVI starts converged for
    the path and spends its steps on the parameters; for nonlinear models it starts the path
    at the data rather than at the prior, so a learned diffusion is not dragged towards zero
    while the guide catches up. ``init_path="prior"`` starts at the prior (zero control).

    :param callable model: a Pyro model.
    :param control: ``"affine"``, ``"linear"``, ``"mlp"``, a module/callable, or a dict.
    :param nn.Module encoder: optional; ``encoder(*model_args, **model_kwargs)`` returns a
        context ``batch + (c,)`` (static) or ``batch + (K+1, c)`` (per step) for the controls
        (amortized inference). The posterior of ``x_0`` is then a function of the context.
    :param float init_scale: initial posterior scale of ``x_0`` (without Laplace
        initialization) and of the other latent sites.
    :param str estimator: ``"girsanov"``, ``"plain"`` or ``"stl"``; see
        :class:`~pyro_nsde.girsanov.GirsanovEulerMaruyama`.
    :param str covariance: ``"prior"`` (the pure Girsanov mean shift), ``"diagonal"`` or
        ``"full"`` (a learned increment covariance ``S_k``; see :mod:`pyro_nsde.controls`).
        With ``"full"`` the posterior of ``x_0`` is a full-rank normal (else diagonal), so
        that with an affine or linear control the exact posterior of a linear SDE is in the
        family.
    :param str latents: the family of the other latent sites, in unconstrained space:
        ``"normal"`` (mean field, :class:`~pyro.infer.autoguide.AutoNormal`),
        ``"multivariate"`` (full-rank correlations,
        :class:`~pyro.infer.autoguide.AutoMultivariateNormal`) or ``"lowrank"``
        (:class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` with rank
        ``latent_rank``). Correlated families hold the strong dependence between rates and
        noise scales of an SDE; they need every latent site outside subsampled plates.
    :param int latent_rank: the rank of ``"lowrank"`` (default: Pyro's, about ``√n``).
    :param str conditional: how the coefficients of ``"affine"`` and ``"linear"`` controls
        (with Laplace initialization) follow the parameters ``θ`` drawn with the path:
        ``"kalman"`` (the default for ``"affine"``: for every draw of ``θ`` the Kalman
        smoother of the model linearized at the Laplace path gives the coefficients and
        ``q(x_0)``, differentiably in ``θ``; the control's parameters are learned corrections
        on top, zero at the start, so ``q(path | θ)`` is the exact conditional posterior of a
        linear-Gaussian model for every ``θ``), ``"taylor"`` (the default for ``"linear"``,
        which keeps training free of sequential loops: coefficients affine in the centred
        unconstrained values of the latent sites that share no plate with the path, slopes
        from central differences of the Laplace fit at refreshes, then learned; see
        :class:`~pyro_nsde.controls.PerStepCoefficients`), ``None`` (the coefficients start
        at the Laplace fit and do not depend on ``θ``), or ``"auto"`` (the defaults above).
    :param str init_path: ``"laplace"`` or ``"prior"`` (see above).
    :param int refresh_every: with Laplace initialization, re-fit it every this many
        training calls of the guide at the current parameters and move the coefficients with
        it (:meth:`refresh`); ``None``: only at the start.
    :param callable init_loc_fn: initialization of the other latent sites (default
        :func:`~pyro.infer.autoguide.initialization.init_to_median`).
    :param tuple hidden_dims: hidden widths of ``"mlp"`` controls.
    :param callable create_plates: as for :class:`~pyro.infer.autoguide.AutoGuide`; needed
        to evaluate an amortized guide on data of another size than it was built on.
    :param int checkpoint_every: simulate path sites in blocks of this many steps under
        gradient checkpointing (memory-lean training on long paths; sequential controls).
    :param bool compile_step: simulate path sites with the Euler–Maruyama step compiled by
        :func:`torch.compile` (sequential controls; see
        :class:`~pyro_nsde.girsanov.GirsanovEulerMaruyama`).

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
        latents: str = "normal",
        latent_rank: int | None = None,
        conditional: str | None = "auto",
        init_path: str = "laplace",
        refresh_every: int | None = 10,
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
            if not (spec in CONTROL_NAMES or callable(spec)):
                raise ValueError(
                    f"control must be one of {CONTROL_NAMES}, a callable u(t, x, context) or "
                    f"a dict of these, but got {spec!r}"
                )
        if latents not in LATENT_FAMILIES:
            raise ValueError(
                f"latents must be one of {tuple(LATENT_FAMILIES)}, but got {latents!r}"
            )
        if latent_rank is not None and not (
            isinstance(latent_rank, int) and not isinstance(latent_rank, bool) and latent_rank > 0
        ):
            raise ValueError(f"latent_rank must be a positive int or None, but got {latent_rank!r}")
        if latent_rank is not None and latents != "lowrank":
            raise ValueError("latent_rank is only used with latents='lowrank'")
        if init_path not in PATH_INITS:
            raise ValueError(f"init_path must be one of {PATH_INITS}, but got {init_path!r}")
        if conditional not in CONDITIONALS:
            raise ValueError(f"conditional must be one of {CONDITIONALS}, but got {conditional!r}")
        if not isinstance(compile_step, bool):
            raise TypeError(f"compile_step must be True or False, but got {compile_step!r}")
        self._raw_model = (model,)
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)
        self._control_spec = control
        self.encoder = encoder
        self.init_scale = float(init_scale)
        self.estimator = estimator
        self.covariance = check_covariance(covariance)
        self.latents = latents
        self.latent_rank = latent_rank
        self.conditional = conditional
        self.init_path = init_path
        if refresh_every is not None and not (
            isinstance(refresh_every, int)
            and not isinstance(refresh_every, bool)
            and refresh_every > 0
        ):
            raise ValueError(
                f"refresh_every must be a positive int or None, but got {refresh_every!r}"
            )
        self.refresh_every = refresh_every
        self.init_loc_fn = init_loc_fn
        self.hidden_dims = tuple(hidden_dims)
        self.checkpoint_every = checkpoint_every
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
        self.latent_guide = None
        if other:
            hidden = poutine.block(self._raw_model[0], hide=list(self._path_sites))
            family = LATENT_FAMILIES[self.latents]
            options = {"init_loc_fn": self.init_loc_fn, "init_scale": self.init_scale}
            if self.latents == "lowrank":
                options["rank"] = self.latent_rank
            self.latent_guide = family(hidden, **options)
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
        self.x0_slopes = PyroModule()  # ∂ E[x_0] / ∂ η where q(x_0) follows the parameters
        self._context_per_step = {}
        self._modes, self._param_sites = {}, {}
        for name in self._path_sites:
            self._modes[name] = self._mode_for(self._control_for(name))
            sites = self._global_sites(name, other) if self._modes[name] == "taylor" else []
            if self._modes[name] == "taylor" and not sites:
                self._modes[name] = "fixed"
            self._param_sites[name] = sites
            self._setup_site(name, context)
        self._laplace_paths, self._laplace_bases, self._fit_centres = {}, {}, {}
        self._calls = 0
        self._path_batches = {
            name: unwrap_path_distribution(self.prototype_trace.nodes[name]["fn"])[0].batch_shape
            for name in self._path_sites
        }
        self._laplace_sites = {name for name, mode in self._modes.items() if mode is not None}
        self._nesting = None
        if self._laplace_sites:
            # One more run of the model (it draws random numbers, so only where needed): the
            # plate nesting with the observed sites' plates included.
            full_trace = poutine.block(poutine.trace(self._raw_model[0]).get_trace)(*args, **kwargs)
            self._nesting = _plate_nesting(full_trace)
            values = {
                name: site["value"].detach()
                for name, site in self.prototype_trace.iter_stochastic_nodes()
            }
            with torch.no_grad(), _outside_inference():
                self._fit_paths(values, self._create_plates(*args, **kwargs), args, kwargs)

    def _global_sites(self, name, other):
        """The latent sites that share no plate with path site ``name`` (and are not
        subsampled): the parameters its coefficients may depend on."""
        frames = {f.name for f in self.prototype_trace.nodes[name]["cond_indep_stack"]}
        chosen = []
        for site_name in other:
            stack = self.prototype_trace.nodes[site_name]["cond_indep_stack"]
            if any(f.name in frames or (f.full_size or f.size) != f.size for f in stack):
                continue
            chosen.append(site_name)
        return chosen

    def _full_batch_shape(self, site, shape):
        shape = list(shape)
        for frame in site["cond_indep_stack"]:
            full = frame.full_size or frame.size
            if -frame.dim <= len(shape):
                shape[frame.dim] = full if shape[frame.dim] != 1 else 1
        return torch.Size(shape)

    def _mode_for(self, spec):
        """How a path site with this control spec follows its Laplace approximation:
        ``"kalman"`` (the smoother for each draw of the parameters, plus learned corrections),
        ``"taylor"`` (coefficients affine in the parameters, from the approximation and its
        derivatives at refreshes, then learned), ``"fixed"`` (from the approximation at
        refreshes, then learned, not depending on the parameters), or ``None`` (not at all:
        other controls, encoders, subsampled plates, ``init_path="prior"``)."""
        subsampled = any(f.full_size not in (None, f.size) for f in self._prototype_frames.values())
        if not (
            spec in ("affine", "linear")
            and self.init_path == "laplace"
            and self.encoder is None
            and not subsampled
        ):
            return None
        if self.conditional is None:
            return "fixed"
        if self.conditional == "auto":
            return "kalman" if spec == "affine" else "taylor"
        return self.conditional

    def _control_for(self, name):
        spec = self._control_spec
        if isinstance(spec, dict):
            if name not in spec:
                raise ValueError(f"control dict has no entry for path site {name!r}")
            spec = spec[name]
        return spec

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
        spec = self._control_for(name)
        like = {"device": site["value"].device, "dtype": site["value"].dtype}
        param_dim = sum(
            self.prototype_trace.nodes[s]["value"].numel() for s in self._param_sites[name]
        )
        mode = self._modes[name]
        step_scale = 1.0 if mode is None else LAPLACE_STEP_SCALE
        if spec in ("affine", "linear"):
            options = {
                "batch_shape": batch,
                "covariance": self.covariance,
                "context_dim": context_dim,
                "param_dim": param_dim,
                "step_scale": step_scale,
            }
            if spec == "affine":
                control = AffineControl(num_steps, d, m, **options)
            else:
                state_dependent = _state_dependent(prior)
                # With a learned covariance and diagonal noise, the step noise is a state-space
                # factor: the path's law then does not move with the diffusion's parameters.
                state_scale = prior.noise_type == "diagonal" and self.covariance != "prior"
                if state_dependent and self.covariance == "prior":
                    raise ValueError(
                        f"path site {name!r} has a diffusion that depends on the state: "
                        f"control='linear' then learns the step noise itself and needs "
                        f"covariance='diagonal' or 'full'"
                    )
                check_linear_family(prior, state_scale or not state_dependent)
                control = LinearControl(num_steps, d, m, state_scale=state_scale, **options)
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
            init_scale = self.init_scale
            if mode == "kalman":  # corrections to the smoother's q(x_0 | θ)
                x0, init_scale = torch.zeros_like(x0), 1.0
            real = scaled(dist.constraints.real, step_scale)
            deep_setattr(self.x0_locs, name, PyroParam(x0, real, event_dim=1))
            if self.covariance == "full":  # a full-rank q(x_0), so the family holds the
                # exact posterior of a linear SDE (with an affine control)
                scale = torch.diag_embed(torch.full_like(x0, init_scale))
                constraint = scaled(dist.constraints.lower_cholesky, step_scale)
                param = PyroParam(scale, constraint, event_dim=2)
            else:
                scale = torch.full_like(x0, init_scale)
                constraint = scaled(dist.constraints.softplus_positive, step_scale)
                param = PyroParam(scale, constraint, event_dim=1)
            deep_setattr(self.x0_scales, name, param)
            if mode == "taylor" and param_dim:
                slope = x0.new_zeros(x0.shape + (param_dim,))
                real = scaled(dist.constraints.real, step_scale)
                deep_setattr(self.x0_slopes, name, PyroParam(slope, real, event_dim=2))
        else:
            head = nn.Linear(context_dim, 2 * d).to(**like)
            nn.init.zeros_(head.weight)
            with torch.no_grad():
                head.bias[:d] = x0.reshape(-1, d).mean(0)
                head.bias[d:] = inverse_softplus(max(self.init_scale - MIN_SCALE, MIN_SCALE))
            self.x0_heads[_module_key(name)] = head

    @torch.no_grad()
    def refresh(self, *args, **kwargs):
        """Re-fit the Laplace approximation of each path's posterior at the current posterior
        medians of the other latent sites (and the model's current parameters), and move the
        coefficients of affine and linear controls and ``q(x_0)`` by the change of that
        approximation since the last fit; what SVI has learned on top of it is kept.

        The guide calls this itself every ``refresh_every`` training steps. For a linear SDE
        observed with Gaussian noise it puts the path's posterior back at the exact
        conditional posterior given the current parameters, so a learned diffusion follows
        the gradient of the marginal likelihood rather than crawling along with the path's
        coefficients (the slow coordinate ascent of EM).
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.encoder is not None or not self._laplace_sites:
            return
        with _outside_inference():  # nothing here belongs to the training step's trace
            plates = self._create_plates(*args, **kwargs)
            medians = self._latent_medians(args, kwargs)
            values = {name: value.detach() for name, value in medians.items()}
            self._fit_paths(values, plates, args, kwargs)

    def _fit_paths(self, values, plates, args, kwargs):
        """Fit the Laplace approximation of each path site (in model order) at ``values`` and
        move its control's coefficients and ``q(x_0)`` there (:meth:`_rebase`). Where the
        coefficients depend on parameters, their derivatives are fitted too: by central
        differences of the approximation in each unconstrained parameter, all ``2n + 1`` fits
        in one run of the model on parameters stacked along a dim left of its plates (the model
        must broadcast them, as ``Predictive(parallel=True)`` needs too). Must run outside of
        any inference handler (:func:`_outside_inference`)."""
        for name in self._path_sites:
            if name not in self._laplace_sites:
                continue
            control = attrgetter(name)(self.controls)
            sites = self._param_sites[name] if control.param_dim else []
            size = 2 * control.param_dim + 1 if sites else 1
            batched, directions = self._perturbed(values, sites)
            start = self._laplace_paths.get(name)
            prior = self.prior(name, batched, plates, *args, **kwargs)
            log_likelihood = _path_log_likelihood(self._raw_model[0], name, batched, args, kwargs)
            posterior, path = laplace(prior, log_likelihood, start)
            if not _finite_fit(posterior, path):
                self._drop_fit(name)
                continue
            self._laplace_paths[name] = path
            if sites:  # the coefficients are expanded about this point (see _params)
                self._fit_centres[name] = {k: values[k].detach().clone() for k in sites}
            if self._modes[name] == "kalman":  # the smoother runs at each draw, around path
                values[name] = path
                continue

            # (*fits, *path batch, *event) -> (size, *path batch, *event)
            split = functools.partial(
                _split_fits,
                size=size,
                batch_ndim=posterior.chain.h.dim() - 1,
                proto_batch=self._path_batches[name],
            )
            fits = {attr: split(v) for attr, v in coefficients_of(control, posterior).items()}
            for attr, value in fits.items():
                self._rebase(control, attr, value[0], (name, attr))
            if sites:
                weight = _sensitivities(fits, control, directions)
                self._rebase(control, "param_weight", weight, (name, "param_weight"))
            if isinstance(prior.init, torch.distributions.Distribution):
                loc, scale = init_of(posterior, self.covariance == "full")
                loc = split(loc)
                self._rebase_init(name, loc[0], split(scale)[0])
                if sites:
                    n = control.param_dim
                    slope = ((loc[1 : n + 1] - loc[n + 1 :]) / directions).movedim(0, -1)
                    parent, _, leaf = name.rpartition(".")
                    module = attrgetter(parent)(self.x0_slopes) if parent else self.x0_slopes
                    self._rebase(module, leaf, slope, (name, "x0_slope"))
            values[name] = split(path)[0]

    def _drop_fit(self, name):
        """A Laplace fit that is not finite (a likelihood or path that overflows at these
        values) is not used: at the first fit the site's guide starts at the prior
        (``init_path="prior"``), at a refresh the previous fit is kept."""
        if name in self._laplace_paths:
            warnings.warn(
                f"the Laplace approximation of path site {name!r} is not finite at the current "
                f"values; its refresh is skipped",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        warnings.warn(
            f"the Laplace approximation of path site {name!r} is not finite at the initial "
            f"values (a path or likelihood that overflows); its guide starts at the prior, "
            f"as with init_path='prior'",
            RuntimeWarning,
            stacklevel=3,
        )
        self._modes[name] = None
        self._laplace_sites.discard(name)

    def _perturbed(self, values, sites):
        """``values`` with the parameter ``sites`` stacked along a new dim left of all plates
        (dim ``-(nesting + 1)``):
        ``η̂``, ``η̂ + ε e_j`` and ``η̂ - ε e_j`` for every unconstrained coordinate ``j``
        (``ε`` = :data:`SENSITIVITY_STEP`). Returns ``(values, 2ε)``."""
        if not sites:
            return values, None
        flats, pieces = [], []
        for site_name in sites:
            site = self.prototype_trace.nodes[site_name]
            transform = biject_to(site["fn"].support)
            flat = transform.inv(values[site_name]).reshape(-1)
            flats.append(flat)
            pieces.append((site_name, transform, site, flat.numel()))
        eta = torch.cat(flats)
        n = eta.numel()
        step = SENSITIVITY_STEP * torch.eye(n, dtype=eta.dtype, device=eta.device)
        batch = torch.cat([eta.unsqueeze(0), eta + step, eta - step])  # (2n + 1, n)
        batched, offset = dict(values), 0
        for site_name, transform, site, size in pieces:
            shape = site["value"].shape
            pad = (1,) * (self._nesting - len(site["fn"].batch_shape))
            chunk = batch[:, offset : offset + size].reshape((2 * n + 1, *pad, *shape))
            batched[site_name] = transform(chunk)
            offset += size
        return batched, 2 * SENSITIVITY_STEP

    def _rebase(self, module, attr, value, key):
        """Move a (constrained) parameter by ``value`` minus the value of the last fit, in
        unconstrained space; at the first fit, set it to ``value``."""
        current = getattr(module, attr).detach()
        value = value.to(current).expand_as(current)
        constraint, _ = module._pyro_params[attr]
        transform = transform_to(constraint)
        old = self._laplace_bases.get(key)
        if old is None:
            new = value
        else:
            new = transform(transform.inv(current) + transform.inv(value) - transform.inv(old))
        setattr(module, attr, new.clone())
        self._laplace_bases[key] = value.clone()

    def _rebase_init(self, name, loc, scale):
        parent, _, leaf = name.rpartition(".")
        for modules, value, kind in (
            (self.x0_locs, loc, "x0_loc"),
            (self.x0_scales, scale, "x0_scale"),
        ):
            module = attrgetter(parent)(modules) if parent else modules
            self._rebase(module, leaf, value, (name, kind))

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
        try:
            site = self._run_to_site(name, data, args, kwargs)
        except Exception as error:
            # The guide's subsample indices may not fit the model's plates (data of another
            # size than the guide was built on): say so if that is the cause.
            try:
                site = self._run_to_site(name, dict(values), args, kwargs)
            except Exception:
                raise error from None
            self._check_plates(name, site, plates)
            raise
        self._check_plates(name, site, plates)
        prior, _ = unwrap_path_distribution(site["fn"])
        return prior

    def _run_to_site(self, name, data, args, kwargs) -> dict:
        """The model's site ``name`` from a blocked run conditioned on ``data``, stopped there."""
        model = poutine.condition(self._raw_model[0], data=data)
        model = poutine.escape(model, escape_fn=lambda msg: msg["name"] == name)
        try:
            poutine.block(model)(*args, **kwargs)
        except NonlocalExit as site_container:
            # The handlers inside have popped themselves; do not reset_stack(), which would
            # also reset the caller's handlers (e.g. clear the trace recording this guide).
            return site_container.site
        raise RuntimeError(f"the model did not reach path site {name!r} on this call")

    def _check_plates(self, name, site, plates):
        """The model's plates at the site must be the ones this guide was built with."""
        for frame in site["cond_indep_stack"]:
            if frame.name not in plates:
                continue
            expected = plates[frame.name].size  # the full size of the guide's plate
            full = frame.full_size or frame.size
            if expected != full:
                raise ValueError(
                    f"plate {frame.name!r} of path site {name!r} has size {full} on this call, "
                    f"but the guide's plate has size {expected}: without create_plates, the "
                    f"guide's plates follow its first call. Give the guide plates that follow the "
                    f"data, e.g. GirsanovGuide(model, ..., create_plates=lambda data, *rest: "
                    f"pyro.plate({frame.name!r}, len(data), dim={frame.dim}))"
                )

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

    def _init_posterior(self, name, prior, context, base=None, params=None):
        if not isinstance(prior.init, torch.distributions.Distribution):
            return None
        d = prior.state_dim
        if context is None:
            loc = attrgetter(name)(self.x0_locs)
            scale = attrgetter(name)(self.x0_scales)
            full = scale.dim() > loc.dim()
            if params is not None and self._modes[name] == "taylor":  # E[x_0] affine in η
                slope = attrgetter(name)(self.x0_slopes)
                loc = loc + (slope @ params[..., None]).squeeze(-1)
            if base is not None:  # corrections to the smoother's q(x_0 | θ)
                loc = base["init_loc"] + loc
                scale = base["init_scale"] @ scale if full else base["init_scale"] * scale
            if full:
                return dist.MultivariateNormal(loc, scale_tril=scale)
        else:
            first = context[..., 0, :] if self._context_per_step[name] else context
            out = self.x0_heads[_module_key(name)](first)
            loc, scale = out[..., :d], MIN_SCALE + nn.functional.softplus(out[..., d:])
        return dist.Normal(loc, scale).to_event(1)

    def _params(self, name, values, batch_ndim):
        """``η - η̂`` for path site ``name``: the unconstrained values of its parameter sites,
        flattened, minus their values at the last Laplace fit (about which the coefficients
        and their slopes were expanded), with batch dims that broadcast with the path's
        (``batch_ndim`` of them at most). Without a fit (it was not finite) the slopes are
        zero and so is ``η - η̂``."""
        sites = self._param_sites.get(name)
        if not sites:
            return None
        centre = self._fit_centres.get(name, values)
        pieces = []
        for site_name in sites:
            site = self.prototype_trace.nodes[site_name]
            transform = biject_to(site["fn"].support)
            centred = transform.inv(values[site_name]) - transform.inv(centre[site_name]).detach()
            prefix = centred.shape[: centred.dim() - site["value"].dim()]
            pad = (1,) * len(site["fn"].batch_shape)  # the slots of the site's own plates
            pieces.append(centred.reshape(prefix + pad + (-1,)))
        shape = torch.broadcast_shapes(*(p.shape[:-1] for p in pieces))
        params = torch.cat([p.expand(shape + p.shape[-1:]) for p in pieces], dim=-1)
        while params.dim() > batch_ndim + 1 and params.shape[0] == 1:
            params = params.squeeze(0)
        return params

    def _kalman_base(self, name, prior, values, args, kwargs) -> dict:
        """The smoother's coefficients and ``q(x_0)`` for path site ``name`` at the drawn
        ``values``: the Kalman smoother of the model linearized about the reference path (the
        last Laplace fit), as differentiable functions of the parameters; exact for a linear
        SDE observed with Gaussian noise, whatever the parameters.

        The likelihood's sites need a run of the whole model. The draws may be laid out for
        fewer plates than the model has (``Predictive`` guesses its nesting from the guide), so
        that run gets them with the draws left of all the model's plates, and the result is
        laid out back like the path."""
        control = attrgetter(name)(self.controls)
        reference = self._laplace_paths[name]
        num, prefix, model_values = self._model_layout(values)
        proto = self._path_batches[name]
        target = torch.broadcast_shapes(prefix, proto, prior.batch_shape)
        path_reference = reference.expand(target + reference.shape[-2:]).contiguous()
        model_reference = reference
        if num > 1:
            pad = (1,) * (self._nesting - len(proto))
            model_reference = reference.expand((num, *pad, *reference.shape))
        model_reference = model_reference.contiguous()
        log_likelihood = _path_log_likelihood(self._raw_model[0], name, model_values, args, kwargs)
        with _outside_inference():
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
        like = reference
        base = {k: v.to(like) for k, v in coefficients_of(control, posterior).items()}
        init_loc, init_scale = init_of(posterior, self.covariance == "full")
        base["init_loc"], base["init_scale"] = init_loc.to(like), init_scale.to(like)
        return base

    def _model_layout(self, values):
        """``(S, prefix, values)``: the number ``S`` of draws in ``values`` (1 for values of
        the prototype's shapes), the batch shape ``prefix`` they have left of (and in the
        slots of) each site's plates, and the values with the draws moved to one dim left of
        all of the model's plates (dim ``-(nesting + 1)``)."""
        num, prefix = 1, torch.Size()
        moved = dict(values)
        for site_name, value in values.items():
            site = self.prototype_trace.nodes.get(site_name)
            if site is None or site_name in self._path_sites:
                continue
            shape = site["value"].shape
            extra = value.shape[: value.dim() - len(shape)]
            count = extra.numel()
            if count == 1:
                continue
            num = count
            prefix = extra + (1,) * len(site["fn"].batch_shape)
            pad = (1,) * (self._nesting - len(site["fn"].batch_shape))
            moved[site_name] = value.reshape((count, *pad, *shape))
        return num, prefix, moved

    def _posterior(self, name, prior, context, plates, params=None, base=None):
        site = self.prototype_trace.nodes[name]
        if context is not None:
            context = self._context_for(name, context, site, plates)
        init = self._init_posterior(name, prior, context, base, params)
        control = attrgetter(name)(self.controls)
        if isinstance(control, PerStepCoefficients):
            control = control(context, params, base)
        if isinstance(control, LinearCoefficients):
            posterior = GaussMarkovEulerMaruyama(
                prior, control, init=init, estimator=self.estimator
            )
        else:
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

    def _latent_medians(self, args, kwargs) -> dict:
        """Posterior medians of the other latent sites (empty without any)."""
        if self.latent_guide is None:
            return {}
        if self.latent_guide.prototype_trace is None:
            self.latent_guide._setup_prototype(*args, **kwargs)
        return self.latent_guide.median(*args, **kwargs)

    def _latent_values(self, args, kwargs, median=False):
        """Draws (or medians) of the other latent sites."""
        if self.latent_guide is None:
            return {}
        if median:
            return dict(self._latent_medians(args, kwargs))
        return self.latent_guide(*args, **kwargs)

    def get_extra_state(self):
        """What the guide keeps besides parameters and buffers, so that ``state_dict()`` (and a
        checkpoint) resumes training exactly: the Laplace reference paths, the values of the
        last fit its coefficients were rebased from, and the count of training calls."""
        if self.prototype_trace is None:
            return {}
        return {
            "laplace_paths": dict(self._laplace_paths),
            "laplace_bases": dict(self._laplace_bases),
            "fit_centres": dict(self._fit_centres),
            "calls": self._calls,
        }

    def set_extra_state(self, state):
        if not state:
            return
        if self.prototype_trace is None:
            raise ValueError("the guide must be set up (called once) before its state is loaded")
        self._laplace_paths = dict(state["laplace_paths"])
        self._laplace_bases = dict(state["laplace_bases"])
        self._fit_centres = dict(state.get("fit_centres", {}))
        self._calls = int(state["calls"])

    def forward(self, *args, **kwargs):
        """Sample every latent site; returns a dict ``{site name: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.refresh_every and torch.is_grad_enabled() and self.training:
            self._calls += 1
            if self._calls % self.refresh_every == 0:
                self.refresh(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        values = self._latent_values(args, kwargs)
        return self._draw_paths(plates, values, args, kwargs, pyro.sample)

    def _draw_paths(self, plates, values, args, kwargs, draw) -> dict:
        """For each path site in turn, its posterior law given ``values`` (the other latent
        sites, and the paths drawn before it), and ``values[name] = draw(name, law)`` inside
        the site's plates; returns ``values``."""
        context, encoded = None, False
        for name in self._path_sites:
            prior = self.prior(name, values, plates, *args, **kwargs)
            if not encoded:  # after the model's plates are checked against the guide's
                context, encoded = self._encode(plates, args, kwargs), True
            params = self._params(name, values, len(prior.batch_shape))
            base = None
            if self._modes[name] == "kalman":
                base = self._kalman_base(name, prior, values, args, kwargs)
            with self._site_plates([name], plates):
                posterior = self._posterior(name, prior, context, plates, params, base)
                values[name] = draw(name, posterior)
        return values

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """Medians of the other latent sites, and for each path site the noise-free controlled
        path from the posterior mean of ``x_0`` (the posterior mean path for linear SDEs with
        an affine or linear control). Not available for models with subsampled plates."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if any(f.full_size not in (None, f.size) for f in self._prototype_frames.values()):
            raise NotImplementedError("median() is not available with subsampled plates")
        plates = self._create_plates(*args, **kwargs)
        values = self._latent_values(args, kwargs, median=True)

        def skeleton(name, posterior):
            return (posterior.base_dist if self._path_sites[name] else posterior).skeleton()

        with poutine.block():
            return self._draw_paths(plates, values, args, kwargs, skeleton)


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
    *event)``."""
    return value.reshape((size, *proto_batch, *value.shape[batch_ndim:]))


def _sensitivities(fits, control, step):
    """``∂ coefficient / ∂ η_j`` by central differences of stacked fits ``(2n + 1, ...)``:
    the control's ``param_weight`` ``(*batch, K, width, n)`` (``a``, ``vec B``, and the log
    of ``S``'s diagonal, whose rows :class:`~pyro_nsde.controls.PerStepCoefficients` scales)."""
    n = control.param_dim
    columns = [fits["loc"], fits["gain"].flatten(-2)]
    if "scale" in fits:
        scale = fits["scale"]
        diagonal = scale if control.covariance == "diagonal" else scale.diagonal(dim1=-2, dim2=-1)
        columns.append(diagonal.log())
    stacked = torch.cat(columns, dim=-1)  # (2n + 1, *batch, K, width)
    derivative = (stacked[1 : n + 1] - stacked[n + 1 :]) / step
    return derivative.movedim(0, -1)


def _state_dependent(prior) -> bool:
    """Whether the prior's diffusion depends on the state (checked by differentiation)."""
    if not callable(prior.diffusion):
        return False
    t = prior.grid.step(0)[0]
    x = torch.randn(
        prior.batch_shape + (prior.state_dim,), dtype=prior.times.dtype, device=prior.times.device
    )
    with torch.enable_grad():
        leaf = x.requires_grad_()
        (grad,) = torch.autograd.grad(prior.diffusion(t, leaf).sum(), leaf, allow_unused=True)
    return grad is not None and bool((grad != 0).any())


@contextmanager
def _outside_inference():
    """Run side computations of the guide (Laplace fits of the paths at the current
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


def _plate_nesting(trace) -> int:
    """The number of batch dims the model's sites use (plates and batch shapes)."""
    nesting = 0
    for site in prune_subsample_sites(trace).nodes.values():
        if site["type"] != "sample":
            continue
        dims = [-frame.dim for frame in site["cond_indep_stack"] if frame.vectorized]
        nesting = max([nesting, len(site["fn"].batch_shape), *dims])
    return nesting


def _path_log_likelihood(model, name, values, args, kwargs):
    """``x ↦ log p(everything else | x)`` at the given values of the other sites: the log
    joint of the model conditioned on them and on path site ``name`` at ``x``, without the
    path's own term (sites upstream of it add a constant)."""

    def log_likelihood(x):
        conditioned = poutine.condition(model, data={**values, name: x})
        with poutine.block():
            trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
        return trace.log_prob_sum(site_filter=lambda site_name, site: site_name != name)

    return log_likelihood


def _broadcasts(shape, batch_shape) -> bool:
    try:
        return torch.broadcast_shapes(shape, batch_shape) == batch_shape
    except RuntimeError:
        return False


def _module_key(name: str) -> str:
    return name.replace(".", "__")
