r"""Data-parallel stochastic variational inference on :mod:`torch.distributed`.

``P`` processes (launched with ``torchrun --nproc_per_node=P``) each hold a shard of the ``N``
series. Process ``i`` holds ``n_i`` of them, passed to the model as the *global* indices of a
subsampled plate, ``pyro.plate("series", N, subsample=idx)``, so Pyro scales the shard's
per-series log densities by ``N / n_i``. With global latents and parameters ``θ`` and local
(per-series) terms ``ℓ_s``, the loss of process ``i`` is

    ``L_i = -[g(θ_i) + (N / n_i) Σ_{s ∈ shard i} ℓ_s]``,

an unbiased estimate of the negative full-data ELBO ``-[g + Σ_{s=1}^{N} ℓ_s]``. The processes
combine their gradients with the weights ``w_i = n_i / N`` (the shard fractions, ``Σ_i w_i = 1``;
``w_i = 1 / P`` for equal shards, i.e. a plain average) in one all-reduce:

    ``∇L = Σ_i w_i ∇L_i = -[Σ_i w_i ∇g(θ_i) + Σ_{s=1}^{N} ∇ℓ_s]``,

which is exactly the gradient of a full-data ELBO estimate: every series enters once with
weight one and the global terms are averaged over ``P`` independent draws. Every process then
applies the same optimizer step to the same averaged gradient, so the parameters stay identical
(bit for bit) on every process. Per-series parameters (an ``"affine"`` control, the ``x_0``
posterior of each series) are replicated with their full ``N`` rows on every process; each
process's gradient is non-zero only on its own rows.

Lazily created parameters (an :class:`~pyro.infer.autoguide.AutoGuide` builds them from its
first trace of the model, with random initial values and from the shard's own series) differ
between processes, so before the first step :meth:`DataParallelSVI.synchronize` creates them
with one pass of guide and model and broadcasts every value from process 0.

Typical use, on every process::

    torch.distributed.init_process_group("gloo")  # "nccl" for CUDA
    idx = shard_indices(N, device=y.device)        # this process's series
    def model(y, idx):
        ...
        with pyro.plate("series", N, subsample=idx, dim=-1):
            ...
    plates = lambda y, idx: pyro.plate("series", N, subsample=idx, dim=-1)
    guide = GirsanovGuide(model, control="affine", create_plates=plates)
    svi = DataParallelSVI(model, guide, optim, Trace_ELBO(), shard_fraction=len(idx) / N)
    for step in range(num_steps):
        loss = svi.step(y[idx], idx)  # the full-data loss estimate, equal on every process

The guide must subsample its plates with the same indices as the model (``create_plates``);
the default plates of an :class:`~pyro.infer.autoguide.AutoGuide` draw random indices. On CUDA,
pass controls built on the device (``control=AffineControl(K, d, batch_shape=(N,)).to(device)``,
as ``tutorials/distributed_svi.py`` does): the guide builds its own controls on the default
device.

**References:**

[1] Shen Li et al. (2020), "PyTorch Distributed: Experiences on Accelerating Data Parallel
    Training", VLDB.
[2] Matthew D. Hoffman, David M. Blei, Chong Wang, John Paisley (2013), "Stochastic
    Variational Inference", JMLR.
"""

import math

import torch
import torch.distributed as dist
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import torch_item, zero_grads

from ..sde.checks import check_positive_int


