"""Controls ``u`` of the Girsanov posterior, and the covariance factors ``S`` that come with them.

A control shifts and (optionally) rescales each Wiener increment of the prior:

    ``ΔW_k ~ N(h_k u_k, h_k S_k S_kᵀ)``,   ``u_k = u(t_k, x_k, context)``,

so the posterior drift is ``f + G u``. ``S`` lives in noise space (``m × m``), so the law stays
on the prior's support also for rank-deficient ``G``. ``covariance`` says what ``S`` is:
``"prior"`` (``S = I``: the pure mean shift of Tzen & Raginsky), ``"diagonal"`` (a positive
``(..., m)`` vector) or ``"full"`` (a lower-triangular ``(..., m, m)`` with positive diagonal).

A callable control that needs the prior's drift and diffusion at ``(t, x)`` (such as
:class:`~pyro_nsde.zoo.nn.PosteriorDriftControl`, ``u = G⁻¹(v - f)``) sets ``uses_prior = True``;
it is then called as ``control(t, x, context, prior=(f, G))`` with the values the simulator
(or the vectorized density) has already computed for the step, so nothing is evaluated twice.

Two controls ship here: :class:`ControlNet`, a network ``u(t, x, context)``, and
:class:`AffineControl`, a learned ``u_k(x) = (a_k + B_k x) / sqrt(h_k)`` per step, which is
exact in form for linear SDEs.
"""

import itertools
import math

import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn

from ..sde.checks import check_choice
from ..sde.grid import time_first
from .constraints import inverse_softplus, scaled

COVARIANCES = ("prior", "diagonal", "full")
#: The forms of the per-step gains ``B_k`` of :class:`PerStepCoefficients`.
GAINS = ("full", "diagonal")
MIN_SCALE = 1e-4
"""The smallest scale a network head produces (``S`` entries, the guide's ``x_0`` scale from a
context): ``MIN_SCALE + softplus(·)``. A softplus alone underflows to exactly ``0`` in float32
for inputs below about ``-104``, and a zero scale is an infinite log-density; this happens
in practice when KL annealing (a small ``β`` in front of ``log q``) lets the scales collapse
early in training."""


_SOFTPLUS_ONE = inverse_softplus(1 - MIN_SCALE)  # positive_scale(0) == 1


def positive_scale(raw: torch.Tensor) -> torch.Tensor:
    """``MIN_SCALE + softplus(raw + c)``, equal to ``1`` at ``raw = 0``."""
    return MIN_SCALE + nn.functional.softplus(raw + _SOFTPLUS_ONE)


def context_has_steps(context: torch.Tensor, batch_ndim: int, num_steps: int) -> bool:
    """Whether an encoder's ``context`` is per step, ``batch + (K+1, c)``, rather than static,
    ``batch + (c,)``: it has a dim beyond ``batch_ndim`` batch dims and the event, and the
    second-to-last dim has size ``K + 1``."""
    return context.dim() >= batch_ndim + 2 and context.shape[-2] == num_steps + 1


def check_covariance(covariance: str) -> str:
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, but got {covariance!r}")
    return covariance


class _TrilFromRaw(nn.Module):
    """Lower-triangular ``(..., m, m)`` with positive diagonal from ``m(m+1)/2`` numbers
    (diagonal through :func:`positive_scale`, starting at 1 for zero input)."""

    def __init__(self, m: int):
        super().__init__()
        self.m = m
        rows, cols = torch.tril_indices(m, m)
        self.register_buffer("flat_index", rows * m + cols, persistent=False)
        self.register_buffer("is_diagonal", rows == cols, persistent=False)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        values = torch.where(self.is_diagonal, positive_scale(raw), raw)
        flat = raw.new_zeros(raw.shape[:-1] + (self.m * self.m,))
        return flat.index_copy(-1, self.flat_index, values).unflatten(-1, (self.m, self.m))


