"""Noise types: how a diffusion multiplies Wiener increments, and how to undo it.

Everything that depends on the shape of the diffusion ``G`` lives here, so that the path law,
the Girsanov posterior and the guide never re-derive it:

==============  ==========================  ==========  ==================================
noise type      diffusion shape             noise dim   ``G ΔW``
==============  ==========================  ==========  ==================================
``diagonal``    ``(..., d)``, entries ≠ 0   ``m = d``   ``g * ΔW``
``scalar``      ``(..., d, 1)``             ``m = 1``   ``g[..., 0] * ΔW``
``general``     ``(..., d, m)``             ``m``       ``G @ ΔW``
``additive``    ``(..., d, m)``, no ``x``   ``m``       ``G @ ΔW``
==============  ==========================  ==========  ==================================

**Reference measure.** One Euler–Maruyama step moves ``x`` by ``h f + G ΔW`` with
``ΔW ~ N(0, h I_m)``, so the increment lives on the affine subspace ``x + h f + range(G)`` of
dimension ``r = rank(G)``. Densities of a step are taken with respect to the ``r``-dimensional
Lebesgue (Hausdorff) measure on that subspace. With whitened coordinates ``z = W r`` of the
residual ``r = x' - x - h f`` (``W G = I`` when ``G`` has full column rank, ``W = L⁻¹`` with
``L Lᵀ = G Gᵀ`` when ``m > d``), the prior density is

    ``log p(x' | x) = log N(z; 0, h I_r) - ½ log det(Gᵀ G)``        (full column rank)
    ``log p(x' | x) = log N(z; 0, h I_d) - ½ log det(G Gᵀ)``        (``m > d``, full row rank)

For a square invertible ``G`` this is the ordinary Lebesgue density on ``R^d``. The volume term
depends on ``x`` only through ``G(t, x)``, which the prior and every Girsanov posterior share,
so it cancels exactly in ``log p - log q``. A residual component outside ``range(G)`` is off the
support; it is projected away (least squares), not penalised.
"""

import math

import torch

NOISE_TYPES = ("diagonal", "scalar", "general", "additive")


def check_noise_type(noise_type: str) -> str:
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, but got {noise_type!r}")
    return noise_type


def diffusion_event_dim(noise_type: str) -> int:
    """Number of rightmost dims of a diffusion value that are not batch dims."""
    return 1 if noise_type == "diagonal" else 2


def noise_dim(noise_type: str, g_shape: torch.Size, state_dim: int) -> int:
    """The Brownian dimension ``m`` implied by a diffusion value of shape ``g_shape``."""
    if noise_type == "diagonal":
        return state_dim
    if noise_type == "scalar":
        return 1
    return g_shape[-1]


def check_diffusion_shape(
    noise_type: str, g: torch.Tensor, state_dim: int, name: str, origin: str | None = None
) -> None:
    """Raise ``ValueError`` unless ``g`` has the shape its noise type requires.

    :param str name: how to call ``g`` in the message (e.g. ``"diffusion"``).
    :param str origin: where ``state_dim`` comes from, named when ``g``'s state dimension
        disagrees with it (e.g. ``"init has state dimension d = 3 (init shape (3,))"``).
    """
    event_dims = diffusion_event_dim(noise_type)
    if noise_type == "diagonal":
        expected = f"(..., {state_dim})"
    elif noise_type == "scalar":
        expected = f"(..., {state_dim}, 1)"
    else:
        expected = f"(..., {state_dim}, m)"
    shape = tuple(g.shape)
    if len(shape) < event_dims or (noise_type == "scalar" and shape[-1] != 1):
        raise ValueError(
            f"{name} must have shape {expected} for noise_type={noise_type!r}, "
            f"but got shape {shape}"
        )
    if shape[-event_dims] != state_dim:
        origin = f"the state dimension is d = {state_dim}" if origin is None else origin
        raise ValueError(
            f"{name} has shape {shape} but {origin}; for noise_type={noise_type!r} {name} "
            f"must have shape {expected}"
        )


def matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``A x`` over batch dims that broadcast. A matrix shared across a batch dim of the
    vectors (``A`` ``(K, 1, d, d)``, ``x`` ``(K, B, d)``: a step's coefficient for all
    particles) goes through ``einsum``, which contracts it as ``K`` products ``(B, d) (d, d)``;
    ``A @ x[..., None]`` would expand ``A`` into ``K B`` small products, and its backward
    into ``K B`` outer products summed over ``B`` (11× slower at ``K = 1000``, ``B = 512``,
    ``d = 8``). Otherwise ``matmul``, the cheaper call on small per-step batches. (The test
    compares the numbers of matrices and vectors: both branches give the same values.)"""
    if matrix.shape[-1] == 1:  # one column: elementwise
        return matrix[..., 0] * vector
    if math.prod(vector.shape[:-1]) > math.prod(matrix.shape[:-2]):
        return torch.einsum("...ij,...j->...i", matrix, vector)
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def diffuse(noise_type: str, g: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """``G ΔW``: maps noise ``(..., m)`` to state space ``(..., d)``."""
    if noise_type == "diagonal":
        return g * dw
    if noise_type == "scalar":
        return g[..., 0] * dw
    return matvec(g, dw)


def as_matrix(noise_type: str, g: torch.Tensor) -> torch.Tensor:
    """The diffusion as a ``(..., d, m)`` matrix, whatever its noise type."""
    if noise_type == "diagonal":
        return torch.diag_embed(g)
    return g


def add_diffused(noise_type: str, base: torch.Tensor, g: torch.Tensor, dw: torch.Tensor):
    """``base + G ΔW`` in one fused call where the noise type allows it."""
    if noise_type == "diagonal":
        return torch.addcmul(base, g, dw)
    if noise_type == "scalar":
        return torch.addcmul(base, g[..., 0], dw)
    return base + diffuse(noise_type, g, dw)


def noise_rank(noise_type: str, state_dim: int, noise_dim: int) -> int:
    """The rank of a (generic) diffusion of this noise type and shape: how many directions of
    the state its noise reaches."""
    if noise_type == "diagonal":
        return state_dim
    if noise_type == "scalar":
        return 1
    return min(state_dim, noise_dim)


class DiffusionFactor:
    """A factorization of ``G`` that whitens residuals.

    :param str noise_type: one of :data:`NOISE_TYPES`.
    :param torch.Tensor g: diffusion values, shaped as for ``noise_type``.

    Attributes: ``rank`` (``r``, the dimension of whitened coordinates), ``log_volume``
    (``½ log det(GᵀG)`` or ``½ log det(GGᵀ)``, shape ``batch``) and ``rows`` (``None`` when
    ``W G = I_m``; otherwise the ``(..., d, m)`` matrix ``Q = L⁻¹ G`` with orthonormal rows,
    which maps a noise-space shift ``u`` to the whitened shift ``Q u``).
    """

    def __init__(self, noise_type: str, g: torch.Tensor):
        self.noise_type = noise_type
        self.g = g
        self.rows = None
        if noise_type == "diagonal":
            self.rank = noise_rank(noise_type, g.shape[-1], g.shape[-1])
            self.log_volume = g.abs().log().sum(-1)
        elif noise_type == "scalar":
            self._norm2 = g[..., 0].pow(2).sum(-1)
            self.rank = noise_rank(noise_type, g.shape[-2], 1)
            self.log_volume = 0.5 * self._norm2.log()
        else:
            d, m = g.shape[-2:]
            self.rank = noise_rank(noise_type, d, m)
            if m == d:
                self._lu = torch.linalg.lu_factor(g)
                self.log_volume = self._lu[0].diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
            elif m < d:
                self._chol = torch.linalg.cholesky(g.transpose(-1, -2) @ g)
                self.log_volume = self._chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            else:
                self._chol = torch.linalg.cholesky(g @ g.transpose(-1, -2))
                self.log_volume = self._chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
                self.rows = torch.linalg.solve_triangular(self._chol, g, upper=False)

    def whiten(self, r: torch.Tensor) -> torch.Tensor:
        """Whitened coordinates ``z = W r`` of state-space residuals ``r`` ``(..., d)``."""
        g = self.g
        if self.noise_type == "diagonal":
            return r / g
        if self.noise_type == "scalar":
            return ((g[..., 0] * r).sum(-1) / self._norm2).unsqueeze(-1)
        d, m = g.shape[-2:]
        col = r.unsqueeze(-1)
        if m == d:
            lu, pivots = self._lu
            batch = torch.broadcast_shapes(lu.shape[:-2], col.shape[:-2])
            lu, pivots = lu.expand(batch + lu.shape[-2:]), pivots.expand(batch + pivots.shape[-1:])
            return torch.linalg.lu_solve(lu, pivots, col.expand(batch + col.shape[-2:])).squeeze(-1)
        if m < d:
            return torch.cholesky_solve(g.transpose(-1, -2) @ col, self._chol).squeeze(-1)
        return torch.linalg.solve_triangular(self._chol, col, upper=False).squeeze(-1)

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """The minimum-norm noise ``u = G⁺ r`` ``(..., m)``: ``G u`` is the projection of the
        state-space vector ``r`` ``(..., d)`` onto ``range(G)`` (``r`` itself if it is in it)."""
        z = self.whiten(r)
        if self.rows is None:
            return z
        return matvec(self.rows.transpose(-1, -2), z)

    def to_whitened(self, u: torch.Tensor, scale: torch.Tensor | None, covariance: str):
        """Map a noise-space law ``N(h u, h S Sᵀ)`` to whitened coordinates.

        :returns: ``(shift, scale, covariance)`` of the whitened step law ``N(h shift,
            h A Aᵀ)``, where ``A`` is ``None`` (identity), a positive vector (diagonal) or a
            lower-triangular matrix (``"full"``).
        """
        if self.rows is None:
            return u, scale, covariance
        q = self.rows
        shift = matvec(q, u)
        if covariance == "prior":
            return shift, None, "prior"  # Q Qᵀ = I
        qs = q * scale.unsqueeze(-2) if covariance == "diagonal" else q @ scale
        return shift, torch.linalg.cholesky(qs @ qs.transpose(-1, -2)), "full"


def step_log_density(
    z: torch.Tensor,
    h: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    covariance: str = "prior",
) -> torch.Tensor:
    """``log N(z; h shift, h A Aᵀ)`` for whitened increments ``z`` of shape ``(..., r)``.

    :param h: step sizes, broadcastable with ``z.shape[:-1]``.
    :param shift: ``(..., r)`` or ``None`` for zero.
    :param scale: ``A``: ``None`` for identity, ``(..., r)`` for ``"diagonal"``, a
        lower-triangular ``(..., r, r)`` with positive diagonal for ``"full"``.
    """
    h = h.unsqueeze(-1)
    diff = z if shift is None else z - h * shift
    diff = diff / h.sqrt()
    if covariance == "diagonal":
        diff = diff / scale
    elif covariance == "full":
        diff = torch.linalg.solve_triangular(scale, diff.unsqueeze(-1), upper=False).squeeze(-1)
    return standard_log_density(diff, h.squeeze(-1)) - scale_log_det(scale, covariance)


def standard_log_density(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``log N(sqrt(h) w; 0, h I_r)`` for standardized increments ``w`` ``(..., r)``:
    ``-½ |w|² - ½ r log(2π h)``."""
    r = w.shape[-1]
    return -0.5 * w.pow(2).sum(-1) - 0.5 * r * (math.log(2 * math.pi) + h.log())


def scale_log_det(scale: torch.Tensor | None, covariance: str):
    """``log det A`` of a step scale ``A`` (``0.`` for the identity)."""
    if covariance == "diagonal":
        return scale.log().sum(-1)
    if covariance == "full":
        return scale.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.0


def step_kl(
    h: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor | None = None,
    covariance: str = "prior",
) -> torch.Tensor:
    """``KL(N(h u, h A Aᵀ) ‖ N(0, h I)) = ½[tr(A Aᵀ) + h |u|² - r - log det(A Aᵀ)]``."""
    kl = 0.5 * h * shift.pow(2).sum(-1)
    if covariance == "prior":
        return kl
    squares = scale.pow(2).sum(-1)
    if covariance == "full":
        squares = squares.sum(-1)
    return kl + 0.5 * (squares - scale.shape[-1]) - scale_log_det(scale, covariance)


def apply_scale(scale: torch.Tensor | None, xi: torch.Tensor, covariance: str) -> torch.Tensor:
    """``S ξ`` for a noise-space scale of the given covariance kind."""
    if covariance == "prior":
        return xi
    if covariance == "diagonal":
        return scale * xi
    return matvec(scale, xi)
