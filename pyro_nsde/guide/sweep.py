"""Passes over every series of a model whose plates subsample them.

With ``pyro.plate(name, N, subsample_size=n)`` a training step sees ``n`` of the ``N`` series.
What the guide prepares for every series — the reference paths of the Kalman conditional, the
nodes of the hierarchical family — is computed ``n`` series at a time: the guide makes its
plates with the indices of each chunk of series in turn (:meth:`GirsanovGuide.fixed_subsample
<pyro_nsde.GirsanovGuide.fixed_subsample>`), every run of the model it makes is conditioned on
its plates' indices (:func:`indices`; a plate draws them at a sample site named after it), and
the results are written into tensors laid out at the plates' full sizes, from which each step
takes the rows of its subsample.
"""

import itertools

import torch

from ..sde.sites import full_size, is_subsampled


def subsampled(frames) -> list:
    """The frames (``{name: CondIndepStackFrame}``) of subsampled plates."""
    return [frame for frame in frames.values() if is_subsampled(frame)]


def chunks(frames) -> list:
    """Conditioning data ``{plate name: indices}`` for runs that together see every element of
    the subsampled plates among ``frames`` once, a subsample's size at a time (``[{}]``
    without subsampling)."""
    plates = subsampled(frames)
    pieces = [torch.arange(full_size(frame)).split(frame.size) for frame in plates]
    return [
        {frame.name: indices for frame, indices in zip(plates, combination, strict=True)}
        for combination in itertools.product(*pieces)
    ]


def indices(plates) -> dict:
    """Conditioning data for a run of the model on the subsample of the guide's ``plates``
    (``{name: plate}``): ``{name: indices}``."""
    return {name: plate.indices for name, plate in plates.items()}


def take(tensor, stack, plates, event_dims: int):
    """The rows of the plates' current subsample from ``tensor``, laid out at full plate sizes
    (``stack``: the frames of its site, ``event_dims``: its dims right of the plates'). A
    tensor with the subsample's size (or 1) along a plate's dim is returned as it is."""
    for frame in stack:
        dim = frame.dim - event_dims
        if is_subsampled(frame) and tensor.dim() >= -dim and tensor.shape[dim] == full_size(frame):
            tensor = tensor.index_select(dim, plates[frame.name].indices.to(tensor.device))
    return tensor


def put(full, part, stack, plates, event_dims: int):
    """``full`` (laid out at full plate sizes; ``None``: NaN) with the rows of the plates'
    current subsample set to ``part``; ``part`` itself without subsampled plates."""
    frames = [f for f in stack if is_subsampled(f) and part.dim() >= event_dims - f.dim]
    if not frames:
        return part
    if full is None:
        shape = list(part.shape)
        for frame in frames:
            shape[frame.dim - event_dims] = full_size(frame)
        full = torch.full(shape, torch.nan, dtype=part.dtype, device=part.device)
    batch_ndim = part.dim() - event_dims
    index = [torch.arange(size, device=part.device) for size in part.shape[:batch_ndim]]
    for frame in frames:
        index[batch_ndim + frame.dim] = plates[frame.name].indices.to(part.device)
    full = full.clone()
    full[torch.meshgrid(*index, indexing="ij")] = part
    return full


def take_values(values, trace, plates) -> dict:
    """Site values with the rows of the plates' current subsample (values given at full plate
    sizes, such as an ``AutoNormal``'s medians, are indexed; the others kept)."""
    taken = {}
    for name, value in values.items():
        node = trace.nodes.get(name)
        if node is None or node["type"] != "sample":
            taken[name] = value
            continue
        event_dims = len(node["fn"].event_shape)
        taken[name] = take(value, node["cond_indep_stack"], plates, event_dims)
    return taken


__all__ = ["chunks", "indices", "put", "subsampled", "take", "take_values"]