class ControlNet(nn.Module):
    """A multilayer perceptron control ``u(t, x, context)``.

        ``u = W_L σ(... σ(W_x x + w_t t + W_c c + b))``

    The last layer starts at zero, so ``u = 0`` (and ``S = I``): the guide starts at the prior.

    :param int state_dim: ``d``.
    :param int noise_dim: ``m`` (defaults to ``d``).
    :param int context_dim: ``c``, the size of the encoder's context (0 for none).
    :param tuple hidden_dims: widths of the hidden layers.
    :param str covariance: ``"prior"`` returns ``u`` ``(..., m)``; ``"diagonal"`` returns
        ``(u, S)`` with ``S`` ``(..., m)`` positive; ``"full"`` returns ``(u, S)`` with ``S``
        ``(..., m, m)`` lower-triangular. ``S`` starts at ``I``; its diagonal entries are at
        least :data:`MIN_SCALE`.
    :param activation: the nonlinearity class (default :class:`torch.nn.SiLU`).
    """

    def __init__(
        self,
        state_dim: int,
        noise_dim: int | None = None,
        context_dim: int = 0,
        hidden_dims=(64, 64),
        covariance: str = "prior",
        activation=nn.SiLU,
    ):
        super().__init__()
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one hidden layer")
        self.state_dim = state_dim
        self.noise_dim = state_dim if noise_dim is None else noise_dim
        self.context_dim = context_dim
        self.covariance = check_covariance(covariance)
        width = hidden_dims[0]
        self.input_x = nn.Linear(state_dim, width)
        self.input_t = nn.Linear(1, width, bias=False)
        self.input_c = nn.Linear(context_dim, width, bias=False) if context_dim else None
        layers = []
        for w_in, w_out in itertools.pairwise(hidden_dims):
            layers += [activation(), nn.Linear(w_in, w_out)]
        layers.append(activation())
        self.body = nn.Sequential(*layers)
        m = self.noise_dim
        num_scale = {"prior": 0, "diagonal": m, "full": m * (m + 1) // 2}[covariance]
        self.head = nn.Linear(hidden_dims[-1], m + num_scale)
        self.tril = _TrilFromRaw(m) if covariance == "full" else None
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, t: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None = None):
        hidden = self.input_x(x) + self.input_t(t)
        if self.input_c is not None:
            if context is None:
                raise ValueError(f"ControlNet(context_dim={self.context_dim}) needs a context")
            hidden = hidden + self.input_c(context)
        out = self.head(self.body(hidden))
        m = self.noise_dim
        u = out[..., :m]
        if self.covariance == "prior":
            return u
        if self.covariance == "diagonal":
            return u, positive_scale(out[..., m:])
        return u, self.tril(out[..., m:])


def affine_shift(t, h, x, prior, loc, gain, scale=None):
    """``(u, S)`` of one step of an affine control: ``u = (a + B x) / sqrt(h)``."""
    v = loc + (gain @ x.unsqueeze(-1)).squeeze(-1)
    return v / h.sqrt(), scale


class StepCoefficients:
    """Per-step coefficients of a control for one call, held step-major (``(K, *batch, ·)``),
    with the per-step protocol of the simulator:
    ``shift(t_k, h_k, x_k, prior, *step_inputs(k)) -> (u_k, S_k)``, and
    ``at_all_steps(t, h, x, prior) -> (u, S)`` for all steps at once (``x`` ``(K, ..., d)``).

    :param loc: ``(*batch, K, p)``.
    :param gain: ``(*batch, K, p, d)``, or ``(*batch, K, d)`` for a diagonal ``B_k``
        (``p = d``).
    :param scale: ``None``, ``(*batch, K, s)`` (``"diagonal"``) or ``(*batch, K, s, s)``
        lower-triangular (``"full"``).
    :param str covariance: the kind of ``scale``.
    :param bool diagonal_gain: whether ``gain`` holds the diagonals of the ``B_k``.
    """

    def __init__(self, loc, gain, scale, covariance, diagonal_gain=False):
        self.covariance = covariance
        self.diagonal_gain = diagonal_gain
        gain_dims = 2 if diagonal_gain else 3
        self.batch_shape = torch.broadcast_shapes(loc.shape[:-2], gain.shape[:-gain_dims])
        if scale is not None:
            extra = 3 if covariance == "full" else 2
            self.batch_shape = torch.broadcast_shapes(self.batch_shape, scale.shape[:-extra])
        self.loc = loc.movedim(-2, 0)
        self.gain = gain.movedim(-gain_dims, 0)
        self.scale = None if scale is None else scale.movedim(-3 if covariance == "full" else -2, 0)
        # Split into steps once: indexing ``[k]`` at every step would make the backward pass
        # fill a zero tensor of all K steps for each step, O(K²) time.
        self._locs, self._gains = self.loc.unbind(0), self.gain.unbind(0)
        self._scales = None if scale is None else self.scale.unbind(0)

    @property
    def num_steps(self) -> int:
        return self.loc.shape[0]

    def bind(self, prior) -> "StepCoefficients":
        """Check the coefficients against the prior path law they control."""
        if self.num_steps != prior.num_steps or self.gain.shape[-1] != prior.state_dim:
            raise ValueError(
                f"{type(self).__name__} must have num_steps={prior.num_steps} and state_dim="
                f"{prior.state_dim}, but has num_steps={self.num_steps}, "
                f"state_dim={self.gain.shape[-1]}"
            )
        return self

    def step_inputs(self, k: int) -> tuple:
        """The coefficients of step ``k``: ``(a_k, B_k)`` or ``(a_k, B_k, S_k)``."""
        if self._scales is None:
            return self._locs[k], self._gains[k]
        return self._locs[k], self._gains[k], self._scales[k]

    def aligned(self, n: int):
        """``(a, B, S)`` with singleton dims after the step axis, for states of ``n`` dims."""
        loc = time_first(self.loc, n)
        gain = time_first(self.gain, n + (not self.diagonal_gain))
        if self.scale is None:
            return loc, gain, None
        return loc, gain, time_first(self.scale, n + (self.covariance == "full"))


