"""The Girsanov guide: one guide for a whole model with Euler–Maruyama path sites.

:class:`GirsanovGuide` is the orchestrator; its parts live beside it: the options
(:mod:`~pyro_nsde.guide.options`), the family of the other latent sites
(:mod:`~pyro_nsde.guide.latents`), one :class:`~pyro_nsde.guide.site.PathSite` per path site
with its control (:mod:`~pyro_nsde.guide.control_factory`), law of ``x_0``
(:mod:`~pyro_nsde.guide.initial`) and conditional strategy
(:mod:`~pyro_nsde.guide.conditionals`). ``docs/architecture.md`` shows how they fit together.
"""

from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.nn import PyroModule
from torch import nn

from ..sde.euler_maruyama import EulerMaruyama
from ..sde.sites import (
    full_size,
    is_subsampled,
    outside_inference,
    plate_nesting,
    run_to_site,
    unwrap_path_distribution,
)
from . import sweep
from .conditionals import PriorStart, choose_conditional, followed_sites
from .global_laplace import laplace_start
from .hierarchical import local_sites
from .latents import latent_guide, latent_values
from .options import GuideOptions, resolve
from .population_start import population_start
from .site import PathSite, enter_plates


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
    sites (:func:`~pyro_nsde.posterior.laplace.laplace`: the most probable path and the Gauss–Markov
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
        :class:`~pyro_nsde.posterior.girsanov.GirsanovEulerMaruyama`.
    :param int subsample_steps: the number of steps per path of the model's
        :func:`~pyro_nsde.subsample_steps` this guide is trained against (``None``: the
        plain model). The ``"girsanov"`` estimator is then replaced: its gradient surrogate
        evaluates the prior's drift on every step, which is what the subsampled model saves.
        With ``control="linear"`` by ``"stl"`` (the drift cancels from the Gauss–Markov
        chain's density where the noise reaches every direction; its gradients are as quiet),
        with network controls by ``"plain"``; a control with a ``posterior_drift`` method
        (:class:`~pyro_nsde.zoo.nn.PosteriorDriftControl`) is then simulated with that drift
        itself, without the prior's (``drift_free``).
    :param int prior_starts: with the Laplace start of the other latent sites, search their
        marginal posterior's mode from this many draws of the prior as well as from the
        family's start, and keep the highest (``pyro-nsde fit`` uses 2: its linear models'
        marginal density is exact, and on some series one search stops in a mode of pure
        noise).
    :param str warp: ``"spline"``: with ``control="linear"``, the path is the Gauss–Markov
        chain mapped state by state through a learned monotone spline of each coordinate,
        shared by every step and series (:mod:`pyro_nsde.posterior.warped`): two-humped
        marginals wherever the spline is steep, still drawn without the prior's networks. It
        starts at the identity (the Gauss–Markov family); its density stays exact. Measured
        on a double well (``docs/neural_sdes.md`` §8): the best family on all steps with
        dense observations, not under :func:`~pyro_nsde.subsample_steps` (it warns), and not
        enough for sparse observations (use a
        :class:`~pyro_nsde.zoo.nn.PosteriorDriftControl` there). Uses the ``"stl"``
        estimator for ``"girsanov"``, which does not apply (the model scores the warped
        path); the coefficients start at the Laplace fit and move with its refreshes, but do
        not follow the parameters drawn with the path (``conditional=None``). ``None``
        (default): no warp.
    :param str covariance: ``"prior"`` (the pure Girsanov mean shift), ``"diagonal"`` or
        ``"full"`` (a learned increment covariance ``S_k``; see
        :mod:`pyro_nsde.posterior.controls`).
        With ``"full"`` the posterior of ``x_0`` is a full-rank normal (else diagonal), so
        that with an affine or linear control the exact posterior of a linear SDE is in the
        family.
    :param str gain: the per-step gains of ``control="linear"``: ``"full"`` (``d × d``) or
        ``"diagonal"`` (``d`` numbers a step and series, a scan of scalars: the cheap family
        for many long paths, with :func:`~pyro_nsde.subsample_steps` say; see
        :class:`~pyro_nsde.LinearControl`). Coefficient fits are projected onto it, so the
        exact posterior of a linear SDE whose coordinates interact is then not in the family.
    :param str latents: the family of the other latent sites, in unconstrained space:
        ``"normal"`` (mean field, :class:`~pyro.infer.autoguide.AutoNormal`),
        ``"multivariate"`` (full-rank correlations,
        :class:`~pyro.infer.autoguide.AutoMultivariateNormal`), ``"lowrank"``
        (:class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` with rank
        ``latent_rank``) or ``"hierarchical"`` (each series' own parameters, in the plate of
        its path, given the population's hyperparameters:
        :class:`~pyro_nsde.guide.hierarchical.AutoHierarchicalNormal`). Correlated families
        hold the strong dependence between rates and noise scales of an SDE; they need every
        latent site outside subsampled plates (the hierarchical one takes subsampled plates).
    :param int latent_rank: the rank of ``"lowrank"`` (default: Pyro's, about ``√n``).
    :param str conditional: how the coefficients of ``"affine"`` and ``"linear"`` controls
        (with Laplace initialization) follow the parameters ``θ`` drawn with the path:
        ``"kalman"`` (the default: for every draw of ``θ`` the Kalman
        smoother of the model linearized at the Laplace path gives the coefficients and
        ``q(x_0)``, differentiably in ``θ``; the control's parameters are learned corrections
        on top, zero at the start, so ``q(path | θ)`` is the exact conditional posterior of a
        linear-Gaussian model for every ``θ``; its recursions are parallel scans),
        ``"taylor"`` (coefficients affine in the centred unconstrained values of the latent
        sites the path follows, each series its own, slopes from central differences of the
        Laplace fit at refreshes, then learned; see
        :class:`~pyro_nsde.posterior.controls.PerStepCoefficients`), ``None`` (the
        coefficients start at the Laplace fit and do not depend on ``θ``), or ``"auto"``.
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
        :class:`~pyro_nsde.posterior.girsanov.GirsanovEulerMaruyama`).

    The encoder is called inside the ``pyro.plate`` contexts of the path sites, so with data
    subsampling (``pyro.plate(..., subsample_size=n)``) it can select the current minibatch
    with ``pyro.subsample(data, event_dim=...)`` and see only those series; a context for all
    series is also accepted and is indexed by the subsample.
    """

    def __init__(
        self,
        model,
        *,
        control="auto",
        encoder=None,
        init_scale: float = 0.1,
        estimator: str = "girsanov",
        covariance: str = "auto",
        gain: str = "full",
        latents: str = "auto",
        latent_rank: int | None = None,
        conditional: str | None = "auto",
        init_path: str = "laplace",
        init_latents: str | None = "auto",
        refresh_every: int | None = 10,
        init_loc_fn=init_to_median,
        hidden_dims=(64, 64),
        create_plates=None,
        checkpoint_every: int | None = None,
        compile_step: bool = False,
        subsample_steps: int | None = None,
        prior_starts: int = 0,
        warp: str | None = None,
    ):
        options = GuideOptions.from_arguments(locals())
        if encoder is not None and not callable(encoder):
            raise TypeError(f"encoder must be callable, but got {type(encoder).__name__}")
        self._raw_model = (model,)
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)
        self.options = options
        self._fixed_indices = None
        self.encoder = encoder
        self.init_loc_fn = init_loc_fn
        # A control given as a module is the guide's from the start (its parameters are in
        # guide.parameters() before the first call); the path site shares it later.
        self._control_spec = control

    @property
    def raw_model(self):
        """The model as given (``model`` is the base class's: wrapped in its initialization)."""
        return self._raw_model[0]

    @property
    def covariance(self) -> str:
        return self.options.covariance

    # ----------------------------------------------------------------------------- setup

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        paths, others = self._classify_sites()
        subsampled = any(is_subsampled(f) for f in self._prototype_frames.values())
        encoded = self.encoder is not None
        self.options = resolve(
            self.options,
            self.prototype_trace,
            paths,
            others,
            encoded=encoded,
            subsampled=subsampled,
        )
        self.latent_guide = None
        if others:
            local = local_sites(self.prototype_trace, paths, others)
            self.latent_guide = latent_guide(
                self.raw_model, paths, local, self.options, self.init_loc_fn
            )
        context = self._probe_encoder(args, kwargs, paths)
        self.controls = PyroModule()
        self.x0_locs = PyroModule()
        self.x0_scales = PyroModule()
        self.x0_heads = nn.ModuleDict()
        self.x0_slopes = PyroModule()  # ∂ E[x_0] / ∂ η where q(x_0) follows the parameters
        self.warps = PyroModule()
        self.sites = {}
        for name, ndims in paths.items():
            conditional = choose_conditional(
                self.options.control_for(name),
                self.options,
                subsampled=subsampled,
                encoded=encoded,
                followed=followed_sites(self.prototype_trace, name, others),
            )
            self.sites[name] = PathSite(self, name, ndims, context, conditional)
        self._calls = 0
        self.nesting = None
        if any(site.conditional.fits for site in self.sites.values()):
            # One more run of the model (it draws random numbers, so only where needed): the
            # plate nesting with the observed sites' plates included. A path drawn with
            # parameters drawn from the prior may diverge: then on the prototype's values.
            values = {
                name: site["value"].detach()
                for name, site in self.prototype_trace.iter_stochastic_nodes()
            }
            try:
                trace = poutine.block(poutine.trace(self.raw_model).get_trace)(*args, **kwargs)
            except ValueError:
                conditioned = poutine.condition(self.raw_model, data=values)
                trace = poutine.block(poutine.trace(conditioned).get_trace)(*args, **kwargs)
            self.nesting = plate_nesting(trace)
            with torch.no_grad(), outside_inference():
                if subsampled:
                    self.refresh_all(*args, **kwargs)
                else:
                    self._fit_paths(values, self._create_plates(*args, **kwargs), args, kwargs)
            for site in self.sites.values():
                if site.warped and getattr(site.conditional, "path", None) is not None:
                    site.warp.calibrate(site.conditional.path)  # the box over the fitted path
                if site.conditional.exact:  # q(x_0) is the smoother's: no corrections
                    for slot in site.initial.slots().values():
                        slot.unregister()
        if self.options.init_latents == "laplace" and self.latent_guide is not None:
            latent_values(self.latent_guide, args, kwargs, median=True)  # sets the family up
            if self.options.latents == "hierarchical":
                population_start(self, args, kwargs)
            else:
                laplace_start(self, args, kwargs, prior_starts=self.options.prior_starts)

    def _classify_sites(self):
        """``({path site: to_event dims}, [other latent sites])``, in model order."""
        paths, others = {}, []
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            prior, ndims = unwrap_path_distribution(site["fn"])
            if prior is not None:
                paths[name] = ndims
            elif site["fn"].support.is_discrete:
                raise NotImplementedError(
                    f"GirsanovGuide does not handle discrete latent site {name!r}; "
                    f"enumerate it out in the model"
                )
            else:
                others.append(name)
        if not paths:
            raise ValueError(
                "GirsanovGuide found no EulerMaruyama sample site in the model; use an "
                "AutoGuide such as AutoNormal for models without latent paths"
            )
        return paths, others

    def _probe_encoder(self, args, kwargs, paths):
        """The encoder's context on the prototype's data (``None`` without an encoder)."""
        if self.encoder is None:
            return None
        with torch.no_grad(), poutine.block():
            context = self._encode(self._create_plates(*args, **kwargs), args, kwargs, paths)
        message = "encoder must return a tensor of shape batch + (c,) or batch + (K+1, c), but "
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"{message}returned {type(context).__name__}")
        if context.dim() < 1:
            raise ValueError(f"{message}returned a scalar")
        return context

    def _encode(self, plates, args, kwargs, sites=None):
        """Call the encoder inside the path sites' plates (so ``pyro.subsample`` works)."""
        if self.encoder is None:
            return None
        nodes = [self.prototype_trace.nodes[name] for name in (sites or self.sites)]
        with enter_plates(nodes, plates):
            return self.encoder(*args, **kwargs)

    def _check_prototype(self, part_trace):
        """The latent family's prototype must show the sites as this guide's does (called by
        the family, an :class:`~pyro.infer.autoguide.AutoGuide` part, as in ``AutoGuideList``)."""
        for name, part_site in part_trace.nodes.items():
            if part_site["type"] != "sample":
                continue
            site = self.prototype_trace.nodes[name]
            if part_site["value"].shape != site["value"].shape:
                raise ValueError(
                    f"site {name!r} changed shape between traces of the model: "
                    f"{tuple(site['value'].shape)} vs {tuple(part_site['value'].shape)}"
                )

    # ----------------------------------------------------------------------------- Laplace

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
        if not self._fits_paths():
            return
        with outside_inference():  # nothing here belongs to the training step's trace
            self._refresh(args, kwargs)

    @torch.no_grad()
    def refresh_all(self, *args, **kwargs):
        """:meth:`refresh` for every series: with subsampled plates, a subsample at a time
        (:mod:`~pyro_nsde.guide.sweep`); otherwise the same as :meth:`refresh`."""
        if not self._fits_paths():
            return
        with outside_inference():
            for data in sweep.chunks(self._prototype_frames):
                with self.fixed_subsample(data):
                    self._refresh(args, kwargs)

    @contextmanager
    def fixed_subsample(self, indices: dict):
        """Within this context the guide's subsampled plates take the given indices
        (``{plate name: indices}``) instead of drawing them."""
        saved, self._fixed_indices = self._fixed_indices, indices
        try:
            yield
        finally:
            self._fixed_indices = saved

    def _create_plates(self, *args, **kwargs):
        if not self._fixed_indices:
            return super()._create_plates(*args, **kwargs)
        with poutine.condition(data=self._fixed_indices):
            return super()._create_plates(*args, **kwargs)

    def _refresh(self, args, kwargs):
        """:meth:`refresh` on the plates' subsample of this call."""
        plates = self._create_plates(*args, **kwargs)  # the latent family's too
        medians = latent_values(self.latent_guide, args, kwargs, median=True)
        values = sweep.take_values(medians, self.prototype_trace, plates)
        self._fit_paths({k: v.detach() for k, v in values.items()}, plates, args, kwargs)

    @torch.no_grad()
    def refresh_at(self, values: dict, args, kwargs):
        """Re-fit the Laplace approximation of each path (as :meth:`refresh`) at the given
        values of the other latent sites (values at full plate sizes are taken at the plates'
        subsample)."""
        if not self._fits_paths():
            return
        with outside_inference():
            plates = self._create_plates(*args, **kwargs)
            values = sweep.take_values(values, self.prototype_trace, plates)
            self._fit_paths(values, plates, args, kwargs)

    def _fits_paths(self) -> bool:
        """Whether any path site's conditional strategy fits a Laplace approximation."""
        return self.encoder is None and any(s.conditional.fits for s in self.sites.values())

    def _fit_paths(self, values, plates, args, kwargs):
        """Fit each path site's conditional strategy (in model order) at ``values``; a fitted
        path joins ``values`` for the sites after it. A first fit that is not finite leaves
        the site's guide at the prior."""
        for site in self.sites.values():
            if not site.conditional.fits:
                continue
            path = site.conditional.fit(self, site, values, plates, args, kwargs)
            if path is not None:
                values[site.name] = path
            elif site.conditional.path is None:
                site.conditional = PriorStart()

    # ----------------------------------------------------------------------------- running

    def prior(self, name, values, plates, *args, **kwargs) -> EulerMaruyama:
        """The model's distribution at path site ``name`` given upstream ``values``.

        Runs the model (blocked, conditioned on ``values`` and on the plates' subsamples) up to
        the site and returns its :class:`~pyro_nsde.EulerMaruyama`.
        """
        data = {**values, **sweep.indices(plates)}
        try:
            site = run_to_site(self.raw_model, name, data, args, kwargs)
        except Exception as error:
            # The guide's subsample indices may not fit the model's plates (data of another
            # size than the guide was built on): say so if that is the cause.
            try:
                site = run_to_site(self.raw_model, name, dict(values), args, kwargs)
            except Exception:
                raise error from None
            _check_plates(name, site, plates)
            raise
        _check_plates(name, site, plates)
        prior, _ = unwrap_path_distribution(site["fn"])
        return prior

    def forward(self, *args, **kwargs):
        """Sample every latent site; returns a dict ``{site name: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.options.refresh_every and torch.is_grad_enabled() and self.training:
            self._calls += 1
            if self._calls % self.options.refresh_every == 0:
                self.refresh(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)  # before the latent family's, which uses them
        values = latent_values(self.latent_guide, args, kwargs)
        return self.draw_paths(values, pyro.sample, args, kwargs, plates)

    def draw_paths(self, values: dict, draw, args, kwargs, plates=None) -> dict:
        """For each path site in turn, its posterior law given ``values`` (the other latent
        sites, and the paths drawn before it), and ``values[name] = draw(name, law)`` inside
        the site's plates; returns ``values`` (a new dict). ``draw`` is ``pyro.sample``, or
        e.g. a function returning the law's mean path. ``plates``: the guide's plates of this
        call, if made already."""
        if plates is None:
            plates = self._create_plates(*args, **kwargs)
        values = dict(values)
        context, encoded = None, False
        for name, site in self.sites.items():
            prior = self.prior(name, values, plates, *args, **kwargs)
            if not encoded:  # after the model's plates are checked against the guide's
                context, encoded = self._encode(plates, args, kwargs), True
            params, base = site.conditional.inputs(self, site, prior, values, plates, args, kwargs)
            with site.plates(plates):
                posterior = site.posterior(prior, context, plates, self.options, params, base)
                values[name] = draw(name, posterior)
        return values

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """Medians of the other latent sites, and for each path site the noise-free controlled
        path from the posterior mean of ``x_0`` (the posterior mean path for linear SDEs with
        an affine or linear control). Not available for models with subsampled plates."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if any(is_subsampled(f) for f in self._prototype_frames.values()):
            raise NotImplementedError("median() is not available with subsampled plates")
        plates = self._create_plates(*args, **kwargs)
        values = latent_values(self.latent_guide, args, kwargs, median=True)
        with poutine.block():
            return self.draw_paths(values, self.mean_path, args, kwargs, plates)

    def mean_path(self, name: str, posterior):
        """The noise-free path of path site ``name``'s posterior law from the mean of its
        ``x_0`` (the posterior mean path for linear SDEs with an affine or linear control)."""
        return (posterior.base_dist if self.sites[name].ndims else posterior).skeleton()

    # ----------------------------------------------------------------------------- state

    def get_extra_state(self):
        """What the guide keeps besides parameters and buffers, so that ``state_dict()`` (and a
        checkpoint) resumes training exactly: the Laplace reference paths, the values of the
        last fit its coefficients were rebased from, whether a site's per-draw law is exact,
        and the count of training calls."""
        if self.prototype_trace is None:
            return {}
        state = {"laplace_paths": {}, "laplace_bases": {}, "fit_centres": {}, "calls": self._calls}
        state["exact"] = {}
        for name, site in self.sites.items():
            saved = site.conditional.state()
            if saved.get("path") is not None:
                state["laplace_paths"][name] = saved["path"]
            if "exact" in saved:
                state["exact"][name] = saved["exact"]
            for attr, value in saved.get("bases", {}).items():
                state["laplace_bases"][(name, attr)] = value
            if saved.get("centre") is not None:
                state["fit_centres"][name] = saved["centre"]
        return state

    def set_extra_state(self, state):
        if not state:
            return
        if self.prototype_trace is None:
            raise ValueError("the guide must be set up (called once) before its state is loaded")
        for name, site in self.sites.items():
            bases = {a: v for (n, a), v in state["laplace_bases"].items() if n == name}
            saved = {
                "path": state["laplace_paths"].get(name),
                "bases": bases,
                "centre": state.get("fit_centres", {}).get(name),
            }
            if name in state.get("exact", {}):  # absent from checkpoints before the check
                saved["exact"] = state["exact"][name]
            site.conditional.load_state(saved)
        self._calls = int(state["calls"])


def _check_plates(name, site, plates):
    """The model's plates at path site ``name`` must be the ones the guide was built with."""
    for frame in site["cond_indep_stack"]:
        if frame.name not in plates:
            continue
        expected = plates[frame.name].size  # the full size of the guide's plate
        full = full_size(frame)
        if expected != full:
            raise ValueError(
                f"plate {frame.name!r} of path site {name!r} has size {full} on this call, "
                f"but the guide's plate has size {expected}: without create_plates, the "
                f"guide's plates follow its first call. Give the guide plates that follow the "
                f"data, e.g. GirsanovGuide(model, ..., create_plates=lambda data, *rest: "
                f"pyro.plate({frame.name!r}, len(data), dim={frame.dim}))"
            )


__all__ = ["GirsanovGuide"]
