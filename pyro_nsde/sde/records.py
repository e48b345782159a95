"""Records attached to simulated paths, so a path's density is never recomputed from scratch.

When a path ``x = T(ξ)`` is simulated, every quantity of its Euler–Maruyama density is already
known: the whitened increments ``z_k`` are ``h_k u_k + sqrt(h_k) S_k ξ_k`` and the diffusion at
each visited state was evaluated to take the step. The simulator attaches these to the returned
tensor. A later ``log_prob(x)`` of a law that *provably* is the one that generated ``x`` (same
drift, diffusion, noise type and grid) reads the record instead of evaluating the drift again on
all ``K`` steps. As functions of every parameter (with ``ξ`` fixed) the recorded and recomputed
densities are the same function, so values *and* gradients agree; this is what lets the model's
``log p(x)`` in ``Trace_ELBO`` cost nothing on a path the Girsanov guide just sampled.

"Provably the same law" is decided by :func:`law_key`: tensors compare by identity or, when
small, by value; Python functions by code object and captured values; modules by identity and
the identity and version of every tensor they hold. Anything else compares by identity. The keys
keep strong references to what they identify, so object ids cannot be reused while a record
lives. A path modified in place (its version counter moved) is never matched.
"""

import functools
import types

import torch

_SMALL = 4096
_ATTR = "_pyro_nsde_record"


class _TensorKey:
    __slots__ = ("tensor", "version")

    def __init__(self, tensor):
        self.tensor = tensor
        self.version = tensor._version

    def __eq__(self, other):
        if not isinstance(other, _TensorKey):
            return False
        a, b = self.tensor, other.tensor
        if a is b:
            return self.version == other.version
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and a.numel() <= _SMALL
            and bool(torch.equal(a.detach(), b.detach()))
        )

    __hash__ = None


class _IdentityKey:
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _IdentityKey) and self.obj is other.obj

    __hash__ = None


def _module_key(module: torch.nn.Module):
    tensors = []
    for sub in module.modules():
        for value in list(sub._parameters.values()) + list(sub._buffers.values()):
            if value is not None:
                tensors.append(_TensorKey(value))
        for value in sub.__dict__.values():
            if isinstance(value, torch.Tensor):
                tensors.append(_TensorKey(value))
    return (_IdentityKey(module), tuple(tensors))


def law_key(obj, depth: int = 0):
    """A comparable key that is equal for two objects only if they compute the same thing."""
    if isinstance(obj, torch.Tensor):
        return _TensorKey(obj)
    if isinstance(obj, (int, float, str, bool, type(None))):
        return obj
    if isinstance(obj, torch.nn.Module):
        return _module_key(obj)
    if depth < 3:
        if isinstance(obj, types.FunctionType):
            cells = []
            for cell in obj.__closure__ or ():
                try:
                    cells.append(law_key(cell.cell_contents, depth + 1))
                except ValueError:  # empty cell
                    cells.append(None)
            return ("function", _IdentityKey(obj.__code__), tuple(cells))
        if isinstance(obj, types.MethodType):
            return ("method", obj.__func__, law_key(obj.__self__, depth + 1))
        if isinstance(obj, functools.partial):
            return (
                "partial",
                law_key(obj.func, depth + 1),
                tuple(law_key(a, depth + 1) for a in obj.args),
                tuple((k, law_key(v, depth + 1)) for k, v in sorted(obj.keywords.items())),
            )
        if isinstance(obj, (tuple, list)):
            return (type(obj).__name__,) + tuple(law_key(a, depth + 1) for a in obj)
    return _IdentityKey(obj)


class PathRecord:
    """What the simulator knew about a path it returned.

    :param path: the simulated path.
    :param key: :func:`law_key` of ``(drift, diffusion, noise_type, times)``.
    :param steps: the stacked per-step quantities of the simulation (see
        :class:`pyro_nsde.sde.euler_maruyama.SimulatedSteps`).
    :param owner: the distribution that sampled the path.
    """

    __slots__ = ("key", "owner", "steps", "version")

    def __init__(self, path, key, steps, owner):
        self.version = path._version
        self.key = key
        self.steps = steps
        self.owner = owner


def attach(path: torch.Tensor, record: PathRecord) -> None:
    setattr(path, _ATTR, record)


def find(path: torch.Tensor):
    record = getattr(path, _ATTR, None)
    if record is None or record.version != path._version:
        return None
    return record