class AffineCoefficients(StepCoefficients):
    """The coefficients of an :class:`AffineControl` for one call (subsampled under plates):
    ``u_k(x) = (a_k + B_k x) / sqrt(h_k)``, ``S_k`` as the covariance says; ``a`` ``(K,
    *batch, m)``, ``B`` ``(K, *batch, m, d)`` step-major."""

    shift = staticmethod(affine_shift)

    def at_all_steps(self, t, h, x, prior=None):
        """All steps at once: ``x`` ``(K, ..., d)``, ``h`` ``(K, ..., 1)``."""
        loc, gain, scale = self.aligned(x.dim())
        v = loc + (gain @ x.unsqueeze(-1)).squeeze(-1)
        return v / h.sqrt(), scale


class PerStepCoefficients(PyroModule):
    r"""Learned coefficients ``a_k`` ``(p,)``, ``B_k`` ``(p, d)`` and a step scale ``S_k`` for
    each step ``k`` of a grid, optionally affine in a context and in parameters:

        ``a_k = a⁰_k + Wᵃ c_k + Vᵃ_k (η - η̄)``,   ``B_k`` likewise,
        ``S_k = diag(exp(wˢ c_k + Vˢ_k (η - η̄))) S⁰_k``,

    where ``c_k`` is an encoder's context (per step, or static) and ``η - η̄`` the centred
    unconstrained values of the model's other latent variables (so that a path's posterior
    follows the parameters drawn with it). The context and parameter weights start at zero.
    Subclasses turn the result into the :class:`StepCoefficients` of their control.

    :param int num_steps: ``K``.
    :param int state_dim: ``d``.
    :param int noise_dim: ``m`` (defaults to ``d``).
    :param tuple batch_shape: one set of coefficients per batch element (series).
    :param str covariance: ``"prior"`` (no ``S``), ``"diagonal"`` or ``"full"`` (``S⁰``
        starts at ``I``).
    :param int context_dim: ``c`` (0: no context).
    :param int param_dim: the length of ``η`` (0: no parameters).
    :param float step_scale: optimizer steps on ``a⁰``, ``B⁰`` and ``S⁰`` are this many times
        as large in their own units as on an unconstrained parameter (a smaller value
        preconditions coefficients that start near their optimum, e.g. from a Kalman
        smoother, against the noise of stochastic gradients).
    :param int rows: ``p`` (default ``m``: a noise-space control).
    :param int scale_dim: ``s``, the size of ``S_k`` (default ``m``).
    :param str gain: ``"full"`` (``B_k`` ``p × d``) or ``"diagonal"`` (``B_k`` diagonal,
        ``p = d``: ``d`` numbers a step instead of ``d²``).
    """

    def __init__(
        self,
        num_steps: int,
        state_dim: int,
        noise_dim: int | None = None,
        batch_shape=(),
        covariance: str = "prior",
        context_dim: int = 0,
        param_dim: int = 0,
        step_scale: float = 1.0,
        *,
        rows: int | None = None,
        scale_dim: int | None = None,
        gain: str = "full",
    ):
        super().__init__()
        m = state_dim if noise_dim is None else noise_dim
        self.num_steps, self.state_dim, self.noise_dim = num_steps, state_dim, m
        self.covariance = check_covariance(covariance)
        self.context_dim, self.param_dim = context_dim, param_dim
        batch_shape = torch.Size(batch_shape)
        p = m if rows is None else rows
        s = m if scale_dim is None else scale_dim
        self._rows = p
        self.diagonal_gain = check_choice("gain", gain, GAINS) == "diagonal"
        if self.diagonal_gain and p != state_dim:
            raise ValueError(f"gain='diagonal' needs {p} rows = state_dim {state_dim}")
        real = scaled(constraints.real, step_scale)
        self.loc = PyroParam(torch.zeros(batch_shape + (num_steps, p)), real, event_dim=2)
        gain_shape = (p,) if self.diagonal_gain else (p, state_dim)
        self.gain = PyroParam(
            torch.zeros(batch_shape + (num_steps, *gain_shape)),
            real,
            event_dim=1 + len(gain_shape),
        )
        self._gain_shape, self._gain_width = gain_shape, math.prod(gain_shape)
        if covariance == "diagonal":
            self.scale = PyroParam(
                torch.ones(batch_shape + (num_steps, s)),
                scaled(constraints.positive, step_scale),
                event_dim=2,
            )
        elif covariance == "full":
            self.scale = PyroParam(
                torch.eye(s).expand(batch_shape + (num_steps, s, s)).clone(),
                scaled(constraints.lower_cholesky, step_scale),
                event_dim=3,
            )
        self._width = p + self._gain_width + (0 if covariance == "prior" else s)
        self.context_head = None
        if context_dim:
            self.context_head = nn.Linear(context_dim, self._width)
            nn.init.zeros_(self.context_head.weight)
            nn.init.zeros_(self.context_head.bias)
        if param_dim:
            self.param_weight = PyroParam(
                torch.zeros(batch_shape + (num_steps, self._width, param_dim)), event_dim=4
            )

    def conditioned(self, context=None, params=None, base=None, per_step=None, corrected=True):
        """``(a, B, S)`` given the context and centred parameters; with ``base`` (a dict of
        ``loc``, ``gain`` and ``scale`` laid out like the parameters, e.g. a Kalman smoother's
        coefficients for the parameters drawn) the parameters are corrections to it:
        ``a = a_base + a⁰``, ``B = B_base + B⁰``, ``S = S_base S⁰``; with ``corrected=False``
        the base is taken as it is (an exact one: ``a⁰``, ``B⁰``, ``S⁰`` are not used, and so
        not learned).

        :param context: ``(*batch, K+1, c)`` per step, or ``(*batch, c)`` static.
        :param params: ``η - η̄`` shaped ``(*sample, *(1,) * len(batch), param_dim)``.
        :param bool per_step: whether ``context`` is per step (default: read off its shape by
            :func:`context_has_steps`).
        :returns: ``a`` ``(*batch, K, p)``, ``B`` ``(*batch, K, p, d)``, ``S`` as the
            covariance says (or ``None``).
        """
        learned = self.covariance != "prior"
        if base is None:
            loc, gain = self.loc, self.gain
            scale = self.scale if learned else None
        elif not corrected:  # an exact base, taken as it is
            loc, gain = base["loc"], base["gain"]
            scale = base["scale"] if learned else None
        else:
            loc, gain = base["loc"] + self.loc, base["gain"] + self.gain
            scale = None
            if learned:
                full = self.covariance == "full"
                scale = base["scale"] @ self.scale if full else base["scale"] * self.scale
        delta = None
        if self.context_head is not None:
            if context is None:
                raise ValueError(
                    f"{type(self).__name__}(context_dim={self.context_dim}) needs a context"
                )
            if per_step is None:
                per_step = context_has_steps(context, 0, self.num_steps)
            if per_step:
                delta = self.context_head(context[..., : self.num_steps, :])
            else:
                delta = self.context_head(context).unsqueeze(-2)
        if self.param_dim:
            if params is None:
                raise ValueError(
                    f"{type(self).__name__}(param_dim={self.param_dim}) needs parameters"
                )
            shift = (self.param_weight @ params[..., None, :, None]).squeeze(-1)
            delta = shift if delta is None else delta + shift
        if delta is None:
            return loc, gain, scale
        p, width = self._rows, self._gain_width
        loc = loc + delta[..., :p]
        gain = gain + delta[..., p : p + width].unflatten(-1, self._gain_shape)
        if scale is not None:
            factor = delta[..., p + width :].exp()
            scale = scale * (factor if self.covariance == "diagonal" else factor.unsqueeze(-1))
        return loc, gain, scale


