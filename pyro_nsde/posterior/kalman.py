r"""Kalman smoothing of a linear-Gaussian Euler–Maruyama chain: its Gauss–Markov posterior.

The chain (step axis leftmost, any batch dims after it)

    ``x_0 ~ N(μ_0, Σ_0)``,   ``x_{k+1} = F_k x_k + c_k + G_k ΔW_k``,   ``ΔW_k ~ N(0, h_k I_m)``,

is observed through Gaussian *sites*, log-likelihood terms quadratic in one state each,

    ``log ℓ_k(x_k) = -½ x_kᵀ J_k x_k + j_kᵀ x_k + const``   (``J_k`` positive semi-definite).

The posterior is again a Markov chain, and in *forward* form it is exactly what a Girsanov
guide simulates: a backward information filter gives ``p(y_{k:K} | x_k) ∝
exp(-½ xᵀ Λ_k x + λ_kᵀ x)``,

    ``Λ_K = J_K``,  ``λ_K = j_K``,
    ``P_k = (I + h_k G_kᵀ Λ_{k+1} G_k)⁻¹``,   ``E_k = I - h_k Λ_{k+1} G_k P_k G_kᵀ``,
    ``Λ_k = J_k + F_kᵀ E_k Λ_{k+1} F_k``,   ``λ_k = j_k + F_kᵀ E_k (λ_{k+1} - Λ_{k+1} c_k)``,

and then, given ``x_k``, the posterior law of the Wiener increment is

    ``ΔW_k | x_k, y ~ N(h_k u_k(x_k), h_k P_k)``,
    ``u_k(x) = α_k + β_k x = P_k G_kᵀ (λ_{k+1} - Λ_{k+1} (F_k x + c_k))``,

an affine control with the increment covariance ``P_k`` (``≤ I``), and
``x_0 | y ~ N((I + Σ_0 Λ_0)⁻¹ (μ_0 + Σ_0 λ_0), (I + Σ_0 Λ_0)⁻¹ Σ_0)``. Nothing here inverts
``G`` or the step covariances ``h G Gᵀ``, so rank-deficient diffusions (noise on some
coordinates only) and a known ``x_0`` (``Σ_0 = 0``) need no special case.

This is the exact posterior of a linear SDE observed with Gaussian noise, and, for nonlinear
models linearized about a path, the Gauss–Newton step of a Laplace approximation
(:mod:`pyro_nsde.posterior.laplace`).

**References:**

[1] Herbert E. Rauch, F. Tung, Charlotte T. Striebel (1965), "Maximum likelihood estimates of
    linear dynamic systems", AIAA Journal.
[2] Simo Särkkä (2013), "Bayesian Filtering and Smoothing", Cambridge University Press
    (chapters 8 and 9).
"""

import dataclasses
import math

import torch

from ..sde.noise import matvec
from .gauss_markov import affine_scan


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return 0.5 * (matrix + matrix.transpose(-1, -2))


@dataclasses.dataclass
class LinearChain:
    """A linear-Gaussian Euler–Maruyama chain, step-major.

    :ivar transition: ``F`` ``(K, *batch, d, d)``.
    :ivar offset: ``c`` ``(K, *batch, d)``.
    :ivar diffusion: ``G`` ``(K, *batch, d, m)``.
    :ivar h: step sizes ``(K, *batch)``.
    :ivar init_loc: ``μ_0`` ``(*batch, d)``.
    :ivar init_cov: ``Σ_0`` ``(*batch, d, d)`` (zeros for a known ``x_0``).
    """

    transition: torch.Tensor
    offset: torch.Tensor
    diffusion: torch.Tensor
    h: torch.Tensor
    init_loc: torch.Tensor
    init_cov: torch.Tensor

    def to(self, dtype) -> "LinearChain":
        fields = dataclasses.fields(self)
        return LinearChain(*(getattr(self, field.name).to(dtype) for field in fields))

    def broadcast(self, batch_shape) -> "LinearChain":
        """All tensors expanded to a common batch shape (``batch_shape`` broadcast with the
        chain's own; batch dims align from the right)."""
        num_steps = self.transition.shape[0]
        d = self.diffusion.shape[-2]
        stepped = ((self.transition, 2), (self.offset, 1), (self.diffusion, 2), (self.h, 0))
        batch = torch.Size(batch_shape)
        for tensor, event in stepped:
            batch = torch.broadcast_shapes(batch, tensor.shape[1 : tensor.dim() - event])
        batch = torch.broadcast_shapes(batch, self.init_loc.shape[:-1], self.init_cov.shape[:-2])

        def steps(tensor, event):
            missing = len(batch) - (tensor.dim() - 1 - event)
            tensor = tensor.reshape(tensor.shape[:1] + (1,) * missing + tensor.shape[1:])
            return tensor.expand((num_steps, *batch) + tensor.shape[tensor.dim() - event :])

        return LinearChain(
            *(steps(tensor, event) for tensor, event in stepped),
            self.init_loc.expand(batch + (d,)),
            self.init_cov.expand(batch + (d, d)),
        )


