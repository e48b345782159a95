r"""Parallel scans: all prefix (or suffix) compositions of a sequence in ``O(log K)`` depth.

For an associative operation ``∘`` and elements ``e_0, ..., e_{K-1}``, :func:`associative_scan`
returns every prefix ``e_0 ∘ ... ∘ e_k`` (or every suffix ``e_k ∘ ... ∘ e_{K-1}``) by the
odd–even recursion of Ladner & Fischer (1980) and Blelloch (1990): neighbouring pairs are
composed, the half-length sequence is scanned recursively, and the skipped positions are filled
in. That is ``O(log K)`` rounds of batched tensor operations and ``O(K)`` work; automatic
differentiation through it has the same depth. Two scans use it here:

- :func:`affine_scan`: all states of ``x_{k+1} = A_k x_k + b_k`` (the Gauss–Markov sampler);
- the Kalman smoother (:func:`~pyro_nsde.posterior.kalman.smooth`), after Särkkä &
  García-Fernández (2021).

**References:**

[1] Richard E. Ladner, Michael J. Fischer (1980), "Parallel Prefix Computation", JACM.
[2] Guy E. Blelloch (1990), "Prefix Sums and Their Applications", CMU-CS-90-190.
[3] Simo Särkkä, Ángel F. García-Fernández (2021), "Temporal Parallelization of Bayesian
    Smoothers", IEEE Transactions on Automatic Control.
"""

import torch

from ..sde.noise import matvec
from .small import mm


def associative_scan(combine, elements: tuple, reverse: bool = False) -> tuple:
    """Every prefix composition ``e_0 ∘ ... ∘ e_k`` of ``elements`` (every suffix
    ``e_k ∘ ... ∘ e_{K-1}`` with ``reverse``).

    :param combine: ``combine(a, b)`` is ``a ∘ b`` (``a`` first), for batches of elements:
        tuples of tensors with the same leading axis; associative.
    :param tuple elements: tensors ``(K, ...)``, element ``k`` is ``[k]`` of each.
    :returns: a tuple like ``elements``: the compositions, step ``k`` at ``[k]``.
    """
    if not reverse:
        return _scan(combine, tuple(elements))
    flipped = tuple(e.flip(0) for e in elements)
    scanned = _scan(lambda a, b: combine(b, a), flipped)
    return tuple(s.flip(0) for s in scanned)


def _scan(combine, elements):
    num = elements[0].shape[0]
    if num < 2:
        return elements
    half = num // 2
    pairs = combine(
        tuple(e[0 : 2 * half : 2] for e in elements),
        tuple(e[1 : 2 * half : 2] for e in elements),
    )
    odds = _scan(combine, pairs)  # prefixes ending at 1, 3, ..., 2 half - 1
    evens = elements
    if num > 2:  # prefixes ending at 2, 4, ...: one more element after an odd prefix
        rest = combine(
            tuple(o[: (num - 1) // 2] for o in odds), tuple(e[2:num:2] for e in elements)
        )
        evens = tuple(torch.cat([e[:1], r]) for e, r in zip(elements, rest, strict=True))
    return tuple(_interleave(e[: (num + 1) // 2], o) for e, o in zip(evens, odds, strict=True))


def _interleave(evens, odds):
    """``evens[0], odds[0], evens[1], ...`` (one more even when the total is odd)."""
    paired = torch.stack([evens[: odds.shape[0]], odds], dim=1).flatten(0, 1)
    if evens.shape[0] > odds.shape[0]:
        paired = torch.cat([paired, evens[-1:]])
    return paired


def affine_scan(A: torch.Tensor, b: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """All states of ``x_{k+1} = A_k x_k + b_k``, by a parallel scan.

    Pairs of steps are composed into one affine map, the half-length recurrence is solved
    recursively, and the skipped states are filled in. Only products of the ``A_k`` appear
    (no inverses, no cumulative products divided out), so contracting chains underflow
    gracefully and long grids stay accurate.

    :param torch.Tensor A: ``(K, *batch, d, d)``, or ``(K, *batch, d)`` for diagonal ``A_k``.
    :param torch.Tensor b: ``(K, *batch, d)``.
    :param torch.Tensor x0: ``(*batch, d)``.
    :returns: ``(K, *batch, d)``: ``x_1, ..., x_K``.
    """
    diagonal = A.dim() == b.dim()
    batch = torch.broadcast_shapes(A.shape[1 : A.dim() - (1 if diagonal else 2)], b.shape[1:-1])
    batch = torch.broadcast_shapes(batch, x0.shape[:-1])
    x0 = x0.expand(batch + x0.shape[-1:])
    return _affine(A, b, x0, diagonal)


def _apply(A, x, diagonal):
    return A * x if diagonal else matvec(A, x)


def _affine(A, b, x0, diagonal):
    num = b.shape[0]
    if num == 1:
        return (_apply(A[0], x0, diagonal) + b[0]).unsqueeze(0)
    half = num // 2
    A_even, A_odd = A[0 : 2 * half : 2], A[1 : 2 * half : 2]
    b_even, b_odd = b[0 : 2 * half : 2], b[1 : 2 * half : 2]
    # x_{2i+2} = A_{2i+1} (A_{2i} x_{2i} + b_{2i}) + b_{2i+1}
    A_pair = A_odd * A_even if diagonal else mm(A_odd, A_even)
    b_pair = _apply(A_odd, b_even, diagonal) + b_odd
    evens = _affine(A_pair, b_pair, x0, diagonal)  # x_2, x_4, ..., x_{2 half}
    starts = torch.cat([x0.expand(evens.shape[1:]).unsqueeze(0), evens[:-1]])
    odds = _apply(A_even, starts, diagonal) + b_even  # x_1, x_3, ..., x_{2 half - 1}
    states = torch.stack([odds, evens], dim=1).flatten(0, 1)
    if num % 2:
        last = _apply(A[-1], states[-1], diagonal) + b[-1]
        states = torch.cat([states, last.unsqueeze(0)])
    return states


__all__ = ["affine_scan", "associative_scan"]
