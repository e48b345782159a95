r"""Importance resampling of a fitted guide: posterior draws corrected towards ``p(z | y)``.

A variational posterior ``q`` is the closest member of its family, not the posterior: a normal
family in unconstrained space cannot follow the skew of a weakly identified noise scale, and
reverse-KL fits are too narrow in the tails. Its draws can be corrected by importance
sampling (Yao et al. 2018): draw ``M`` proposals ``z_s ~ r``, weight them by
``w_s = p(z_s, y) / r(z_s)``, smooth the largest weights with a generalized Pareto fit
(PSIS, Vehtari et al. 2024) and resample. The proposal ``r`` is the guide with its normal
families widened into Student-t ones (:class:`WidenMessenger`: same location, scale ×
``inflate``, ``df`` degrees of freedom), so that the weights have a finite variance where
the guide is too narrow; path sites keep the guide's own conditional law given the drawn
parameters. Where the guide has a multivariate site (the rates and scales of
``latents="multivariate"``), its proposal is then adapted over a few rounds to the weighted
moments of the draws so far (adaptive multiple importance sampling, Cornuet et al. 2012), the
first round serving as a pilot.

The Pareto shape ``k̂`` of the weights says whether this worked: below 0.7 the resampled
draws are reliable (their estimates converge at the Monte Carlo rate), above it the proposal
misses too much of the posterior and the guide's own draws are as good as it gets.

**References:**

[1] Yuling Yao, Aki Vehtari, Daniel Simpson, Andrew Gelman (2018), "Yes, but Did It Work?:
    Evaluating Variational Inference", ICML.
[2] Aki Vehtari, Daniel Simpson, Andrew Gelman, Yuling Yao, Jonah Gabry (2024), "Pareto
    Smoothed Importance Sampling", JMLR.
[3] Jean-Marie Cornuet, Jean-Michel Marin, Antonietta Mira, Christian P. Robert (2012),
    "Adaptive Multiple Importance Sampling", Scandinavian Journal of Statistics.
"""

import dataclasses
import math

import pyro.distributions as dist
import torch
from pyro.infer.importance import vectorized_importance_weights
from pyro.ops.stats import fit_generalized_pareto
from pyro.poutine.messenger import Messenger

from ..sde.checks import check_positive_int
from ..sde.sites import diverged_draws_allowed

#: ``k̂`` above which importance resampling is not trusted (Vehtari et al. 2024).
KHAT_THRESHOLD = 0.7
#: ``k̂`` below which the proposal is not adapted further (the weights' variance is finite).
GOOD_KHAT = 0.5
#: The most proposal rounds of :func:`importance_resample` by default.
MAX_ROUNDS = 3


class WidenMessenger(Messenger):
    """Replace the guide's normal sample statements (``Normal``, ``MultivariateNormal``,
    ``LowRankMultivariateNormal``, possibly under ``to_event``) with Student-t laws of the same
    location and ``inflate`` times the scale. Other sites (paths, deltas) are left alone.

    :param float df: degrees of freedom of the Student-t laws.
    :param float inflate: the factor on the scale.
    :param dict moments: ``{site: (loc, scale_tril)}`` to centre and scale the Student-t law of
        a multivariate site at instead of the guide's (an adapted proposal).
    :ivar dict laws: ``{site: law}``, the Student-t laws of the multivariate sites without
        batch dims seen in the last run (the sites whose proposal can be adapted).
    """

    def __init__(self, df: float = 5.0, inflate: float = 1.3, moments: dict | None = None):
        if not (df > 0 and inflate > 0):
            raise ValueError(f"df and inflate must be positive, but got {df!r} and {inflate!r}")
        self.df, self.inflate = float(df), float(inflate)
        self.moments = dict(moments or {})
        self.laws = {}  # the multivariate sites' Student-t laws (their moments can be adapted)
        super().__init__()

    def _pyro_sample(self, msg):
        if msg["is_observed"] or not isinstance(msg["fn"], torch.distributions.Distribution):
            return  # observations, and the subsample sites of plates
        fn, event_dims = msg["fn"], 0
        while isinstance(fn, dist.Independent):
            event_dims += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        batch = msg["fn"].batch_shape
        df = torch.tensor(self.df)
        if isinstance(fn, (dist.MultivariateNormal, dist.LowRankMultivariateNormal)):
            loc, tril = self.moments.get(msg["name"], (fn.loc, fn.scale_tril))
            wide = dist.MultivariateStudentT(df.to(tril), loc, self.inflate * tril)
            if not batch:
                self.laws[msg["name"]] = wide
        elif isinstance(fn, dist.Normal):
            wide = dist.StudentT(df.to(fn.loc), fn.loc, self.inflate * fn.scale)
        else:
            return
        if event_dims:
            wide = wide.to_event(event_dims)
        msg["fn"] = wide.expand(batch)


