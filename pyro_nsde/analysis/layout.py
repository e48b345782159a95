"""The dims and coordinates of a model's sites in ArviZ: paths as ``(..., time, state)``."""

import numpy as np
import torch


def squeeze_grid(times: torch.Tensor) -> torch.Tensor:
    """A grid without leading singleton dims: ``(K+1,)`` or ``(*series, K+1)``."""
    times = times.detach()
    while times.dim() > 1 and times.shape[0] == 1:
        times = times[0]
    return times


def default_layout(sites: dict):
    """Default dims of every site (path sites end in ``time``/``state`` dims, shared by all
    path sites with the same grid and state dimension) and the ``time`` coordinates."""
    dims, coords = {}, {}
    first = None
    for name, site in sites.items():
        dims[name] = list(site.dims)
        if site.path is None:
            continue
        times = squeeze_grid(site.path.times)
        if first is None:
            first = (times, site.path.state_dim)
        same_grid = times.shape == first[0].shape and bool((times == first[0]).all())
        time_dim = "time" if same_grid else f"{name}_time"
        state_dim = "state" if site.path.state_dim == first[1] else f"{name}_state"
        dims[name][-2:] = [time_dim, state_dim]
        if times.dim() == 1:
            coords[time_dim] = times.cpu().numpy()
    return dims, coords


def grid_coordinate(times: torch.Tensor, dims, shape) -> tuple | None:
    """For a path variable with ``dims`` and per-draw ``shape`` ``(*series, T, d)`` on a grid per
    series ``times`` ``(..., T)``: the coordinate ``"{time_dim}_value"`` over
    ``(*series dims, time_dim)`` holding each series' times, as ``(name, dims, values)``.
    ``None`` for a shared grid ``(T,)``."""
    times = squeeze_grid(times)
    if times.dim() == 1:
        return None
    grid_ndim = times.dim() - 1
    coord_dims = tuple(dims[len(dims) - 2 - grid_ndim : len(dims) - 1])
    expanded = times.expand(tuple(shape[len(shape) - 2 - grid_ndim : -1]))
    return f"{dims[-2]}_value", coord_dims, expanded.cpu().numpy()


def check_dims(sites: dict, dims: dict):
    for name, names in dims.items():
        if name in sites and len(names) != len(sites[name].shape):
            raise ValueError(
                f"dims[{name!r}] must name the {len(sites[name].shape)} dims of a draw of site "
                f"{name!r} (shape {tuple(sites[name].shape)}), but got {list(names)}"
            )


def flat_coords(name: str, dims: list, mask: torch.Tensor, coords: dict) -> dict:
    """Coordinates ``"{site}_obs_{dim}"`` over the flattened observed entries of a masked site:
    the label (or index) of each entry along each original dim."""
    index = mask.nonzero(as_tuple=True)
    out = {}
    for dim, positions in zip(dims, index, strict=True):
        positions = positions.cpu().numpy()
        labels = np.asarray(coords[dim])[positions] if dim in coords else positions
        out[f"{name}_obs_{dim}"] = ((f"{name}_obs",), labels)
    return out


__all__ = ["check_dims", "default_layout", "flat_coords", "grid_coordinate", "squeeze_grid"]
