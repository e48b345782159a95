"""The time grid ``t_0 < ... < t_K`` of a discretized path, and its two layouts.

Sequential code (simulation) sees one step at a time: ``t_k`` and ``h_k = t_{k+1} - t_k`` shaped
``grid_batch + (1,)`` so that they broadcast against a state ``x`` of shape ``(..., d)``.
Vectorized code (``log_prob``) puts the step axis *leftmost*: states become ``(K, ..., d)`` and
``t``, ``h`` become ``(K, 1, ..., 1, *grid_batch, 1)``. Leftmost is the only place a new axis can
go without breaking user callables, whose parameters broadcast from the right (as Pyro's own
particle and plate dims do).
"""

import torch

_ATTR = "_pyro_nsde_grid"


def time_first(tensor: torch.Tensor, ndim: int) -> torch.Tensor:
    """Insert singleton dims after the leading step axis so ``tensor`` has ``ndim`` dims."""
    missing = ndim - tensor.dim()
    if missing <= 0:
        return tensor
    return tensor.reshape(tensor.shape[:1] + (1,) * missing + tensor.shape[1:])


def _index(index) -> str:
    return ", ".join(map(str, index))


class TimeGrid:
    """A strictly increasing grid of ``K + 1`` times, shared ``(K+1,)`` or per series
    ``(..., K+1)``.

    :param torch.Tensor times: the grid.
    :param bool validate: check that it is finite and strictly increasing.
    """

    def __init__(self, times, validate: bool = True):
        if not isinstance(times, torch.Tensor):
            raise TypeError(f"times must be a torch.Tensor, but got {type(times).__name__}")
        if times.dim() < 1 or times.shape[-1] < 2:
            raise ValueError(
                f"times must have shape (..., K+1) with K+1 >= 2 points, "
                f"but got shape {tuple(times.shape)}"
            )
        if not times.is_floating_point():
            raise TypeError(f"times must be a floating point tensor, but got {times.dtype}")
        if validate:
            if not torch.isfinite(times).all():
                raise ValueError("times must be finite, but got non-finite values")
            steps = times[..., 1:] - times[..., :-1]
            if not (steps > 0).all():
                before = (steps <= 0).nonzero()[0].tolist()
                after = before[:-1] + [before[-1] + 1]
                raise ValueError(
                    f"times must be strictly increasing, but times[{_index(after)}] = "
                    f"{float(times[tuple(after)]):g} <= times[{_index(before)}] = "
                    f"{float(times[tuple(before)]):g}"
                )
        self.times = times
        self.validated = validate
        self.version = times._version
        self.num_steps = times.shape[-1] - 1
        self.batch_shape = times.shape[:-1]
        self.h = times[..., 1:] - times[..., :-1]
        # Step-major views with a trailing singleton, for the sequential loop.
        self._t_steps = times[..., :-1].unsqueeze(-1).movedim(-2, 0)
        self._h_steps = self.h.unsqueeze(-1).movedim(-2, 0)
        self._steps = None

    @classmethod
    def of(cls, times, validate: bool = True) -> "TimeGrid":
        """The grid of ``times``, reused across calls with the same (unmodified) tensor, so
        that a model called at every SVI step validates and splits its grid once."""
        grid = getattr(times, _ATTR, None)
        if grid is None or grid.version != times._version or (validate and not grid.validated):
            grid = cls(times, validate)
            setattr(times, _ATTR, grid)
        return grid

    def step(self, k: int):
        """``(t_k, h_k, sqrt(h_k))``, each of shape ``grid_batch + (1,)``."""
        if self._steps is None:  # split once, on first use
            self._steps = list(
                zip(
                    self._t_steps.unbind(0),
                    self._h_steps.unbind(0),
                    self._h_steps.sqrt().unbind(0),
                    strict=True,
                )
            )
        return self._steps[k]

    def stacked(self, ndim: int):
        """``(t, h)`` of shape ``(K, 1, ..., 1, *grid_batch, 1)`` with ``ndim`` dims."""
        return time_first(self._t_steps, ndim), time_first(self._h_steps, ndim)
