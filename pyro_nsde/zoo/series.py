r"""Datasets of many series, each observed at its own times, laid out on time grids.

A path site ``EulerMaruyama(..., times)`` needs one grid per batch: a common grid ``(K+1,)``
for all series, or per-series grids ``(N, K+1)`` with the same number of steps ``K``. Series
observed at their own times ``τ_{i,1} < ... < τ_{i,n_i}`` are placed on such grids:

- :func:`common_grid`: the union of all observation times, optionally refined so that no step
  exceeds ``max_step``. Every observation falls on a grid point; series are simply unobserved
  at the other series' times. Simple, and the only choice when series interact.
- :func:`series_grids`: each series gets its own grid of exactly ``K`` steps through its own
  observation times, the extra points spread so that the largest step is as small as
  possible. Better when observation times differ a lot (no series pays for the others' times).

:class:`GriddedSeries` holds the result as tensors a model consumes directly: ``times``,
``values`` ``(N, K+1, D)`` (zero where unobserved) and a boolean ``mask`` of the same shape,
so that the observation site of a model is one masked, vectorized statement::

    def model(data):
        with pyro.plate("series", data.num_series, subsample_size=64):
            batch = data.subsample()  # this minibatch's times, values and mask
            x = pyro.sample("x", EulerMaruyama(drift, diffusion, init, batch.times))
            pyro.sample("y", dist.Normal(x @ H, 0.1).mask(batch.mask).to_event(2),
                        obs=batch.values)
"""

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyro
import torch

from ..sde.checks import check_positive_int


