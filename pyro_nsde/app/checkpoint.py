"""Saving a training run and resuming it, in the same or a fresh process, on the same trajectory.

A run of ``SVI(model, guide, optim, elbo)`` is determined by four pieces of state; a checkpoint
holds all of them:

==================  =========================================================================
state               what it holds
==================  =========================================================================
parameters          every ``pyro.param`` of the run, unconstrained (Pyro's param store: the
                    guide's controls, ``x_0`` posteriors and mean-field sites, and any model
                    parameters)
optimizer           the per-parameter state of the :class:`~pyro.optim.PyroOptim` (Adam's
                    moments and step counts, a decayed learning rate)
random state        the ``torch``, ``random`` and ``numpy`` generators (CPU), so the next step
                    draws the particles the uninterrupted run would have drawn
guide buffers       ``guide.state_dict()``: buffers of the guide's modules (e.g. an encoder's
                    batch-norm statistics) that are not parameters
==================  =========================================================================

plus the ELBO's ``max_plate_nesting`` (which a ``vectorize_particles=True`` ELBO guesses by
running the model once, drawing random numbers, on its first step) and user metadata.

**Resuming.** Code (the model, callables, modules) is not saved: the new process builds the
model, guide, optimizer and ELBO as before, *calls the guide once on the data* so that it
creates its lazily built modules (that call draws random numbers, which is why it must come
before loading the random state), then loads::

    guide = GirsanovGuide(model, control="mlp")
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.999})
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True)
    svi = SVI(model, guide, optim, elbo)
    guide(y)                                   # build the guide's parameters
    meta = load_checkpoint("run.pt", optim=optim, guide=guide, elbo=elbo)
    for step in range(meta["step"], num_steps):
        svi.step(y)

Parameters that already exist are overwritten *in place*: a ``torch.nn.Module`` inside a
``PyroModule`` guide (e.g. a :class:`~pyro_nsde.ControlNet`) keeps computing with its own
tensors, so replacing the param store's tensors (``pyro.get_param_store().set_state``) would
leave it training tensors the network never reads.

A checkpoint is a ``torch.save`` pickle (constraints and random states are Python objects):
load only files you trust. Generators of accelerators (CUDA) are not saved.
"""

import os
import pickle
import types

import pyro
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.optim import PyroOptim
from pyro.util import get_rng_state, set_rng_state

_FORMAT = "pyro_nsde.checkpoint/1"

#: Classes that checkpoints written before the package layout of issue 21 pickled under other
#: names: ``(old module, old name) -> (module, name)``.
MOVED_CLASSES = {
    ("pyro_nsde.controls", "_Scaled"): ("pyro_nsde.posterior.constraints", "ScaledConstraint"),
}


class _Unpickler(pickle.Unpickler):
    """Reads classes at the names :data:`MOVED_CLASSES` gives them now."""

    def find_class(self, module, name):
        return super().find_class(*MOVED_CLASSES.get((module, name), (module, name)))


# The pickle module that torch.load is given: the standard one with that unpickler.
_PICKLE = types.SimpleNamespace(**{**vars(pickle), "Unpickler": _Unpickler})


def save_checkpoint(path, *, optim: PyroOptim | None = None, guide=None, elbo=None, **metadata):
    """Write the state of a training run to ``path`` (atomically: a crash never leaves a
    half-written file under ``path``).

    :param path: a file name.
    :param PyroOptim optim: the optimizer whose state to save (omit for inference-only use).
    :param guide: the guide; if it is a ``torch.nn.Module`` its ``state_dict()`` is saved.
    :param elbo: the ELBO; its ``max_plate_nesting`` is saved.
    :param metadata: anything picklable to store alongside (e.g. ``step=1000``), returned by
        :func:`load_checkpoint`.
    """
    state = {
        "format": _FORMAT,
        "params": pyro.get_param_store().get_state(),
        "optim": None if optim is None else optim.get_state(),
        "rng": get_rng_state(),
        "guide": guide.state_dict() if isinstance(guide, torch.nn.Module) else None,
        "max_plate_nesting": None if elbo is None else elbo.max_plate_nesting,
        "metadata": metadata,
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path, *, optim: PyroOptim | None = None, guide=None, elbo=None, restore_rng: bool = True
) -> dict:
    """Restore the state written by :func:`save_checkpoint`.

    :param path: a file written by :func:`save_checkpoint`.
    :param PyroOptim optim: a *fresh* optimizer (no step taken yet) to receive the saved state.
    :param guide: the guide, already called once on the data (an
        :class:`~pyro.infer.autoguide.AutoGuide` is checked for this); its buffers are restored.
    :param elbo: the ELBO, whose ``max_plate_nesting`` is restored.
    :param bool restore_rng: restore the random generators (needed to continue on the same
        trajectory; set ``False`` to continue with fresh randomness).
    :returns: the metadata passed to :func:`save_checkpoint`.
    """
    if isinstance(guide, AutoGuide) and guide.prototype_trace is None:
        raise ValueError(
            "guide has not built its parameters yet: call guide(*args, **kwargs) once on the "
            "data before load_checkpoint"
        )
    if optim is not None and optim.optim_objs:
        raise ValueError(
            f"optim must be a fresh optimizer, but it already holds state for "
            f"{len(optim.optim_objs)} parameters"
        )
    state = torch.load(path, weights_only=False, pickle_module=_PICKLE)
    if not (isinstance(state, dict) and state.get("format") == _FORMAT):
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint written by save_checkpoint")
    _load_params(state["params"])
    if guide is not None and state["guide"] is not None:
        guide.load_state_dict(state["guide"])
    if optim is not None and state["optim"] is not None:
        optim.set_state(state["optim"])
    if elbo is not None and state["max_plate_nesting"] is not None:
        elbo.max_plate_nesting = state["max_plate_nesting"]
    if restore_rng:
        set_rng_state(state["rng"])
    return state["metadata"]


def _load_params(saved):
    """Copy saved unconstrained values into existing parameters in place; add the others."""
    store = pyro.get_param_store()
    existing = dict(store.named_parameters())
    missing = {"params": {}, "constraints": {}}
    with torch.no_grad():
        for name, value in saved["params"].items():
            if name in existing:
                if existing[name].shape != value.shape:
                    raise ValueError(
                        f"parameter {name!r} has shape {tuple(existing[name].shape)} here but "
                        f"{tuple(value.shape)} in the checkpoint"
                    )
                existing[name].copy_(value)
            else:
                missing["params"][name] = value.requires_grad_()
                missing["constraints"][name] = saved["constraints"][name]
    store.set_state(missing)


__all__ = ["load_checkpoint", "save_checkpoint"]
