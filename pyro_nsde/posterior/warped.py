r"""A Gauss–Markov path under a learned monotone warp of the state: a path family with more than
one mode that is still drawn without the prior's networks.

A :class:`~pyro_nsde.GaussMarkovEulerMaruyama` chain ``y`` (the parallel-scan family of
``control="linear"``) is mapped state by state through a learned elementwise bijection,

    ``x_k = T(y_k)``,   ``T(y)_i = c_i + s_i φ_i((y_i - c_i) / s_i)``,

with ``φ_i`` a monotone rational-quadratic spline on ``[-B, B]`` (the identity outside;
Durkan et al. 2019, as Pyro's :class:`~pyro.distributions.transforms.Spline`) and ``(c, s)`` the
centre and spread of the state, fixed when the family is set up. The density of a path is exact
by the change of variables, one Jacobian per state:

    ``log q(x) = log q_GM(T⁻¹(x)) - Σ_k Σ_i log φ_i'((y_{k,i} - c_i) / s_i)``.

What it holds that a Gauss–Markov chain cannot: where ``T`` is steep between two flat parts,
every Gaussian marginal of ``y`` that straddles the steep part becomes a two-humped marginal of
``x``, and because ``y`` is a Markov chain with strong correlation between steps, a path crosses
the steep part rarely and quickly: ``T`` can learn where the wells of a double well are (it is
shared by every series and step), the Gauss–Markov chain of each series when its path
crosses. With ``T`` at the identity (its start) this is the Gauss–Markov family.

Measured (``benchmarks/accuracy/double_well.py``, ``docs/neural_sdes.md`` §8): with a double
well observed every time unit and all steps it is the best family (ELBO 3–4 nats above the
Gauss–Markov chain's, drift error 0.28–0.29 against 0.30–0.32); observed every 5 units, one
map for every series and step does not make some bridges flat and others sharp, and it holds
no more than the chain (a neural posterior drift does); under
:func:`~pyro_nsde.subsample_steps` a steep map turns a few steps into jumps whose subsampled
drift terms are noisy, and a learned diffusion came out 20–27 % too large.

Cost: ``T`` and its Jacobian are elementwise (no network, no loop over steps), so sampling
still needs no call of the prior's drift; the model's density of the warped path is evaluated
as for any path (on a few steps per path under :func:`~pyro_nsde.subsample_steps`). The
Girsanov estimator does not apply (the model scores ``x``, not the chain ``y`` the record of
the draw describes); "sticking the landing" does, without the prior's drift.

**References:**

[1] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios (2019), "Neural Spline
    Flows", NeurIPS.
[2] Danilo Rezende, Shakir Mohamed (2015), "Variational Inference with Normalizing Flows",
    ICML.
"""

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.transforms.spline import ConditionedSpline
from torch import nn
from torch.nn import functional as F

from ..sde.checks import check_choice, check_positive_int
from .controls import inverse_softplus
from .girsanov import path_gradient_surrogate

#: Floor of the spread ``s`` of a state coordinate (a constant coordinate keeps unit scale).
MIN_SPREAD = 1e-6
#: Pyro's floor of the spline's knot slopes (``min_derivative``).
MIN_SLOPE = 1e-3
#: How far an optimizer step moves the warp, relative to the bare spline's parameters.
WARP_STEP_SCALE = 0.1