class AffineControl(PerStepCoefficients):
    """A learned affine feedback control for each step of the grid:

        ``u_k(x) = (a_k + B_k x) / sqrt(h_k)``

    The ``1 / sqrt(h_k)`` makes ``a_k + B_k x`` the shift of the *standardized* increment
    ``ΔW_k / sqrt(h_k)``, whose size is O(1) whatever the step; the per-step KL is
    ``½ |a_k + B_k x|²``. The optimal gains near a precise observation grow like ``1/h``, so in
    these units they grow like ``1/sqrt(h)`` and Adam at ordinary learning rates reaches them.
    Exact in form for linear SDEs (whose posterior is Gaussian with affine feedback).

    Calling the module returns its :class:`AffineCoefficients` (inside ``pyro.plate``
    contexts the per-series coefficients are subsampled like any ``PyroParam``). The
    coefficients may depend on a context and on the model's parameters (see
    :class:`PerStepCoefficients`).

    :param int num_steps: ``K``.
    :param int state_dim: ``d``.
    :param int noise_dim: ``m`` (defaults to ``d``).
    :param tuple batch_shape: one control per batch element (e.g. per series in a plate).
    :param str covariance: ``"prior"``, ``"diagonal"`` or ``"full"`` (``S_k`` starts at ``I``).
    :param int context_dim: size of a context the coefficients depend on (0: none).
    :param int param_dim: length of the parameter vector they depend on (0: none).
    :param float step_scale: see :class:`PerStepCoefficients`.
    """

    def __init__(self, *args, **kwargs):
        if kwargs.get("gain", "full") != "full":
            raise ValueError("AffineControl's gains are full; gain='diagonal' is LinearControl's")
        super().__init__(*args, **kwargs)

    def forward(
        self, context=None, params=None, base=None, per_step=None, corrected=True
    ) -> AffineCoefficients:
        return AffineCoefficients(
            *self.conditioned(context, params, base, per_step, corrected), self.covariance
        )


