r"""The importance-sampling check of a variational fit.

:func:`variational_diagnostics` measures how well a guide ``q`` matches the posterior
``p(z | y)`` through the importance weights of its draws,

    ``log w_s = log p(z_s, y) - log q(z_s)``,  ``z_s ~ q``,  ``s = 1..S``,

whose mean is the ELBO, whose log-mean-exp is an importance-sampling estimate of ``log p(y)``,
and whose upper tail gives the Pareto shape ``k̂`` of Yao et al. (2018) (see
:func:`pareto_khat` and ``docs/diagnostics.md``).

**References:**

[1] Yuling Yao, Aki Vehtari, Daniel Simpson, Andrew Gelman (2018), "Yes, but Did It Work?:
    Evaluating Variational Inference", ICML.
[2] Aki Vehtari, Daniel Simpson, Andrew Gelman, Yuling Yao, Jonah Gabry (2024), "Pareto
    Smoothed Importance Sampling", JMLR.
"""

import dataclasses
import math

import torch

from ..sde.checks import check_positive_int
from .draws import guide_draws
from .importance import pareto_smooth


@dataclasses.dataclass(frozen=True)
class VariationalDiagnostics:
    """Importance-sampling summary of a guide against its model, from ``S`` guide draws.

    :ivar float pareto_k: the Pareto shape ``k̂`` of the upper tail of the weights
        (:func:`pareto_khat`); ``< 0.5`` good, ``0.5–0.7`` usable with care, ``> 0.7`` the
        guide is far from the posterior (``nan`` when ``S`` is too small to fit a tail).
    :ivar float elbo: ``mean_s log w_s``, an unbiased estimate of the ELBO.
    :ivar float elbo_stderr: its Monte Carlo standard error.
    :ivar float log_evidence: ``log mean_s w_s``, the importance-sampling estimate of
        ``log p(y)`` (a lower bound in expectation, tighter than the ELBO).
    :ivar float ess: the effective sample size ``(Σ w)² / Σ w²`` of the ``S`` draws.
    :ivar int num_draws: ``S``.
    """

    pareto_k: float
    elbo: float
    elbo_stderr: float
    log_evidence: float
    ess: float
    num_draws: int

    @classmethod
    def from_log_weights(cls, log_weights: torch.Tensor) -> "VariationalDiagnostics":
        """Summarize log importance weights ``(S,)``."""
        lw = log_weights.detach().reshape(-1).double()
        num = lw.numel()
        normalized = lw - lw.logsumexp(0)
        return cls(
            pareto_k=pareto_khat(lw),
            elbo=float(lw.mean()),
            elbo_stderr=float(lw.std() / math.sqrt(num)) if num > 1 else math.nan,
            log_evidence=float(lw.logsumexp(0) - math.log(num)),
            ess=float(1.0 / (2 * normalized).logsumexp(0).exp()),
            num_draws=num,
        )


def pareto_khat(log_weights: torch.Tensor) -> float:
    r"""The Pareto shape ``k̂`` of the upper tail of importance weights ``w = exp(log_weights)``
    (:func:`~pyro_nsde.analysis.importance.pareto_smooth`). If ``P(w > t) ~ t^{-1/k}``, the
    weights have a finite variance for ``k < 1/2`` and a finite mean for ``k < 1``.

    :param torch.Tensor log_weights: ``(S,)`` log weights (up to an additive constant).
    :returns: ``k̂``; ``nan`` when ``S < 50`` or the tail weights are all equal, ``inf`` when a
        few weights dominate all others.
    """
    lw = torch.as_tensor(log_weights).detach().reshape(-1).double()
    if not torch.isfinite(lw).all():
        raise ValueError("log_weights must be finite, but some entries are inf or nan")
    return pareto_smooth(lw)[1]


def variational_diagnostics(
    model,
    guide,
    *,
    model_args=(),
    model_kwargs=None,
    num_draws: int = 1000,
) -> VariationalDiagnostics:
    """Pareto ``k̂``, ELBO and importance-sampling evidence of ``guide`` against ``model``.

    Draws ``S = num_draws`` samples ``z_s ~ q`` in one vectorized run (the model must have all
    its batch dims in plates, as for ``Predictive(parallel=True)``) and summarizes
    ``log w_s = log p(z_s, y) - log q(z_s)``; see :class:`VariationalDiagnostics`.
    ``docs/diagnostics.md`` explains what a large ``k̂`` means for a path posterior.

    :param callable model: the Pyro model.
    :param callable guide: its trained guide (e.g. a :class:`~pyro_nsde.GirsanovGuide`).
    :param tuple model_args: positional arguments of model and guide (the data).
    :param dict model_kwargs: keyword arguments of model and guide.
    :param int num_draws: ``S``; ``k̂`` needs a few hundred at least.
    """
    check_positive_int("num_draws", num_draws)
    draws = guide_draws(model, guide, model_args, model_kwargs or {}, num_draws)
    return VariationalDiagnostics.from_log_weights(draws.log_weights)


__all__ = ["VariationalDiagnostics", "pareto_khat", "variational_diagnostics"]
