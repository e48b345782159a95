"""The Girsanov posterior path law: the prior's Euler–Maruyama chain with controlled noise."""

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import Distribution

from ..sde import records
from ..sde.checks import check_bool, check_choice, check_expand, check_positive_int
from ..sde.euler_maruyama import EulerMaruyama, draw_init, simulate
from ..sde.noise import step_log_density
from .controls import (
    CallableControl,
    PerStepCoefficients,
    StepCoefficients,
    context_has_steps,
)

ESTIMATORS = ("girsanov", "plain", "stl")


class GirsanovEulerMaruyama(TorchDistribution):
    r"""The law of a path of the prior's Euler–Maruyama chain whose Wiener increments are
    shifted (and optionally rescaled) by a control:

        ``x_0 ~ init``,
        ``x_{k+1} = x_k + h_k f(t_k, x_k) + G(t_k, x_k) ΔW_k``,
        ``ΔW_k ~ N(h_k u_k, h_k S_k S_kᵀ)``,  ``(u_k, S_k) = control(t_k, x_k, context_k)``.

    With ``S = I`` this is the Euler–Maruyama chain of the SDE with drift ``f + G u`` (Tzen &
    Raginsky's variational posterior). It has the prior's grid, diffusion, support and
    reference measure, so ``log q - log p`` is exact; per step

        ``E[log q - log p | x_k] = ½[tr(S Sᵀ) + h |u|² - m - log det(S Sᵀ)]``

    (``½ h |u|²`` for ``S = I``), restricted to the row space of ``G`` when it is
    rank-deficient. ``event_shape`` is the prior's ``(K+1, d)``; ``batch_shape`` broadcasts the
    prior's with those of ``init``, ``context`` and per-series control coefficients.

    :param EulerMaruyama prior: the prior path law.
    :param control: a callable ``u(t, x, context)`` returning ``u`` ``(..., m)`` or ``(u, S)``
        (e.g. :class:`~pyro_nsde.ControlNet`), an :class:`~pyro_nsde.AffineControl` (or another
        :class:`~pyro_nsde.posterior.controls.PerStepCoefficients` module, called with ``context``
        and
        ``params``), or the :class:`~pyro_nsde.posterior.controls.StepCoefficients` such a module
        returns.
    :param init: the law of ``x_0`` under the posterior (default: the prior's ``init``).
    :param context: ``batch + (c,)`` (static) or ``batch + (K+1, c)`` (per step), passed to
        the control; ``context[..., k, :]`` goes with step ``k``.
    :param str estimator: how :meth:`log_prob` of a path this distribution sampled enters a
        gradient. All three leave the value exact and the ELBO gradient unbiased:
        ``"plain"``: the exact log density (pathwise gradient of ``log q``);
        ``"girsanov"``: the zero-mean terms of ``log p - log q`` (the martingale
        ``-Σ sqrt(h) u·Sξ`` and the centred quadratic forms of ``ξ``) are dropped from the
        gradient, leaving ``-Σ KL_k``; meant for ``Trace_ELBO``, where the model scores the
        same path;
        ``"stl"``: "sticking the landing": the score ``∂ log q / ∂ params`` at fixed path is
        dropped (costs one extra vectorized evaluation).
    :param bool context_per_step: whether ``context`` has a step axis (default: inferred:
        it does when it has more dims than ``batch + (c,)`` and ``context.shape[-2] == K+1``).
    :param str covariance: the kind of ``S`` a callable control returns (default: its
        ``covariance`` attribute, else ``"prior"``).
    :param int checkpoint_every: trade compute for memory on long paths: simulate in blocks of
        this many steps under gradient checkpointing (see :func:`~pyro_nsde.sde.euler_maruyama.
        simulate`).
    :param torch.Tensor params: centred unconstrained parameters ``η - η̄`` that the
        coefficients of a :class:`~pyro_nsde.posterior.controls.PerStepCoefficients` control depend
        on.
    :param bool drift_free: for a control with a ``posterior_drift`` method (e.g.
        :class:`~pyro_nsde.zoo.nn.PosteriorDriftControl`), simulate with the posterior drift
        ``v`` itself, ``x_{k+1} = x_k + h_k v_k + G_k S_k sqrt(h_k) ξ_k``, without evaluating the
        prior's drift (the same chain: ``f + G G⁻¹ (v - f) = v``); the Girsanov terms of the
        record then evaluate it on all steps in one call, if asked for. What a model under
        :func:`~pyro_nsde.subsample_steps` needs, with the ``"plain"`` estimator.
    :param bool compile_step: simulate with the Euler–Maruyama step compiled by
        :func:`torch.compile` (one fused graph for drift, diffusion, control and update; falls
        back to eager execution where compilation fails). Pays on long training runs only: the
        first call compiles for seconds to tens of seconds.

    **References:**

    [1] Belinda Tzen, Maxim Raginsky (2019), "Neural Stochastic Differential Equations: Deep
        Latent Gaussian Models in the Diffusion Limit", arXiv:1905.09883.
    [2] Xuechen Li, Ting-Kam Leonard Wong, Ricky T. Q. Chen, David Duvenaud (2020), "Scalable
        Gradients for Stochastic Differential Equations", AISTATS.
    [3] Geoffrey Roeder, Yuhuai Wu, David Duvenaud (2017), "Sticking the Landing: Simple,
        Lower-Variance Gradient Estimators for Variational Inference", NeurIPS.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        prior: EulerMaruyama,
        control,
        *,
        init=None,
        context=None,
        estimator: str = "plain",
        context_per_step: bool | None = None,
        covariance: str | None = None,
        checkpoint_every: int | None = None,
        compile_step: bool = False,
        params: torch.Tensor | None = None,
        drift_free: bool = False,
        validate_args=None,
    ):
        if not isinstance(prior, EulerMaruyama):
            raise TypeError(f"prior must be an EulerMaruyama, but got {type(prior).__name__}")
        check_choice("estimator", estimator, ESTIMATORS)
        check_positive_int("checkpoint_every", checkpoint_every, optional=True)
        self.prior = prior
        self.estimator = estimator
        self.checkpoint_every = checkpoint_every
        self.compile_step = check_bool("compile_step", compile_step)
        d, num_steps = prior.state_dim, prior.num_steps
        init = prior.init if init is None else init
        if isinstance(init, Distribution):
            if init.event_shape != (d,):
                raise ValueError(
                    f"init must have event_shape ({d},), but got {tuple(init.event_shape)}"
                )
            init_batch = init.batch_shape
        elif isinstance(init, torch.Tensor) and init.dim() >= 1 and init.shape[-1] == d:
            init_batch = init.shape[:-1]
        else:
            raise ValueError(f"init must be a distribution or a tensor of shape (..., {d})")
        self.init = init
        batch = torch.broadcast_shapes(prior.batch_shape, init_batch)
        if isinstance(control, PerStepCoefficients):
            control = control(context, params)
        elif params is not None:
            raise ValueError("params are only used by per-step coefficient controls")
        if isinstance(control, StepCoefficients):
            self.control = control.bind(prior)
            batch = torch.broadcast_shapes(batch, control.batch_shape)
        elif callable(control):
            if context is not None:
                if not isinstance(context, torch.Tensor) or context.dim() < 1:
                    raise ValueError("context must be a tensor of shape batch + (c,)")
                if context_per_step is None:
                    context_per_step = context_has_steps(context, len(prior.batch_shape), num_steps)
                if context_per_step and not context_has_steps(context, 0, num_steps):
                    raise ValueError(
                        f"a per-step context must have shape batch + ({num_steps + 1}, c), "
                        f"but got {tuple(context.shape)}"
                    )
                batch = torch.broadcast_shapes(
                    batch, context.shape[: -2 if context_per_step else -1]
                )
            self.control = CallableControl(
                control, context, bool(context_per_step), covariance, drift_free
            )
        else:
            raise TypeError(f"control must be callable, but got {type(control).__name__}")
        super().__init__(batch, prior.event_shape, validate_args=validate_args)

    @property
    def covariance(self) -> str:
        return self.control.covariance

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GirsanovEulerMaruyama, _instance)
        batch_shape = torch.Size(batch_shape)
        check_expand(self.batch_shape, batch_shape)
        new.__dict__.update(self.__dict__)
        super(GirsanovEulerMaruyama, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def _simulate(self, x0, eps):
        path, steps = simulate(
            self.prior,
            x0,
            eps,
            control=self.control,
            checkpoint_every=self.checkpoint_every,
            compile_step=self.compile_step,
        )
        record = records.PathRecord(path, self.prior.law_key(), steps, self)
        records.attach(path, record)
        return path

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)[:-2]
        x0 = draw_init(self.init, shape, self.prior.state_dim)
        eps = x0.new_empty((self.prior.num_steps,) + shape + (self.prior.noise_dim,)).normal_()
        return self._simulate(x0, eps)

    def skeleton(self, sample_shape=torch.Size()) -> torch.Tensor:
        """The noise-free controlled path from the mean of ``init`` (``ξ = 0``).

        For a linear SDE with an affine control the posterior is Gaussian and this is its
        mean path; in general it is a typical path, not the mean.
        """
        shape = self._extended_shape(sample_shape)[:-2]
        init = self.init.mean if isinstance(self.init, Distribution) else self.init
        x0 = init.expand(shape + (self.prior.state_dim,))
        eps = x0.new_zeros((self.prior.num_steps,) + shape + (self.prior.noise_dim,))
        return self._simulate(x0, eps)

    def _init_log_prob(self, value):
        if isinstance(self.init, Distribution):
            return self.init.log_prob(value[..., 0, :])
        return 0.0

    def _exact_log_prob(self, value, drift=None):
        res = self.prior.residuals(value, self.batch_shape, drift)
        u, scale = self.control.at_all_steps(
            res.t, res.h.unsqueeze(-1), res.x, (res.f, res.factor.g)
        )
        shift, scale, covariance = res.factor.to_whitened(u, scale, self.covariance)
        lq = step_log_density(res.z, res.h, shift, scale, covariance) - res.factor.log_volume
        return self._init_log_prob(value) + lq.sum(0)

    def log_density(self, value: torch.Tensor) -> torch.Tensor:
        """The exact log density of ``value``, with its exact gradient (:meth:`log_prob`
        without the gradient estimator's surrogate terms); reuses what simulating ``value``
        computed when this law drew it."""
        shape = torch.broadcast_shapes(value.shape[:-2], self.batch_shape)
        record = records.find(value)
        if record is None or record.owner is not self:
            return self._exact_log_prob(value).expand(shape)
        return (self._init_log_prob(value) + record.steps.posterior_log_prob()).expand(shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape[:-2], self.batch_shape)
        record = records.find(value)
        if record is None or record.owner is not self:
            return self._exact_log_prob(value).expand(shape)
        steps = record.steps
        lq = self.log_density(value)
        if torch.is_grad_enabled():
            if self.estimator == "girsanov":
                # log p - log q = -Σ KL_k + (zero-mean terms); drop their gradient.
                zero_mean = steps.prior_log_prob() - steps.posterior_log_prob() + steps.kl()
                lq = lq + (zero_mean - zero_mean.detach())
            elif self.estimator == "stl":
                lq = lq.detach() + self._path_gradient_surrogate(value)
        return lq

    def _path_gradient_surrogate(self, value):
        """Zero-valued term whose gradient is ``∇_x log q(x) · ∂x/∂params``."""
        return path_gradient_surrogate(self._exact_log_prob, value)


def path_gradient_surrogate(log_density, value: torch.Tensor) -> torch.Tensor:
    """A zero-valued term whose gradient is ``∇_x log q(x) · ∂x/∂params`` (the score at the
    path held fixed; "sticking the landing"), for the exact ``log_density`` of ``q``."""
    point = value.detach().requires_grad_()
    with torch.enable_grad():
        (score,) = torch.autograd.grad(log_density(point).sum(), point)
    surrogate = (score * value).sum((-1, -2))
    return surrogate - surrogate.detach()