def shard_indices(num_series: int, *, process_group=None, device=None) -> torch.Tensor:
    """The global indices of this process's series: a contiguous block of ``range(num_series)``.

    Process ``i`` of ``P`` gets ``n_i = ⌊N / P⌋`` or ``⌈N / P⌉`` series (the first
    ``N mod P`` processes get one more); the blocks cover ``range(N)`` once, in rank order.
    Without an initialized process group (one process) it returns ``arange(N)``.

    :param int num_series: ``N``, the global number of series.
    :param process_group: the :mod:`torch.distributed` group (default: the default group).
    :param device: device of the returned indices (put them where the data is).
    :returns: a ``LongTensor`` of shape ``(n_i,)``.
    """
    check_positive_int("num_series", num_series)
    rank, world_size = _rank_and_size(process_group)
    if world_size > num_series:
        raise ValueError(
            f"num_series must be at least the number of processes ({world_size}), "
            f"but got {num_series}"
        )
    base, extra = divmod(num_series, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    return torch.arange(start, stop, device=device)


class DataParallelSVI(SVI):
    r""":class:`~pyro.infer.SVI` with gradients combined across :mod:`torch.distributed`
    processes, each holding a shard of the series (see the module docstring for the maths).

    One :meth:`step` on process ``i``: compute ``L_i`` and its gradients with ``loss``; weight
    them by ``w_i`` (``shard_fraction``); sum ``w_i ∇L_i`` and ``w_i L_i`` over processes in one
    all-reduce per device and dtype; apply ``optim`` to the sum. It returns ``Σ_i w_i L_i``, the
    full-data loss estimate, on every process. The first step (or an explicit
    :meth:`synchronize`) creates the parameters and broadcasts them from process 0.

    Every process must call :meth:`step` the same number of times, with arguments that reach
    the same parameters (the model and guide see only their shard). Collectives run on the
    device of the parameters: CPU tensors with ``gloo``, CUDA tensors with ``nccl`` (then call
    ``torch.cuda.set_device`` and put the data and modules on that device first). Without an
    initialized process group it is plain :class:`~pyro.infer.SVI` on one process.

    :param callable model: the model; its plates over series take the shard's global indices
        (``pyro.plate(name, N, subsample=idx)``).
    :param callable guide: the guide, subsampling with the same indices.
    :param pyro.optim.PyroOptim optim: the optimizer (one per process; it sees the same
        gradients everywhere, so its state stays identical too).
    :param pyro.infer.ELBO loss: e.g. :class:`~pyro.infer.Trace_ELBO`.
    :param process_group: the :mod:`torch.distributed` group (default: the default group).
    :param float shard_fraction: ``w_i = n_i / N``, this process's share of the series of the
        subsampled plates; the fractions must sum to one over processes. Default ``1 / P``
        (equal shards).
    """

    def __init__(self, model, guide, optim, loss, *, process_group=None, shard_fraction=None):
        super().__init__(model, guide, optim, loss)
        self.process_group = process_group
        self.rank, self.world_size = _rank_and_size(process_group)
        if shard_fraction is None:
            shard_fraction = 1.0 / self.world_size
        elif not (isinstance(shard_fraction, (int, float)) and 0 < shard_fraction <= 1):
            raise ValueError(
                f"shard_fraction must be a number in (0, 1] (this process's share n_i / N of "
                f"the series), but got {shard_fraction!r}"
            )
        self.shard_fraction = float(shard_fraction)
        self._param_names = None
        self._device = None

    def synchronize(self, *args, **kwargs) -> None:
        """Create every parameter of guide and model and broadcast them from process 0.

        Runs the guide and the model (replayed on the guide's draws) once without gradients,
        which creates lazily built parameters and consumes random numbers; then checks that
        every process has the same parameters (names, shapes, dtypes) and that the shard
        fractions sum to one. Called by the first :meth:`step` if not called before.
        """
        with torch.no_grad(), poutine.trace(param_only=True) as capture:
            guide_trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
            poutine.replay(self.model, trace=guide_trace)(*args, **kwargs)
        names, params = _traced_params(capture.trace)
        if not params:
            raise ValueError("model and guide created no parameters; there is nothing to train")
        layout = [
            (name, tuple(p.shape), str(p.dtype)) for name, p in zip(names, params, strict=True)
        ]
        gathered = [(layout, self.shard_fraction)]
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(
                gathered, (layout, self.shard_fraction), group=self.process_group
            )
        for rank, (other, _) in enumerate(gathered):
            if other != layout:
                differing = sorted(set(other) ^ set(layout))[:4]
                raise RuntimeError(
                    f"processes {rank} and {self.rank} built different parameters; "
                    f"(name, shape, dtype) entries held by only one of them: {differing}"
                )
        fractions = [fraction for _, fraction in gathered]
        if not math.isclose(sum(fractions), 1.0, rel_tol=1e-6):
            raise ValueError(
                f"shard_fraction must sum to 1 over processes, but the processes passed "
                f"{fractions} (sum {sum(fractions)})"
            )
        if self.world_size > 1:
            with torch.no_grad():
                _flat_collective(
                    params,
                    lambda flat: dist.broadcast(flat, group_src=0, group=self.process_group),
                )
        self._param_names = frozenset(names)
        self._device = params[0].device

    def step(self, *args, **kwargs) -> float:
        """Take one data-parallel gradient step; returns ``Σ_i w_i L_i`` (the same on every
        process). Arguments go to model and guide (this process's shard)."""
        if self._param_names is None:
            self.synchronize(*args, **kwargs)
        with poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        names, params = _traced_params(capture.trace)
        unsynchronized = sorted(set(names) - self._param_names)
        if unsynchronized:
            raise RuntimeError(
                f"parameters {unsynchronized} were created after synchronize(); call "
                f"synchronize() with arguments that reach every parameter"
            )
        loss = self._combine(_scalar_loss(loss), params)
        self.optim(params)
        zero_grads(params)
        return loss

    def evaluate_loss(self, *args, **kwargs) -> float:
        """``Σ_i w_i L_i`` without a step (the same on every process)."""
        if self._param_names is None:
            self.synchronize(*args, **kwargs)
        with torch.no_grad():
            loss = self.loss(self.model, self.guide, *args, **kwargs)
        return self._combine(_scalar_loss(loss), [])

    def _combine(self, loss: float, params) -> float:
        """All-reduce ``w_i L_i`` and, in place, the gradients ``w_i ∇L_i`` of ``params``;
        return ``Σ_i w_i L_i``.

        A parameter without a gradient on this process contributes zeros; it is left without a
        gradient (so not stepped, as in :class:`SVI`) only if it has none on any process.
        """
        weight = self.shard_fraction
        has_grad = [float(p.grad is not None) for p in params]
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.mul_(weight))
        scalars = torch.tensor([weight * loss, *has_grad], dtype=torch.float64, device=self._device)
        if self.world_size > 1:
            _flat_collective(
                grads + [scalars], lambda flat: dist.all_reduce(flat, group=self.process_group)
            )
        for p, count in zip(params, scalars[1:].tolist(), strict=True):
            if count == 0:
                p.grad = None
        return scalars[0].item()


def _rank_and_size(process_group):
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    if process_group is not None:
        raise ValueError(
            "process_group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first"
        )
    return 0, 1


def _traced_params(trace):
    """``(names, unconstrained parameters)`` of a ``param_only`` trace, sorted by name (the same
    order on every process, as collectives require)."""
    names = sorted(trace.nodes)
    return names, [trace.nodes[name]["value"].unconstrained() for name in names]


def _scalar_loss(loss) -> float:
    if isinstance(loss, tuple):
        raise TypeError(
            f"DataParallelSVI needs a loss that returns one number, but it returned a tuple of "
            f"{len(loss)}"
        )
    return torch_item(loss)


def _flat_collective(tensors, collective) -> None:
    """Run the in-place ``collective`` on ``tensors`` packed into one flat buffer per
    ``(device, dtype)`` (few large messages instead of one per tensor), then unpack."""
    groups = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group in groups.values():
        flat = torch.cat([tensor.reshape(-1) for tensor in group])
        collective(flat)
        chunks = flat.split([tensor.numel() for tensor in group])
        for tensor, chunk in zip(group, chunks, strict=True):
            tensor.copy_(chunk.view_as(tensor))


__all__ = ["DataParallelSVI", "shard_indices"]
