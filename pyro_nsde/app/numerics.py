"""Finding where a non-finite SVI loss comes from.

The ELBO estimate of one step is a sum over the sites of a guide trace and of the model replayed
against it,

    ``loss = -Σ_{model sites} log p(value) + Σ_{guide sites} log q(value)``,

so a NaN or infinite loss has a first cause: a parameter, a latent value drawn by the guide (a
path that blew up, a location that became NaN), or a log density that is not finite at finite
values (an observation with zero likelihood, an overflowing rate). :func:`find_nonfinite_site`
walks the traces in execution order — the guide's parameters and samples first, then the
model's — and names the first such quantity. :class:`CheckedSVI` is a drop-in
:class:`~pyro.infer.SVI` that calls it when a step's loss is not finite and raises a
``ValueError`` naming the culprit, *before* the optimizer applies the non-finite gradient.

The diagnosis re-runs the step's traces with the random state the step started from, through the
ELBO's own trace generator, so it sees the same particles as the failed step (same vectorized
particle plate, same draws). It runs with validation disabled, so that a NaN flows to the site
where it first appears instead of stopping at the first distribution whose arguments are checked.
"""

import math
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.elbo import ELBO
from pyro.infer.util import zero_grads
from pyro.util import get_rng_state, set_rng_state


class NonFiniteSite(NamedTuple):
    """The first non-finite quantity of a model/guide pair.

    :param str name: the sample site or parameter name.
    :param str trace: ``"guide"`` or ``"model"``: the program in which it appears.
    :param str kind: ``"param"`` (a parameter's value), ``"value"`` (a latent sample's value)
        or ``"log_prob"`` (a sample site's log density, after ``poutine.mask``/``scale``).
    :param float example: one of its non-finite entries (``nan``, ``inf`` or ``-inf``).
    """

    name: str
    trace: str
    kind: str
    example: float

    def __str__(self) -> str:
        if self.kind == "param":
            return f"parameter {self.name!r} (used by the {self.trace}) is {self.example}"
        what = "value" if self.kind == "value" else "log_prob"
        return f"the {what} of {self.trace} site {self.name!r} is {self.example}"


def _first_nonfinite(tensor) -> float | None:
    if not isinstance(tensor, torch.Tensor):
        return None if math.isfinite(tensor) else float(tensor)
    bad = ~torch.isfinite(tensor.detach())
    if not bool(bad.any()):
        return None
    return float(tensor.detach()[bad].reshape(-1)[0])


def _scan(trace, trace_name: str, seen: set) -> NonFiniteSite | None:
    """The first non-finite parameter, latent value or log density of ``trace``."""
    for name, site in trace.nodes.items():
        if site["type"] == "param":
            if name in seen:
                continue
            seen.add(name)
            example = _first_nonfinite(site["value"])
            if example is not None:
                return NonFiniteSite(name, trace_name, "param", example)
        elif site["type"] == "sample":
            # Observed values are data (NaN may mark masked-out entries); latent values that
            # the model replays from the guide were checked in the guide's trace.
            if not site["is_observed"] and trace_name == "guide":
                example = _first_nonfinite(site["value"])
                if example is not None:
                    return NonFiniteSite(name, trace_name, "value", example)
            example = _first_nonfinite(site["log_prob"])
            if example is not None:
                return NonFiniteSite(name, trace_name, "log_prob", example)
    return None


def _traces(model, guide, args, kwargs, elbo):
    if elbo is not None:
        yield from elbo._get_traces(model, guide, args, kwargs)
        return
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    yield model_trace, guide_trace


def find_nonfinite_site(model, guide, *args, elbo: ELBO | None = None, **kwargs):
    """Name the first non-finite quantity of one ELBO evaluation.

    Traces ``guide(*args, **kwargs)``, replays ``model`` against it, computes every site's
    ``log_prob`` (masked and scaled as in the ELBO) and returns the first non-finite one, in
    this order: for each node of the guide trace, a parameter's value, or a latent sample's
    value and then its ``log_prob``; then, for each node of the model trace, a parameter's
    value or a sample site's ``log_prob`` (observed sites included).

    :param callable model: the Pyro model.
    :param callable guide: the guide.
    :param elbo: optional; if given, its trace generator is used (its particle plate,
        ``num_particles`` traces), so that with the random state of an SVI step the traces are
        those of that step. Otherwise one plain trace is drawn.
    :returns: a :class:`NonFiniteSite`, or ``None`` if every quantity is finite (a non-finite
        loss then comes from the sum overflowing).
    """
    with pyro.validation_enabled(False), torch.no_grad():
        seen = set()
        for model_trace, guide_trace in _traces(model, guide, args, kwargs, elbo):
            guide_trace.compute_log_prob()
            model_trace.compute_log_prob()
            found = _scan(guide_trace, "guide", seen) or _scan(model_trace, "model", seen)
            if found is not None:
                return found
    return None


class CheckedSVI(SVI):
    """:class:`~pyro.infer.SVI` that refuses non-finite losses.

    Identical to ``SVI(model, guide, optim, loss)`` (same random draws, same updates) as long as
    the loss is finite. When a step's loss is NaN or infinite, the gradients of that step are
    discarded (the parameters keep their values from before the step), the step's traces are
    re-run by :func:`find_nonfinite_site` from the random state the step started from, and a
    ``ValueError`` is raised that names the responsible site or parameter.

    :param model: as for :class:`~pyro.infer.SVI`.
    :param guide: as for :class:`~pyro.infer.SVI`.
    :param optim: as for :class:`~pyro.infer.SVI`.
    :param loss: an :class:`~pyro.infer.elbo.ELBO` (its traces are replayed for the
        diagnosis) or a loss callable (then the diagnosis draws one plain trace).
    """

    def __init__(self, model, guide, optim, loss, **kwargs):
        super().__init__(model, guide, optim, loss, **kwargs)
        self._elbo = loss if isinstance(loss, ELBO) else None
        self.loss_and_grads = self._checked(self.loss_and_grads)

    def _checked(self, loss_and_grads):
        def checked_loss_and_grads(model, guide, *args, **kwargs):
            elbo = self._elbo
            if elbo is not None and elbo.vectorize_particles and elbo.max_plate_nesting == math.inf:
                # What the ELBO would do first; done here so the saved random state below is
                # the one its traces start from.
                elbo._guess_max_plate_nesting(model, guide, args, kwargs)
            start = get_rng_state()
            with poutine.trace(param_only=True) as capture:
                loss = loss_and_grads(model, guide, *args, **kwargs)
            values = loss if isinstance(loss, tuple) else (loss,)
            if all(math.isfinite(float(v)) for v in values):
                return loss
            zero_grads({site["value"].unconstrained() for site in capture.trace.nodes.values()})
            after = get_rng_state()
            set_rng_state(start)
            try:
                culprit = find_nonfinite_site(model, guide, *args, elbo=elbo, **kwargs)
                cause = (
                    str(culprit)
                    if culprit is not None
                    else "every site's value and log_prob is finite, so their sum overflowed"
                )
            except (RuntimeError, ValueError) as error:
                # Without validation a NaN can also break a later operation (a Cholesky, say).
                cause = f"the site could not be identified ({type(error).__name__}: {error})"
            finally:
                set_rng_state(after)
            raise ValueError(
                f"SVI loss is {loss}: {cause}. The step was not applied; the parameters keep "
                f"their values from before it."
            )

        return checked_loss_and_grads


__all__ = ["CheckedSVI", "NonFiniteSite", "find_nonfinite_site"]
