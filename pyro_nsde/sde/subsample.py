r"""An unbiased estimate of a path's log density from a random subset of its steps.

The Euler–Maruyama density of a path is a sum over its ``K`` steps,

    ``log p(x) = log p(x_0) + Σ_k ℓ_k``,   ``ℓ_k = log N(x_{k+1}; x_k + h_k f(t_k, x_k),
    h_k G Gᵀ)``,

and each ``ℓ_k`` costs an evaluation of the drift (and diffusion) networks. With a path drawn
without them (the Gauss–Markov guide's parallel scan), these evaluations are the cost of a
training step. :class:`SubsampledEulerMaruyama` estimates the sum from ``R`` steps per path:
the steps are split into ``R`` strata of consecutive steps (sizes ``n_r = ⌊(r+1)K/R⌋ - ⌊rK/R⌋``)
and one step ``k_r`` is drawn uniformly in each, independently for every path (every batch
element) and fresh at every call, so

    ``Σ_k ℓ_k ≈ Σ_r n_r ℓ_{k_r}``

is unbiased, and so are the ELBO and its gradients (the drawn indices do not depend on any
parameter). Stratification removes the variance between parts of the path (a drift that
changes over time).

**The exact part.** With a diffusion ``G`` that is a tensor (constant in time and state), the
step's log density splits into a part without the drift and a part with it,

    ``ℓ_k = [-½ |W Δx_k|² / h_k - log vol(G) - ½ r log(2π h_k)]
           + [(W Δx_k)·(W f_k) - ½ h_k |W f_k|²]``,

(``W`` the whitening of ``G``, ``Δx_k = x_{k+1} - x_k``). The first bracket, a ``χ²`` of
``K`` terms whose fluctuations dominate the variance of the plain estimate, is computed on all
steps (no network); only the second is subsampled. Its variance is then of order
``K T |W f|² / R`` instead of ``K² / R``. A callable diffusion (a network of the state) is
subsampled whole.

:func:`subsample_steps` puts this estimate in place of the density of every path site of a
model; everything else is unchanged.

**References:**

[1] Thomas Course, Prasanth B. Nair (2023), "Amortized Reparametrization: Efficient and
    Scalable Variational Inference for Latent SDEs", NeurIPS.
"""

import torch
from pyro.distributions import MaskedDistribution, TorchDistribution
from pyro.distributions import constraints as pyro_constraints
from pyro.distributions.torch import Independent
from pyro.poutine.messenger import Messenger
from torch.distributions import Distribution

from .checks import check_positive_int
from .euler_maruyama import EulerMaruyama
from .noise import DiffusionFactor, step_log_density


def strata(num_steps: int, num_draws: int) -> torch.Tensor:
    """The bounds ``(R + 1,)`` of ``R`` strata of nearly equal size over ``K`` steps."""
    return torch.div(torch.arange(num_draws + 1) * num_steps, num_draws, rounding_mode="floor")


