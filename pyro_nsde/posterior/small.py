r"""Linear algebra of large batches of small matrices.

The Kalman smoother of a path works on a ``d × d`` matrix per step, per series and per draw of
the parameters: a batch of hundreds of thousands of ``1 × 1`` or ``2 × 2`` matrices when the
guide's draws are weighted. LAPACK's batched routines then spend far more time per matrix than
the arithmetic needs; for ``d ≤ 2`` the closed forms below are elementwise tensor operations
(2–10× faster on a CPU core). Larger matrices go to :mod:`torch.linalg`.

- ``1 × 1``: ``a⁻¹ = 1 / a``, ``chol(a) = √a``;
- ``2 × 2``: ``[[a, b], [c, d]]⁻¹ = [[d, -b], [-c, a]] / (a d - b c)``,
  ``chol([[a, b], [b, c]]) = [[√a, 0], [b / √a, √(c - b² / a)]]``.
"""

import math

import torch


def _entries(matrix):
    return matrix[..., 0, 0], matrix[..., 0, 1], matrix[..., 1, 0], matrix[..., 1, 1]


def _matrix(a, b, c, d):
    return torch.stack([a, b, c, d], dim=-1).unflatten(-1, (2, 2))


def mm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` for batches of small matrices; an inner dimension of 1 (the products
    of ``1 × 1`` matrices, outer products) elementwise."""
    if left.shape[-1] == 1:
        return left * right
    return left @ right


def inverse(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of each matrix of a batch ``(..., d, d)``."""
    size = matrix.shape[-1]
    if size == 1:
        return matrix.reciprocal()
    if size == 2:
        a, b, c, d = _entries(matrix)
        return _matrix(d, -b, -c, a) / (a * d - b * c)[..., None, None]
    return torch.linalg.inv(matrix)


def solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``matrix⁻¹ rhs`` for a batch of small matrices and right-hand sides ``(..., d, n)``."""
    if matrix.shape[-1] <= 2:
        return mm(inverse(matrix), rhs)
    return torch.linalg.solve(matrix, rhs)


def solve_triangular(matrix: torch.Tensor, rhs: torch.Tensor, upper: bool) -> torch.Tensor:
    """``matrix⁻¹ rhs`` for triangular matrices (``upper`` or lower)."""
    if matrix.shape[-1] <= 2:
        return mm(inverse(matrix), rhs)
    return torch.linalg.solve_triangular(matrix, rhs, upper=upper)


def cholesky_or_nan(matrix: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of each (symmetrized) matrix of a batch, NaN for those that
    are not positive definite: where rounding, or a model that is not finite at an extreme
    parameter draw, breaks what holds in exact arithmetic, that draw's factor becomes NaN
    instead of stopping the whole batch (importance weighting then gives it weight zero)."""
    size = matrix.shape[-1]
    if size == 1:
        return torch.where(matrix > 0, matrix, math.nan).sqrt()
    if size == 2:
        a, b, c, d = _entries(matrix)
        off = 0.5 * (b + c)
        root = torch.where(a > 0, a, math.nan).sqrt()
        lower = off / root
        rest = d - lower.square()
        return _matrix(
            root, torch.zeros_like(root), lower, torch.where(rest > 0, rest, math.nan).sqrt()
        )
    symmetric = 0.5 * (matrix + matrix.mT)
    factor, info = torch.linalg.cholesky_ex(symmetric)
    if info.any():
        factor = torch.where((info != 0)[..., None, None], math.nan, factor)
    return factor


def eigenvalue_range(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest eigenvalues of each symmetric matrix of a batch (closed form
    for ``d ≤ 2``: ``tr / 2 ∓ √((tr / 2)² - det)``)."""
    size = matrix.shape[-1]
    if size == 1:
        return matrix[..., 0, 0], matrix[..., 0, 0]
    if size == 2:
        a, b, c, d = _entries(matrix)
        half = 0.5 * (a + d)
        spread = (0.25 * (a - d).square() + b * c).clamp(min=0).sqrt()
        return half - spread, half + spread
    values = torch.linalg.eigvalsh(matrix)
    return values[..., 0], values[..., -1]


__all__ = ["cholesky_or_nan", "eigenvalue_range", "inverse", "mm", "solve", "solve_triangular"]