@dataclass(frozen=True)
class GriddedSeries:
    """``N`` series on a time grid, with the points where each was observed.

    :param torch.Tensor times: the grid, ``(K+1,)`` common or ``(N, K+1)`` per series.
    :param torch.Tensor values: ``(N, K+1, D)`` observed values, ``0`` where unobserved.
    :param torch.Tensor mask: ``(N, K+1, D)`` boolean, ``True`` where observed.
    """

    times: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        values, mask, times = self.values, self.mask, self.times
        if values.dim() != 3:
            raise ValueError(f"values must have shape (N, K+1, D), but got {tuple(values.shape)}")
        if mask.shape != values.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(values.shape)}, but got "
                f"{mask.dtype} of shape {tuple(mask.shape)}"
            )
        expected = ((values.shape[1],), values.shape[:2])
        if times.shape not in expected:
            raise ValueError(
                f"times must have shape {expected[0]} or {tuple(expected[1])}, "
                f"but got {tuple(times.shape)}"
            )

    @property
    def num_series(self) -> int:
        return self.values.shape[0]

    @property
    def num_steps(self) -> int:
        """``K``."""
        return self.values.shape[1] - 1

    @property
    def obs_dim(self) -> int:
        """``D``."""
        return self.values.shape[2]

    @property
    def observed(self) -> torch.Tensor:
        """``(N, K+1)`` boolean: where at least one coordinate was observed."""
        return self.mask.any(-1)

    def __getitem__(self, index) -> "GriddedSeries":
        """The series selected by ``index`` (an int, slice or index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        times = self.times if self.times.dim() == 1 else self.times[index]
        return GriddedSeries(times, self.values[index], self.mask[index])

    def subsample(self) -> "GriddedSeries":
        """This data seen from inside ``pyro.plate`` contexts: each tensor is passed through
        ``pyro.subsample`` (the series axis is a batch dim), so under
        ``pyro.plate(..., subsample_size=n)`` only the current minibatch remains. Outside any
        plate it returns the same data."""
        times = self.times
        if times.dim() == 2:
            times = pyro.subsample(times, event_dim=1)
        return GriddedSeries(
            times,
            pyro.subsample(self.values, event_dim=2),
            pyro.subsample(self.mask, event_dim=2),
        )

    @classmethod
    def from_series(
        cls,
        times: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        *,
        max_step: float | None = None,
        num_steps: int | None = None,
        start: float | None = None,
        end: float | None = None,
    ) -> "GriddedSeries":
        """Lay out series observed at their own times on grids.

        :param times: ``N`` tensors ``(n_i,)`` of strictly increasing observation times.
        :param values: ``N`` tensors ``(n_i, D)`` (or ``(n_i,)`` for ``D = 1``); ``NaN``
            marks a coordinate that was not observed.
        :param float max_step: refine the common grid so that no step exceeds it.
        :param int num_steps: if given, build per-series grids of ``K = num_steps`` steps
            (:func:`series_grids`) instead of a common grid (:func:`common_grid`).
        :param float start: the first grid time (default: the earliest observation).
        :param float end: the last grid time (default: the latest observation).
        """
        if num_steps is None:
            grid, index = common_grid(times, max_step=max_step, start=start, end=end)
        else:
            if max_step is not None:
                raise ValueError("pass max_step (common grid) or num_steps (per series), not both")
            grid, index = series_grids(times, num_steps, start=start, end=end)
        table, mask = place_on_grid(values, index, grid.shape[-1])
        return cls(grid, table, mask)


def _check_times(times: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(times, torch.Tensor) and times.dim() == 2:
        times = list(times)
    if len(times) == 0:
        raise ValueError("times must hold at least one series, but got none")
    checked = []
    for i, t in enumerate(times):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"times[{i}] must be a non-empty 1-D tensor, but got {shape}")
        if not t.is_floating_point():
            raise TypeError(f"times[{i}] must be floating point, but got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"times[{i}] must be finite")
        if (t[1:] <= t[:-1]).any():
            j = int((t[1:] <= t[:-1]).nonzero()[0, 0])
            raise ValueError(
                f"times[{i}] must be strictly increasing, but times[{i}][{j + 1}] = "
                f"{float(t[j + 1]):g} <= times[{i}][{j}] = {float(t[j]):g}"
            )
        checked.append(t)
    return checked


def _span(times, start, end):
    lo = min(float(t[0]) for t in times)
    hi = max(float(t[-1]) for t in times)
    if start is not None:
        if start > lo:
            raise ValueError(f"start must be <= the earliest observation time {lo:g}, got {start}")
        lo = float(start)
    if end is not None:
        if end < hi:
            raise ValueError(f"end must be >= the latest observation time {hi:g}, got {end}")
        hi = float(end)
    if not hi > lo:
        raise ValueError(f"the grid needs end > start, but got start = {lo:g}, end = {hi:g}")
    return lo, hi


def _subdivide(points: torch.Tensor, counts: torch.Tensor):
    """Split each gap ``[p_j, p_{j+1}]`` into ``counts[j]`` equal steps.

    :returns: the refined grid and the new position of each original point.
    """
    gaps = points[1:] - points[:-1]
    left = points[:-1].repeat_interleave(counts)
    width = gaps.repeat_interleave(counts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    within = torch.arange(int(counts.sum()), device=points.device) - offsets[:-1].repeat_interleave(
        counts
    )
    refined = torch.cat([left + width * within / counts.repeat_interleave(counts), points[-1:]])
    return refined, offsets


def common_grid(
    times: Sequence[torch.Tensor],
    *,
    max_step: float | None = None,
    start: float | None = None,
    end: float | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""One grid for all series: the union of their observation times (plus ``start`` and
    ``end``), each gap then split into ``ceil(gap / max_step)`` equal steps.

    Times closer than ``1e-9`` of the span are the same grid point.

    :param times: ``N`` tensors ``(n_i,)`` of strictly increasing times (or an ``(N, n)``
        tensor).
    :param float max_step: the largest step allowed (default: no refinement).
    :param float start: the first grid time (default: the earliest observation).
    :param float end: the last grid time (default: the latest observation).
    :returns: ``(grid, index)``: the grid ``(K+1,)`` and, per series, the ``(n_i,)`` long
        tensor of grid positions with ``grid[index[i]] == times[i]``.
    """
    times = _check_times(times)
    lo, hi = _span(times, start, end)
    tol = 1e-9 * (hi - lo)
    every = torch.cat([times[0].new_tensor([lo, hi]), *times]).sort().values
    points = every[torch.cat([every.new_ones(1, dtype=torch.bool), every.diff() > tol])]
    index = [torch.searchsorted(points, t + tol, right=True) - 1 for t in times]
    if max_step is not None:
        if not max_step > 0:
            raise ValueError(f"max_step must be > 0, but got {max_step!r}")
        counts = ((points.diff() / max_step) - 1e-9).ceil().long().clamp(min=1)
        points, position = _subdivide(points, counts)
        index = [position[i] for i in index]
    return points, index


