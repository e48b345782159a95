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

import torch

from ..sde.noise import matvec
from .scan import affine_scan, associative_scan
from .small import cholesky_or_nan, inverse, mm, solve, solve_triangular


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
        A = chain.transition + h.unsqueeze(-1) * mm(G, self.control_gain)
        b = chain.offset + h * matvec(G, self.control_loc)
        L = h.sqrt().unsqueeze(-1) * mm(G, cholesky_or_nan(self.step_cov))
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
        solved by :func:`~pyro_nsde.posterior.scan.affine_scan`)."""
        A, b, _ = self.transitions()
        return torch.cat([self.init_loc.unsqueeze(0), affine_scan(A, b, self.init_loc)])


def smooth(chain: LinearChain, sites: GaussianSites) -> GaussMarkovPosterior:
    r"""The Gauss–Markov posterior of ``chain`` given ``sites`` (see the module docstring),
    with no loop over steps.

    The backward messages ``(Λ_k, λ_k)`` come from a parallel suffix scan
    (:func:`~pyro_nsde.posterior.scan.associative_scan`) over the elements of Särkkä &
    García-Fernández (2021): step ``k`` (``x_k → x_{k+1}``, with the site of ``x_{k+1}``) is

        ``p(x_{k+1} | x_k, y_{k+1}) = N(A x_k + b, C)``,
        ``p(y_{k+1} | x_k) ∝ exp(-½ xᵀ J x + ηᵀ x)``,

    with ``Q = h G Gᵀ`` and ``M = (I + Q J_{k+1})⁻¹``: ``A = M F``, ``b = M (c + Q j_{k+1})``,
    ``C = M Q``, ``J = Fᵀ J_{k+1} M F``, ``η = Fᵀ Mᵀ (j_{k+1} - J_{k+1} c)``. Composing the
    elements of steps ``k, ..., K-1`` gives ``p(y_{k+1:K} | x_k)`` in information form, and
    ``Λ_k = J_k + J_{k:K}``, ``λ_k = j_k + η_{k:K}``. Nothing inverts ``Q`` (rank-deficient
    noise needs no special case). The controls and increment covariances then follow for all
    steps at once, in square-root form: with ``R_k = chol(I + h_k G_kᵀ Λ_{k+1} G_k)`` and
    ``V_k = R_k⁻¹ sqrt(h_k) G_kᵀ Λ_{k+1}``, ``P_k = R_k⁻ᵀ R_k⁻¹``.
    """
    batch = torch.broadcast_shapes(sites.precision.shape[1:-2], sites.information.shape[1:-1])
    chain = chain.broadcast(batch)
    batch = chain.init_loc.shape[:-1]
    num_steps = chain.transition.shape[0]
    J = _stepped(sites.precision, 2, num_steps + 1, batch)
    j = _stepped(sites.information, 1, num_steps + 1, batch)
    suffix_J, suffix_eta = _backward_messages(chain, J, j)
    Lam = _symmetric(J + torch.cat([suffix_J, torch.zeros_like(J[:1])]))  # Λ_0, ..., Λ_K
    lam = j + torch.cat([suffix_eta, torch.zeros_like(j[:1])])
    return _forward_form(chain, Lam, lam)


def _stepped(tensor, event, num, batch):
    """``(num, *some batch, *event)`` → ``(num, *batch, *event)``."""
    missing = len(batch) - (tensor.dim() - 1 - event)
    tensor = tensor.reshape(tensor.shape[:1] + (1,) * missing + tensor.shape[1:])
    return tensor.expand((num, *batch) + tensor.shape[tensor.dim() - event :])


def _backward_messages(chain, J, j):
    """``(J_{k:K}, η_{k:K})`` for ``k = 0, ..., K-1``: ``p(y_{k+1:K} | x_k)`` in information
    form, by a suffix scan of the steps' elements."""
    F, c, G, h = chain.transition, chain.offset, chain.diffusion, chain.h
    Q = h[..., None, None] * mm(G, G.mT)
    J1, j1 = J[1:], j[1:]
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    system = eye + Q @ J1  # I + Q J, invertible: Q and J are positive semi-definite
    A = solve(system, F)
    b = solve(system, (c + matvec(Q, j1)).unsqueeze(-1)).squeeze(-1)
    C = _symmetric(solve(system, Q))
    info = _symmetric(mm(mm(F.mT, J1), A))
    eta = matvec(F.mT, solve(system.mT, (j1 - matvec(J1, c)).unsqueeze(-1))[..., 0])
    *_, eta, info = associative_scan(_combine, (A, b, C, eta, info), reverse=True)
    return _symmetric(info), eta