@dataclasses.dataclass
class GaussianSites:
    """Quadratic log-likelihood terms ``-½ xᵀ J_k x + j_kᵀ x`` of each state ``x_k``.

    :ivar precision: ``J`` ``(K+1, *batch, d, d)``, positive semi-definite.
    :ivar information: ``j`` ``(K+1, *batch, d)``.
    """

    precision: torch.Tensor
    information: torch.Tensor

    def to(self, dtype) -> "GaussianSites":
        return GaussianSites(self.precision.to(dtype), self.information.to(dtype))


@dataclasses.dataclass
class GaussMarkovPosterior:
    r"""The posterior of a :class:`LinearChain` given :class:`GaussianSites`, in forward form.

    :ivar chain: the prior chain (broadcast to the posterior's batch shape).
    :ivar init_loc: posterior mean of ``x_0`` ``(*batch, d)``.
    :ivar init_cov: posterior covariance of ``x_0`` ``(*batch, d, d)``.
    :ivar control_loc: ``α`` ``(K, *batch, m)``.
    :ivar control_gain: ``β`` ``(K, *batch, m, d)``: ``ΔW_k | x_k ~ N(h_k (α_k + β_k x_k),
        h_k P_k)``.
    :ivar step_cov: ``P`` ``(K, *batch, m, m)``.
    """

    chain: LinearChain
    init_loc: torch.Tensor
    init_cov: torch.Tensor
    control_loc: torch.Tensor
    control_gain: torch.Tensor
    step_cov: torch.Tensor

    def transitions(self):
        """The posterior as ``x_{k+1} = A_k x_k + b_k + L_k ε_k``, ``ε_k ~ N(0, I_m)``.

        :returns: ``(A, b, L)``: ``(K, *batch, d, d)``, ``(K, *batch, d)``, ``(K, *batch, d, m)``.
        """
        chain = self.chain
        h = chain.h.unsqueeze(-1)
        G = chain.diffusion
        A = chain.transition + h.unsqueeze(-1) * (G @ self.control_gain)
        b = chain.offset + h * matvec(G, self.control_loc)
        L = h.sqrt().unsqueeze(-1) * (G @ cholesky_or_nan(self.step_cov))
        return A, b, L

    def marginals(self):
        """Posterior means ``(K+1, *batch, d)`` and covariances ``(K+1, *batch, d, d)``."""
        A, b, L = self.transitions()
        means, covs = [self.init_loc], [self.init_cov]
        for k in range(A.shape[0]):
            means.append(matvec(A[k], means[-1]) + b[k])
            covs.append(_symmetric(A[k] @ covs[-1] @ A[k].transpose(-1, -2)) + L[k] @ L[k].mT)
        return torch.stack(means), torch.stack(covs)

    def mean_path(self) -> torch.Tensor:
        """The posterior mean of every state, ``(K+1, *batch, d)`` (an affine recurrence,
        solved by :func:`~pyro_nsde.posterior.gauss_markov.affine_scan`)."""
        A, b, _ = self.transitions()
        return torch.cat([self.init_loc.unsqueeze(0), affine_scan(A, b, self.init_loc)])