def series_grids(
    times: Sequence[torch.Tensor],
    num_steps: int,
    *,
    start: float | None = None,
    end: float | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""A grid of exactly ``K = num_steps`` steps for each series, through its own times.

    Series ``i``'s grid runs from ``start`` to ``end`` through its observation times; its
    ``K`` steps are shared out among its gaps ``g_j`` as ``c_j ≥ 1`` equal sub-steps with
    ``Σ c_j = K``, making the largest step ``max_j g_j / c_j`` as small as possible (each
    gap first gets its proportional share, rounded down, then the remaining steps go one at a
    time to the gap with the largest current step).

    :param times: ``N`` tensors ``(n_i,)`` of strictly increasing times (or ``(N, n)``).
    :param int num_steps: ``K``; at least the number of gaps of every series.
    :param float start: the first time of every grid (default: the earliest observation of
        all series).
    :param float end: the last time of every grid (default: the latest observation).
    :returns: ``(grids, index)``: ``(N, K+1)`` grids and, per series, the ``(n_i,)`` long
        tensor of grid positions with ``grids[i, index[i]] == times[i]``.
    """
    times = _check_times(times)
    lo, hi = _span(times, start, end)
    grids, index = [], []
    for i, t in enumerate(times):
        inner = t[(t > lo) & (t < hi)]
        points = torch.cat([t.new_tensor([lo]), inner, t.new_tensor([hi])])
        gaps = points.diff()
        if num_steps < gaps.numel():
            raise ValueError(
                f"num_steps must be >= {gaps.numel()}, the number of gaps of series {i}, "
                f"but got {num_steps}"
            )
        counts = (gaps * (num_steps - gaps.numel()) / (hi - lo)).floor().long() + 1
        heap = [(-float(g) / int(c), j) for j, (g, c) in enumerate(zip(gaps, counts, strict=True))]
        heapq.heapify(heap)
        for _ in range(num_steps - int(counts.sum())):
            _, j = heapq.heappop(heap)
            counts[j] += 1
            heapq.heappush(heap, (-float(gaps[j]) / int(counts[j]), j))
        grid, position = _subdivide(points, counts)
        grids.append(grid)
        index.append(position[torch.searchsorted(points, t)])
    return torch.stack(grids), index


def place_on_grid(
    values: Sequence[torch.Tensor], index: Sequence[torch.Tensor], num_points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter each series' observations to its grid positions.

    :param values: ``N`` tensors ``(n_i, D)`` or ``(n_i,)``; ``NaN`` marks a missing
        coordinate.
    :param index: ``N`` long tensors ``(n_i,)`` of grid positions.
    :param int num_points: ``K + 1``.
    :returns: ``(table, mask)``, both ``(N, K+1, D)``: values (``0`` where unobserved) and
        ``True`` where observed.
    """
    if len(values) != len(index):
        raise ValueError(
            f"values must hold one tensor per series ({len(index)}), but holds {len(values)}"
        )
    values = [v.unsqueeze(-1) if v.dim() == 1 else v for v in values]
    dims = {v.shape[-1] for v in values}
    if len(dims) != 1:
        raise ValueError(f"every series must have the same number of columns, but got {dims}")
    (dim,) = dims
    first = values[0]
    table = first.new_zeros(len(values), num_points, dim)
    mask = torch.zeros(len(values), num_points, dim, dtype=torch.bool, device=first.device)
    for i, (v, idx) in enumerate(zip(values, index, strict=True)):
        if v.dim() != 2 or v.shape[0] != idx.shape[0]:
            raise ValueError(
                f"values[{i}] must have shape ({idx.shape[0]}, {dim}) to match its "
                f"{idx.shape[0]} times, but got {tuple(v.shape)}"
            )
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"series {i} has two observations on the same grid point")
        seen = ~torch.isnan(v)
        table[i, idx] = torch.where(seen, v, v.new_zeros(()))
        mask[i, idx] = seen
    return table, mask


def minibatches(
    num_series: int, batch_size: int, *, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """One epoch of random minibatches: index tensors that partition ``range(num_series)``.

    Use them as ``pyro.plate("series", N, subsample=index)`` in the model, and give the guide
    the same plate (``GirsanovGuide(..., create_plates=...)``): a plate's own random
    ``subsample_size`` is drawn by the guide and replayed in the model, but an explicit
    ``subsample`` is not, so model and guide must both receive it.

    :param int num_series: ``N``.
    :param int batch_size: the size of every minibatch but possibly the last.
    :param torch.Generator generator: the random source of the permutation.
    """
    check_positive_int("batch_size", batch_size)
    order = torch.randperm(num_series, generator=generator)
    for k in range(math.ceil(num_series / batch_size)):
        yield order[k * batch_size : (k + 1) * batch_size]


__all__ = [
    "GriddedSeries",
    "common_grid",
    "minibatches",
    "place_on_grid",
    "series_grids",
]