def pareto_smooth(log_weights: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Pareto-smoothed log importance weights and the Pareto shape ``k̂`` of their tail: the
    one tail fit behind :func:`psis_weights` and
    :func:`~pyro_nsde.analysis.diagnostics.pareto_khat`.

    The ``M = ⌈min(S / 5, 3 √S)⌉`` largest weights ``w = exp(log_weights)`` are fitted with a
    generalized Pareto law ``GPD(k, σ)`` of their excess ``w - u`` over the threshold ``u``
    (the next largest weight), with the estimator of Zhang & Stephens and the weakly
    informative prior of Vehtari et al. (:func:`pyro.ops.stats.fit_generalized_pareto`),
    and replaced by the expected order statistics of that law (truncated at the largest raw
    weight). As in :func:`pyro.infer.importance.psis_diagnostic`, tail weights below
    ``1e-15`` times the largest, or not above the threshold, are left out of the fit.

    - ``k̂ = nan``, weights unchanged: ``S < 50`` (``M < 10``), or the threshold ties with
      the largest weight (no tail to fit: e.g. equal weights, an exact guide);
    - ``k̂ = inf``, weights unchanged: fewer than 10 tail weights to fit (a few weights
      dominate all others: degenerate).

    :param torch.Tensor log_weights: ``(S,)`` log weights (up to a constant; ``-inf``
        allowed).
    :returns: ``(smoothed log weights (S,), k̂)``, the log weights shifted to a maximum of
        ``0``.
    """
    lw = log_weights.detach().reshape(-1).double()
    lw = lw - lw.max()
    num = lw.numel()
    tail = math.ceil(min(0.2 * num, 3.0 * math.sqrt(num)))
    if tail < 10:
        return lw, math.nan
    order = lw.argsort()
    threshold = float(lw[order[-tail - 1]])
    if threshold == 0.0:
        return lw, math.nan
    top = lw[order[-tail:]]
    fitted = top[top > max(math.log(1e-15), threshold)]
    if fitted.numel() < 10:
        return lw, math.inf
    khat, sigma = fit_generalized_pareto(fitted.exp() - math.exp(threshold))
    khat, sigma = float(khat), float(sigma)
    probs = (torch.arange(1, tail + 1, dtype=lw.dtype) - 0.5) / tail
    if abs(khat) > 1e-8:
        quantiles = sigma / khat * ((1 - probs).pow(-khat) - 1)
    else:
        quantiles = -sigma * torch.log1p(-probs)
    lw = lw.clone()
    lw[order[-tail:]] = (math.exp(threshold) + quantiles).clamp(max=1.0).log()
    return lw, khat


def psis_weights(log_weights: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Pareto-smoothed normalized importance weights, and the Pareto shape ``k̂``
    (:func:`pareto_smooth`, Vehtari et al. 2024).

    :param torch.Tensor log_weights: ``(S,)``.
    :returns: ``(weights (S,) summing to 1, k̂)`` (``k̂`` is ``nan`` for ``S < 50``).
    """
    lw, khat = pareto_smooth(log_weights)
    return (lw - lw.logsumexp(0)).exp(), khat


def _weighted_moments(values: torch.Tensor, weights: torch.Tensor):
    """``(mean, lower Cholesky factor of the covariance)`` of draws ``(M, ..., n)`` (one
    multivariate site) under normalized weights ``(M,)``."""
    z = values.reshape(weights.numel(), -1).to(weights.dtype)
    mean = weights @ z
    centred = z - mean
    cov = (weights[:, None] * centred).mT @ centred
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    # The jitter's floor: weights on a single draw give a zero covariance.
    tril = torch.linalg.cholesky(cov + (1e-9 * cov.diagonal().mean() + 1e-12) * eye)
    return mean.to(values.dtype), tril.to(values.dtype)


def systematic_resample(weights: torch.Tensor, num: int, generator=None) -> torch.Tensor:
    """``num`` indices drawn with probabilities ``weights`` by systematic resampling (one
    uniform offset; lower variance than independent draws)."""
    offset = torch.rand((), generator=generator, dtype=weights.dtype)
    points = (offset + torch.arange(num, dtype=weights.dtype)) / num
    cumulative = weights.cumsum(0)
    cumulative[-1] = 1.0
    return torch.searchsorted(cumulative, points).clamp(max=weights.numel() - 1)


@dataclasses.dataclass
class ImportanceDraws:
    """Proposals from a widened guide, their weights and the resampled indices.

    :ivar model_trace: the model's trace vectorized over the ``M`` proposals (dim
        ``-(max_plate_nesting + 1)``).
    :ivar log_weights: ``(M,)`` raw ``log p(z, y) - log r(z)``.
    :ivar weights: ``(M,)`` Pareto-smoothed normalized weights.
    :ivar indices: ``(S,)`` the resampled proposals.
    :ivar float pareto_k: ``k̂`` of the weights.
    :ivar float ess: effective sample size ``1 / Σ w²`` of the smoothed weights.
    """

    model_trace: object
    log_weights: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    pareto_k: float
    ess: float

    @property
    def reliable(self) -> bool:
        """``k̂ < 0.7``; a ``k̂`` of ``nan`` (no tail to fit: the weights are all equal, as for an
        exact guide) counts as reliable when the effective sample size is over half the
        proposals."""
        if math.isnan(self.pareto_k):
            return self.ess > 0.5 * self.log_weights.numel()
        return self.pareto_k < KHAT_THRESHOLD


def importance_resample(
    model,
    guide,
    *args,
    num_samples: int,
    num_proposals: int | None = None,
    df: float = 5.0,
    inflate: float = 1.3,
    rounds: int | None = None,
    max_plate_nesting: int,
    **kwargs,
) -> ImportanceDraws:
    r"""Draw proposals from ``guide`` widened by :class:`WidenMessenger`, weight them against
    ``model(*args, **kwargs)`` and resample ``num_samples`` of them (PSIS, systematic
    resampling). The model must broadcast over a draws dim left of its plates, as for
    ``Predictive(parallel=True)``.

    With multivariate sites in the guide (e.g. ``latents="multivariate"``), the proposal is
    adapted (adaptive multiple importance sampling, Cornuet et al. 2012): round ``r + 1``
    draws those sites from Student-t laws at the weighted mean and covariance of all proposals
    so far, each proposal weighted against the equal mixture of the rounds' laws,
    ``w = p(z, y) / (R⁻¹ Σ_r r_r(z))`` (deterministic-mixture weights: a draw in one round's
    thin tail is not over-weighted when another round covers it). The first round, the
    guide's own widened laws, only starts the adaptation: the draws returned are those of the
    adapted rounds, weighted against their mixture (a guide too narrow in some corner would
    otherwise keep its few huge weights there). The other sites' laws given the multivariate
    ones are the same in every round, so only the multivariate sites' densities enter. By
    default the rounds stop as soon as the weights' ``k̂`` is below :data:`GOOD_KHAT` (a good
    guide's widened laws are used as they are): a well-fitted guide costs one round.

    :param int num_proposals: proposals per round, default ``2 * num_samples``.
    :param int rounds: proposal rounds (1: the widened guide alone; ``R > 1``: ``R - 1``
        adapted rounds are returned); default: up to :data:`MAX_ROUNDS`, stopping at the
        first good one. Guides without multivariate sites have one.
    :param int max_plate_nesting: the model's plate nesting.
    """
    num_proposals = 2 * num_samples if num_proposals is None else num_proposals
    adaptive = rounds is None
    rounds = MAX_ROUNDS if adaptive else check_positive_int("rounds", rounds)

    def weigh(proposal):
        # Heavy-tailed proposals reach parameters where a path overflows: such a draw gets
        # weight zero instead of stopping the run (validation would raise on its non-finite
        # path).
        with torch.no_grad(), diverged_draws_allowed():
            log_weights, model_trace, guide_trace = vectorized_importance_weights(
                model,
                proposal(guide),
                *args,
                num_samples=num_proposals,
                max_plate_nesting=max_plate_nesting,
                **kwargs,
            )
        log_weights = log_weights.reshape(-1).double()
        log_weights = torch.where(torch.isnan(log_weights), -math.inf, log_weights)
        adapted = {
            name: guide_trace.nodes[name]["value"].reshape(num_proposals, -1)
            for name in proposal.laws
        }
        return log_weights, model_trace, adapted

    proposals = [WidenMessenger(df=df, inflate=inflate)]
    log_weights, model_trace, values = weigh(proposals[0])
    traces, own, draws = [model_trace], [log_weights], [values]
    weights, khat = psis_weights(log_weights)
    kept = slice(0, 1)
    while proposals[0].laws and len(proposals) < rounds:
        if adaptive and _good(weights, khat):
            break
        # The mixture weights of all proposals so far give the next round's moments.
        weights, _ = psis_weights(_mixture_log_weights(proposals, own, draws))
        stacked = {name: torch.cat([v[name] for v in draws]) for name in proposals[0].laws}
        moments = {name: _weighted_moments(z, weights) for name, z in stacked.items()}
        proposals.append(WidenMessenger(df=df, inflate=inflate, moments=moments))
        log_weights, model_trace, values = weigh(proposals[-1])
        traces.append(model_trace)
        own.append(log_weights)
        draws.append(values)
        kept = slice(1, None)  # the first round was a pilot: only the adapted ones are kept
        log_weights = _mixture_log_weights(proposals[kept], own[kept], draws[kept])
        weights, khat = psis_weights(log_weights)
    traces = traces[kept]
    return ImportanceDraws(
        model_trace=_concatenate_draws(traces, num_proposals),
        log_weights=log_weights,
        weights=weights,
        indices=systematic_resample(weights, num_samples),
        pareto_k=khat,
        ess=float(1.0 / weights.pow(2).sum()),
    )


def _good(weights: torch.Tensor, khat: float) -> bool:
    """Whether normalized weights need no better proposal: ``k̂ <`` :data:`GOOD_KHAT`, or no
    tail to fit (``k̂`` nan) and an effective sample size over half the proposals."""
    if math.isnan(khat):
        return float(1.0 / weights.pow(2).sum()) > 0.5 * weights.numel()
    return khat < GOOD_KHAT


def _mixture_log_weights(proposals, log_weights, draws) -> torch.Tensor:
    """``log p(z, y) - log (R⁻¹ Σ_r r_r(z))`` for the proposals of all ``R`` rounds, from each
    round's own ``log p(z, y) - log r_own(z)`` and the rounds' laws of the adapted sites."""
    if len(proposals) == 1:
        return log_weights[0]
    pieces = []
    with torch.no_grad():
        for index, (own, values) in enumerate(zip(log_weights, draws, strict=True)):
            densities = torch.stack(
                [
                    sum(prop.laws[name].log_prob(z).double() for name, z in values.items())
                    for prop in proposals
                ]
            )
            mixture = densities.logsumexp(0) - math.log(len(proposals))
            pieces.append(own + densities[index] - mixture)
    return torch.cat(pieces)


def _concatenate_draws(traces, num: int):
    """One trace with the latent sites' values of all rounds (``num`` draws each) along the
    draws dim, the leftmost (as :func:`~pyro.infer.importance.vectorized_importance_weights`
    lays them out)."""
    if len(traces) == 1:
        return traces[0]
    merged = traces[0].copy()
    for name, site in traces[0].nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        values = [trace.nodes[name]["value"] for trace in traces]
        rank = max(value.dim() for value in values)
        values = [v.reshape((1,) * (rank - v.dim()) + v.shape) for v in values]
        shape = torch.broadcast_shapes(*(v.shape[1:] for v in values))
        values = [v.expand((num, *shape)) for v in values]
        merged.nodes[name] = {**site, "value": torch.cat(values)}
    return merged


__all__ = [
    "GOOD_KHAT",
    "KHAT_THRESHOLD",
    "MAX_ROUNDS",
    "ImportanceDraws",
    "WidenMessenger",
    "importance_resample",
    "pareto_smooth",
    "psis_weights",
    "systematic_resample",
]