def callable_shift(t, h, x, prior, control, covariance, uses_prior, context):
    """``(u, S)`` of a callable control at ``(t, x)`` (``S = None`` for ``"prior"``)."""
    out = control(t, x, context, prior=prior) if uses_prior else control(t, x, context)
    if covariance == "prior":
        if isinstance(out, tuple):
            raise ValueError(
                "control returned (u, S) but covariance='prior'; pass covariance="
                "'diagonal' or 'full' to use S"
            )
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            f"control must return (u, S) for covariance={covariance!r}, "
            f"but returned {type(out).__name__}"
        )
    return out


class CallableControl:
    """Adapts a callable control ``u(t, x, context)`` to the per-step protocol of the simulator:
    ``shift(t_k, h_k, x_k, prior, *step_inputs(k)) -> (u_k, S_k)``.

    :param control: returns ``u`` ``(..., m)``, or ``(u, S)``.
    :param context: ``None``, static ``batch + (c,)`` or per step ``batch + (K+1, c)``.
    :param bool per_step: whether ``context`` has a step axis.
    :param str covariance: the kind of ``S``; ``None`` reads ``control.covariance``
        (default ``"prior"``).

    A control with ``uses_prior = True`` also receives ``prior=(f, G)``, the prior's drift
    and diffusion values at ``(t, x)``.

    ``drift_free=True`` (taken where the control has a ``posterior_drift(t, x, context) -> (v,
    S)`` method, e.g. :class:`~pyro_nsde.zoo.nn.PosteriorDriftControl`) makes the simulator
    step with the posterior drift ``v`` itself and never evaluate the prior's drift
    (:func:`~pyro_nsde.sde.euler_maruyama.drift_free_step`).
    """

    def __init__(self, control, context=None, per_step=False, covariance=None, drift_free=False):
        self.control = control
        self.context = context
        self.per_step = per_step
        self.drift_free = bool(drift_free) and hasattr(control, "posterior_drift")
        self.uses_prior = bool(getattr(control, "uses_prior", False))
        if covariance is None:
            covariance = getattr(control, "covariance", "prior")
        self.covariance = check_covariance(covariance)
        if per_step:
            self._steps = context[..., :-1, :].movedim(-2, 0)
            # Split once (see AffineCoefficients): per-step indexing costs O(K²) backward.
            self._step_contexts = self._steps.unbind(0)

    shift = staticmethod(callable_shift)

    def step_inputs(self, k: int) -> tuple:
        """What :func:`callable_shift` needs besides ``(t, h, x, prior)`` at step ``k``."""
        context = self._step_contexts[k] if self.per_step else self.context
        return self.control, self.covariance, self.uses_prior, context

    def at_all_steps(self, t, h, x, prior=None):
        context = self.context
        if self.per_step:
            context = time_first(self._steps, x.dim())
        return callable_shift(
            t, h, x, prior, self.control, self.covariance, self.uses_prior, context
        )