class SubsampledEulerMaruyama(TorchDistribution):
    """The law of an :class:`~pyro_nsde.EulerMaruyama` path whose :meth:`log_prob` is the
    unbiased estimate of the module docstring from ``num_steps`` steps per path (``R``); at
    ``R ≥ K`` it is exact. Sampling is the path law's own.

    :param EulerMaruyama law: the path law.
    :param int num_steps: ``R``.
    """

    arg_constraints = {}
    support = pyro_constraints.independent(pyro_constraints.real, 2)
    has_rsample = True

    def __init__(self, law: EulerMaruyama, num_steps: int, validate_args=None):
        check_positive_int("num_steps", num_steps)
        self.law, self.num_draws = law, num_steps
        super().__init__(law.batch_shape, law.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return SubsampledEulerMaruyama(self.law.expand(batch_shape), self.num_draws)

    def rsample(self, sample_shape=torch.Size()):
        return self.law.rsample(sample_shape)

    def sample(self, sample_shape=torch.Size()):
        return self.law.sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        law = self.law
        num_steps = law.num_steps
        if self.num_draws >= num_steps:
            return law.log_prob(value)
        batch = torch.broadcast_shapes(value.shape[:-2], law.batch_shape, law.grid.batch_shape)
        value = value.expand(batch + value.shape[-2:])
        starts = value[..., :-1, :]
        if not isinstance(law.init, Distribution):  # a known x_0
            x0 = law.init.expand(batch + law.init.shape[-1:]).unsqueeze(-2)
            starts = torch.cat([x0, starts[..., 1:, :]], dim=-2)
        x, x_next = starts.movedim(-2, 0), value[..., 1:, :].movedim(-2, 0)  # (K, *batch, d)
        times = law.grid.times.expand(batch + law.grid.times.shape[-1:]).movedim(-1, 0)
        steps = self._draw(num_steps, batch, value.device)  # (R, *batch)
        weights = (steps[1] - steps[0]).to(value.dtype)  # stratum sizes n_r
        index = steps[2]
        pick = index.unsqueeze(-1).expand(index.shape + x.shape[-1:])
        xs, xs_next = x.gather(0, pick), x_next.gather(0, pick)
        t = times.gather(0, index).unsqueeze(-1)  # (R, *batch, 1)
        h = times.gather(0, index + 1) - times.gather(0, index)  # (R, *batch)
        f = law.drift(t, xs)
        total = law.init_log_prob(value)
        if callable(law.diffusion):
            factor = DiffusionFactor(law.noise_type, law.diffusion(t, xs))
            sampled = step_log_density(factor.whiten(xs_next - xs - h.unsqueeze(-1) * f), h)
            sampled = sampled - factor.log_volume
            return total + (weights * sampled).sum(0)
        factor = DiffusionFactor(law.noise_type, law.diffusion)
        h_all = (times[1:] - times[:-1]).expand(x.shape[:-1])
        free = step_log_density(factor.whiten(x_next - x), h_all) - factor.log_volume
        moved = factor.whiten(xs_next - xs)
        drift = factor.whiten(f.expand(moved.shape[:-1] + f.shape[-1:]))
        cross = (moved * drift).sum(-1) - 0.5 * h * drift.square().sum(-1)
        return total + free.sum(0) + (weights * cross).sum(0)

    def _draw(self, num_steps, batch, device):
        """``(lower, upper, index)``: for each stratum and path, its bounds and a step drawn
        uniformly in it, each ``(R, *batch)``."""
        bounds = strata(num_steps, self.num_draws).to(device)
        lower = bounds[:-1].reshape((-1,) + (1,) * len(batch)).expand((-1, *batch))
        upper = bounds[1:].reshape((-1,) + (1,) * len(batch)).expand((-1, *batch))
        uniform = torch.rand(lower.shape, device=device)
        index = lower + (uniform * (upper - lower)).long()
        return lower, upper, torch.minimum(index, upper - 1)


def _replace(fn, num_steps):
    """``fn`` (an :class:`~pyro_nsde.EulerMaruyama` under mask and ``to_event`` wrappers) with
    the path law subsampled; ``None`` for other distributions."""
    if isinstance(fn, EulerMaruyama):
        return SubsampledEulerMaruyama(fn, num_steps)
    if isinstance(fn, MaskedDistribution):
        base = _replace(fn.base_dist, num_steps)
        return None if base is None else MaskedDistribution(base, fn._mask)
    if isinstance(fn, Independent):
        base = _replace(fn.base_dist, num_steps)
        return None if base is None else Independent(base, fn.reinterpreted_batch_ndims)
    return None


class SubsampleStepsMessenger(Messenger):
    """Replaces the law of every :class:`~pyro_nsde.EulerMaruyama` sample site by its
    :class:`SubsampledEulerMaruyama` with ``num_steps`` steps per path."""

    def __init__(self, num_steps: int):
        check_positive_int("num_steps", num_steps)
        super().__init__()
        self.num_steps = num_steps

    def _pyro_sample(self, msg):
        replaced = _replace(msg["fn"], self.num_steps)
        if replaced is not None:
            msg["fn"] = replaced


def subsample_steps(model, num_steps: int):
    """``model`` with every path site's ``log_prob`` the unbiased estimate of
    :class:`SubsampledEulerMaruyama` from ``num_steps`` steps per path, drawn afresh at every
    call; everything else unchanged. Use as ``SVI(subsample_steps(model, R),
    GirsanovGuide(model, control="linear", subsample_steps=R), ...)`` (the guide on the plain
    model; its argument keeps its gradient estimator off the prior's drift), or with
    :func:`~pyro_nsde.fit_svi`."""
    return SubsampleStepsMessenger(num_steps)(model)


__all__ = ["SubsampleStepsMessenger", "SubsampledEulerMaruyama", "strata", "subsample_steps"]