class PathWarp(nn.Module):
    r"""The elementwise monotone map ``T(y)_i = c_i + s_i φ_i((y_i - c_i) / s_i)`` of the
    module docstring, shared by every step and series of a path site.

    ``φ_i`` is Pyro's monotone rational-quadratic spline
    (:class:`~pyro.distributions.transforms.spline.ConditionedSpline`, ``order="quadratic"``)
    with bin widths ``softmax(ρ w)``, heights ``softmax(ρ v)`` and knot slopes
    ``softplus(ρ u)`` (plus Pyro's floors) in the learned ``(w, v, u)``; ``ρ`` is
    ``step_scale``, so an optimizer step moves the map ``ρ`` times as far as it would move the
    bare spline's parameters (the map is shared by every state of every series, and its
    gradient is their sum). It starts at the identity (equal bins, unit slopes). Call
    :meth:`calibrate` with typical states to place the spline's box ``c ± B s`` over them.

    :param int state_dim: ``d``.
    :param int count_bins: knots of each ``φ_i`` (default 16).
    :param float bound: ``B``, the half-width of the spline's box in units of ``s``
        (default 3).
    :param float step_scale: ``ρ`` (default :data:`WARP_STEP_SCALE`).
    """

    def __init__(
        self,
        state_dim: int,
        count_bins: int = 16,
        bound: float = 3.0,
        step_scale: float | None = None,
    ):
        check_positive_int("state_dim", state_dim)
        check_positive_int("count_bins", count_bins)
        super().__init__()
        self.step_scale = WARP_STEP_SCALE if step_scale is None else float(step_scale)
        self.bound = float(bound)
        self.widths = nn.Parameter(torch.zeros(state_dim, count_bins))
        self.heights = nn.Parameter(torch.zeros(state_dim, count_bins))
        # φ' = min_derivative + softplus(ρ u) = 1 at every interior knot.
        slope = float(inverse_softplus(torch.tensor(1 - MIN_SLOPE))) / self.step_scale
        self.slopes = nn.Parameter(torch.full((state_dim, count_bins - 1), slope))
        self.register_buffer("centre", torch.zeros(state_dim))
        self.register_buffer("spread", torch.ones(state_dim))

    def _spline(self) -> ConditionedSpline:
        rho = self.step_scale
        params = (
            F.softmax(rho * self.widths, -1),
            F.softmax(rho * self.heights, -1),
            F.softplus(rho * self.slopes),
            None,
        )
        return ConditionedSpline(params, bound=self.bound, order="quadratic")

    @torch.no_grad()
    def calibrate(self, states: torch.Tensor) -> None:
        """Set ``(c, s)`` to the mean and standard deviation of ``states`` ``(..., d)`` per
        coordinate (the map's shape is kept relative to them)."""
        flat = states.detach().reshape(-1, states.shape[-1]).to(self.centre.dtype)
        self.centre.copy_(flat.mean(0))
        spread = flat.std(0) if flat.shape[0] > 1 else torch.ones_like(self.centre)
        self.spread.copy_(spread.nan_to_num(1.0).clamp(min=MIN_SPREAD))

    def forward(self, y: torch.Tensor):
        """``(T(y), log T'(y))``, both of the shape of ``y`` (the Jacobian is diagonal)."""
        u, log_det = self._spline().spline_op((y - self.centre) / self.spread)
        return self.centre + self.spread * u, log_det

    def inverse(self, x: torch.Tensor):
        """``(T⁻¹(x), log T'(T⁻¹(x)))``."""
        u, log_det = self._spline().spline_op((x - self.centre) / self.spread, inverse=True)
        return self.centre + self.spread * u, -log_det


class WarpedEulerMaruyama(TorchDistribution):
    r"""The law of ``x = T(y)``, ``y`` drawn from a path law ``base`` (a
    :class:`~pyro_nsde.GaussMarkovEulerMaruyama`) and ``T`` a :class:`PathWarp` applied to
    every state (see the module docstring). ``log_prob`` is exact; for a path this law drew it
    reuses the draw's chain and Jacobian.

    :param base: the law of the chain ``y``, a
        :class:`~pyro_nsde.GaussMarkovEulerMaruyama`.
    :param PathWarp warp: ``T``.
    :param str estimator: how :meth:`log_prob` of a path this law drew enters a gradient:
        ``"plain"`` (the exact log density) or ``"stl"`` (sticking the landing: the score
        at the path held fixed is dropped; the score is that of the chain's drift-free
        density, :meth:`~pyro_nsde.GaussMarkovEulerMaruyama.chain_log_density`, through
        ``T⁻¹``, so no call of the prior's drift).
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, base, warp: PathWarp, estimator: str = "plain", validate_args=None):
        check_choice("estimator", estimator, ("plain", "stl"))
        self.base, self.warp, self.estimator = base, warp, estimator
        self._drawn = None  # (x, y, Σ log T') of the last draw
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def prior(self):
        """The prior path law of the base chain."""
        return self.base.prior

    def expand(self, batch_shape, _instance=None):
        return WarpedEulerMaruyama(self.base.expand(batch_shape), self.warp, self.estimator)

    def _warp(self, y):
        x, log_det = self.warp(y)
        self._drawn = (x, y, log_det.sum((-1, -2)))
        return x

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self._warp(self.base.rsample(sample_shape))

    def _drew(self, value) -> bool:
        """Whether ``value`` is this law's last draw."""
        return self._drawn is not None and value is self._drawn[0]

    def skeleton(self, sample_shape=torch.Size()) -> torch.Tensor:
        """The warped noise-free path of the base chain (a typical path)."""
        return self.warp(self.base.skeleton(sample_shape))[0]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        lq = self.log_density(value)
        if self.estimator == "stl" and self._drew(value) and torch.is_grad_enabled():
            lq = lq.detach() + path_gradient_surrogate(self._exact_log_prob, value)
        return lq

    def _exact_log_prob(self, value):
        y, log_det = self.warp.inverse(value)
        return self.base.chain_log_density(y) - log_det.sum((-1, -2))

    def log_density(self, value: torch.Tensor) -> torch.Tensor:
        """The exact log density of ``value``, with its exact gradient (:meth:`log_prob`
        without the estimator's surrogate); reuses the draw's chain, Jacobian and record when
        this law drew ``value``."""
        if self._drew(value):
            return self.base.log_density(self._drawn[1]) - self._drawn[2]
        return self._exact_log_prob(value)


__all__ = ["MIN_SLOPE", "MIN_SPREAD", "WARP_STEP_SCALE", "PathWarp", "WarpedEulerMaruyama"]