def _combine(first, second):
    """The element of two consecutive stretches of the chain, ``first`` then ``second``
    (Särkkä & García-Fernández 2021, Lemma 8): with ``M = (I + C_1 J_2)⁻¹``,
    ``A = A_2 M A_1``, ``b = A_2 M (b_1 + C_1 η_2) + b_2``, ``C = A_2 M C_1 A_2ᵀ + C_2``,
    ``η = A_1ᵀ Mᵀ (η_2 - J_2 b_1) + η_1``, ``J = A_1ᵀ Mᵀ J_2 A_1 + J_1`` (``Mᵀ = (I + J_2
    C_1)⁻¹``: ``C`` and ``J`` are symmetric)."""
    A1, b1, C1, eta1, J1 = first
    A2, b2, C2, eta2, J2 = second
    eye = torch.eye(A1.shape[-1], dtype=A1.dtype, device=A1.device)
    M = inverse(eye + mm(C1, J2))
    A2M, MA1 = mm(A2, M), mm(M, A1)  # and A_1ᵀ Mᵀ = (M A_1)ᵀ
    A = mm(A2M, A1)
    b = matvec(A2M, b1 + matvec(C1, eta2)) + b2
    C = mm(mm(A2M, C1), A2.mT) + C2
    eta = matvec(MA1.mT, eta2 - matvec(J2, b1)) + eta1
    J = mm(mm(MA1.mT, J2), A1) + J1
    return A, b, C, eta, J


def _forward_form(chain, Lam, lam) -> GaussMarkovPosterior:
    """The posterior's controls, increment covariances and ``q(x_0)`` from the messages
    ``Λ_k, λ_k`` (``(K+1, *batch, d, d)``, ``(K+1, *batch, d)``), all steps at once."""
    F, c, G, h = chain.transition, chain.offset, chain.diffusion, chain.h
    root_h = h.sqrt()[..., None, None]
    Gt = root_h * G.mT  # sqrt(h) Gᵀ, (K, *batch, m, d)
    Lam_next, lam_next = Lam[1:], lam[1:]
    GtL = mm(Gt, Lam_next)
    eye_m = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    # Positive definite in exact arithmetic; where rounding (or a non-finite model at an
    # extreme parameter draw) breaks that, the draw's coefficients become NaN instead of
    # stopping the whole batch: importance weighting then gives it weight zero.
    R = cholesky_or_nan(eye_m + mm(GtL, Gt.mT))
    V = solve_triangular(R, GtL, upper=False)
    residual = lam_next - matvec(Lam_next, c)  # λ - Λ c
    w = solve_triangular(R, matvec(Gt, residual).unsqueeze(-1), upper=False)
    Rt = R.mT
    control_loc = solve_triangular(Rt, w, upper=True).squeeze(-1) / root_h[..., 0]
    control_gain = -solve_triangular(Rt, mm(V, F), upper=True) / root_h
    step_cov = _symmetric(inverse(mm(R, Rt)))
    eye_d = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    S0 = chain.init_cov
    system = eye_d + mm(S0, Lam[0])
    init_cov = _symmetric(solve(system, S0))
    init_loc = solve(system, (chain.init_loc + matvec(S0, lam[0])).unsqueeze(-1))
    return GaussMarkovPosterior(
        chain, init_loc.squeeze(-1), init_cov, control_loc, control_gain, step_cov
    )


__all__ = ["GaussMarkovPosterior", "GaussianSites", "LinearChain", "smooth"]