def cholesky_or_nan(matrix: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of each (symmetrized) matrix of a batch, NaN for those that
    are not positive definite: where rounding, or a model that is not finite at an extreme
    parameter draw, breaks what holds in exact arithmetic, that draw's coefficients become NaN
    instead of stopping the whole batch (importance weighting then gives it weight zero)."""
    factor, info = torch.linalg.cholesky_ex(_symmetric(matrix))
    if info.any():
        factor = torch.where((info != 0)[..., None, None], math.nan, factor)
    return factor


def smooth(chain: LinearChain, sites: GaussianSites) -> GaussMarkovPosterior:
    """The Gauss–Markov posterior of ``chain`` given ``sites`` (see the module docstring).

    A sequential backward pass over the ``K`` steps in square-root form: with
    ``R_k = chol(I + h_k G_kᵀ Λ_{k+1} G_k)`` and ``V_k = R_k⁻¹ sqrt(h_k) G_kᵀ Λ_{k+1}``, the
    correction ``h Λ G P Gᵀ Λ`` is ``V_kᵀ V_k`` (symmetric by construction). The loop keeps
    ``R_k``, ``V_k`` and ``R_k⁻¹ sqrt(h_k) G_kᵀ (λ_{k+1} - Λ_{k+1} c_k)``; the controls and
    ``P_k = R_k⁻ᵀ R_k⁻¹`` are computed from them for all steps at once afterwards.
    """
    batch = torch.broadcast_shapes(sites.precision.shape[1:-2], sites.information.shape[1:-1])
    chain = chain.broadcast(batch)
    batch = chain.init_loc.shape[:-1]
    d, m = chain.diffusion.shape[-2:]
    num_steps = chain.transition.shape[0]

    def stepped(tensor, event):  # (K+1, *some batch, *event) -> (K+1, *batch, *event)
        missing = len(batch) - (tensor.dim() - 1 - event)
        tensor = tensor.reshape(tensor.shape[:1] + (1,) * missing + tensor.shape[1:])
        return tensor.expand((num_steps + 1, *batch) + tensor.shape[tensor.dim() - event :])

    J = stepped(sites.precision, 2)
    j = stepped(sites.information, 1)
    eye_m = torch.eye(m, dtype=J.dtype, device=J.device)
    root_h = chain.h.sqrt()[..., None, None]
    scaled_t = root_h * chain.diffusion.mT  # sqrt(h) Gᵀ, (K, *batch, m, d)
    steps = zip(
        chain.transition.unbind(0),
        chain.offset.unbind(0),
        scaled_t.unbind(0),
        J[:-1].unbind(0),
        j[:-1].unbind(0),
        strict=True,
    )
    Lam, lam = _symmetric(J[-1]), j[-1]
    factors, projections, whitened = [], [], []
    for F, c, Gt, J_k, j_k in reversed(list(steps)):
        GtL = Gt @ Lam  # sqrt(h) Gᵀ Λ  (m, d)
        # Positive definite in exact arithmetic; where rounding (or a non-finite model at an
        # extreme parameter draw) breaks that, the draw's coefficients become NaN instead of
        # stopping the whole batch: importance weighting then gives it weight zero.
        R = cholesky_or_nan(eye_m + GtL @ Gt.mT)
        V = torch.linalg.solve_triangular(R, GtL, upper=False)
        residual = lam - matvec(Lam, c)  # λ - Λ c
        w = torch.linalg.solve_triangular(R, matvec(Gt, residual).unsqueeze(-1), upper=False)
        w = w.squeeze(-1)
        factors.append(R)
        projections.append(V @ F)
        whitened.append(w)
        Lam = J_k + F.mT @ (Lam - V.mT @ V) @ F
        lam = j_k + matvec(F.mT, residual - matvec(V.mT, w))
    R = torch.stack(factors[::-1])
    Rt = R.mT
    inv_root_h = 1.0 / root_h
    control_loc = (
        torch.linalg.solve_triangular(
            Rt, torch.stack(whitened[::-1]).unsqueeze(-1), upper=True
        ).squeeze(-1)
        * inv_root_h[..., 0]
    )
    control_gain = (
        -torch.linalg.solve_triangular(Rt, torch.stack(projections[::-1]), upper=True) * inv_root_h
    )
    step_cov = _symmetric(torch.cholesky_inverse(R))
    Lam = _symmetric(Lam)
    eye_d = torch.eye(d, dtype=J.dtype, device=J.device)
    S0 = chain.init_cov
    system = eye_d + S0 @ Lam
    init_cov = _symmetric(torch.linalg.solve(system, S0))
    init_loc = torch.linalg.solve(system, (chain.init_loc + matvec(S0, lam)).unsqueeze(-1))
    return GaussMarkovPosterior(
        chain, init_loc.squeeze(-1), init_cov, control_loc, control_gain, step_cov
    )


__all__ = ["GaussMarkovPosterior", "GaussianSites", "LinearChain", "cholesky_or_nan", "smooth"]
