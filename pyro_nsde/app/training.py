"""Fitting a model and its guide with SVI: the recommended optimizer, particles and schedule.

:func:`fit_svi` is a plain :class:`~pyro.infer.SVI` loop with the settings the tutorials, the
command line and the accuracy measurements use:

- :class:`~pyro.optim.ClippedAdam` whose learning rate decays geometrically from ``lr`` to
  ``final_lr`` over the run (the last iterates settle instead of jittering at full step size),
  gradients clipped at norm 10;
- for a family started at a Laplace approximation (its ``start_scale``, the smallest sd of the
  start, set by :func:`~pyro_nsde.guide.global_laplace.set_family`), location steps of at most
  :data:`LOCATION_RATE` start sds: Adam's steps have the size of the learning rate whatever
  the gradient's, and near a good start the gradients are mostly noise, so a fixed rate of
  0.01 walks a posterior mean with sd 0.02 (a population mean over 1000 series) several sds
  away in its first 20 steps;
- :class:`~pyro.infer.Trace_ELBO` averaging ``num_particles`` vectorized draws;
- a *guide warm-up*: for the first ``warmup`` steps the model's own parameters (``pyro.param``,
  ``pyro.module``: a neural drift or diffusion, a diffusion scale fitted by variational EM) are
  held fixed while the guide learns the paths. Without it, a guide that starts at the prior
  (a neural control) lets the first gradients shrink a learned diffusion, which explains the
  data's misfit by making paths smoother, before the guide has learned to steer the paths to
  the data; a collapsed diffusion then barely lets the control act. Guides that start at the
  data (:class:`~pyro_nsde.GirsanovGuide` with affine or linear controls and its Laplace
  initialization) need no warm-up, but it costs them little;
- a warning when the model has parameters and the guide is the pure mean shift
  (``covariance="prior"``), which biases a learned diffusion downwards. On a double-well system
  identification (``benchmarks/accuracy/single_loop.py``), one call with a neural control and
  ``covariance="diagonal"`` matched the two-phase recipe (drift error 0.18–0.32, σ at 0.99 of
  the truth), where the plain SVI loop reached 0.89 and the same call with the mean shift
  0.31–0.37 with σ at 0.80.

It is an ordinary loop: anything it does can be written by hand with ``SVI.step``.
"""

import warnings

import numpy as np
import pyro
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from tqdm.auto import tqdm

from ..sde.checks import check_positive_int
from ..sde.sites import guided_traces, latent_size, plate_nesting

#: Latent coordinates of all the vectorized particles of a step together, at most, by default.
PARTICLE_COORDINATES = 100_000
#: The learning rate of a Laplace-started family's locations, in units of its start's smallest
#: sd (at most ``lr``).
LOCATION_RATE = 0.02


def model_has_parameters(model, *args, **kwargs) -> bool:
    """Whether ``model(*args, **kwargs)`` has ``pyro.param`` / ``pyro.module`` parameters.

    A path drawn with parameters drawn from the prior may diverge: then the model runs at
    its prior medians (``init_to_median``)."""
    with poutine.block():
        try:
            trace = poutine.trace(model, param_only=True).get_trace(*args, **kwargs)
        except ValueError:
            at_median = InitMessenger(init_to_median)(model)
            trace = poutine.trace(at_median, param_only=True).get_trace(*args, **kwargs)
    return any(site["type"] == "param" for site in trace.nodes.values())


class SVIHistory(list):
    """The losses (negative ELBO estimates) of a :func:`fit_svi` run, one per step, with
    ``converged`` (whether the run stopped at its stopping rule; ``None`` for a fixed number
    of steps)."""

    converged: bool | None = None


def fit_svi(
    model,
    guide,
    *args,
    steps: int | None = None,
    lr: float | None = None,
    final_lr: float | None = None,
    num_particles: int | None = None,
    warmup: int | None = None,
    max_plate_nesting: int | None = None,
    progress: bool = True,
    max_steps: int = 2000,
    window: int = 10,
    **kwargs,
) -> SVIHistory:
    """Fit ``guide`` (and the model's parameters) to ``model(*args, **kwargs)`` by SVI.

    With ``steps`` the run takes exactly that many steps, the learning rate decaying
    geometrically from ``lr`` to ``final_lr``. Without (the default) it runs until the ELBO
    stops improving, at most ``max_steps``: at the constant rate ``lr`` until the mean loss of
    the last ``w`` steps is no longer below that of the ``w`` before by more than its standard
    error, with ``w`` a quarter of the steps so far (at least ``window``: a run that starts at
    its optimum, as the default guide's Laplace start of a statistical model does, stops after
    a few windows, a slow steady improvement over hundreds of steps is still seen), then ``w``
    more steps at ``final_lr`` so that the last iterates settle. It says when it converged (a
    printed line with ``progress``, and a warning if it did not).

    :param model: a Pyro model.
    :param guide: its guide, e.g. a :class:`~pyro_nsde.GirsanovGuide`.
    :param int steps: SVI steps in all (warm-up included), or ``None``: until converged.
    :param float lr: the initial learning rate of :class:`~pyro.optim.ClippedAdam` (default
        0.03; 0.01 without ``steps`` for a :class:`~pyro_nsde.GirsanovGuide` that starts its
        latent sites at their Laplace approximation, the default for statistical models: it
        starts near its optimum, where larger steps only add noise).
    :param float final_lr: the learning rate at the end (default ``lr / 10``).
    :param int num_particles: vectorized particles of :class:`~pyro.infer.Trace_ELBO`
        (default: 8, fewer for draws of more than :data:`PARTICLE_COORDINATES` / 8 latent
        coordinates, at least 1: particles cost time and memory in proportion, and the ELBO
        of many series averages their noise already).
    :param int warmup: steps at the start with the model's parameters held fixed (default:
        a tenth of ``steps``, or ``window`` steps without ``steps``, if the model has
        parameters, else 0).
    :param int max_plate_nesting: passed to :class:`~pyro.infer.Trace_ELBO` (default: read
        off a trace of the model replayed on the guide).
    :param bool progress: show a progress bar with the running ELBO.
    :param int max_steps: the most steps without ``steps``.
    :param int window: the steps over which progress is judged without ``steps``.
    :returns: the loss of every step (an :class:`SVIHistory`).
    """
    check_positive_int("steps", steps, optional=True)
    check_positive_int("max_steps", max_steps)
    check_positive_int("window", window)
    if lr is None:
        lr = 0.01 if steps is None and _starts_at_laplace(guide, *args, **kwargs) else 0.03
    final_lr = lr / 10 if final_lr is None else final_lr
    if not (lr > 0 and final_lr > 0):
        raise ValueError(f"lr and final_lr must be positive, but got {lr!r} and {final_lr!r}")
    total = max_steps if steps is None else steps
    has_parameters = model_has_parameters(model, *args, **kwargs)
    if warmup is None:
        warmup = (total // 10 if steps else min(window, total)) if has_parameters else 0
    if has_parameters and getattr(guide, "covariance", None) == "prior":
        warnings.warn(
            "the model has parameters (a learned drift or diffusion?) and the guide uses "
            "covariance='prior': the pure mean shift biases a learned diffusion downwards "
            "unless the step is much smaller than σ_obs² / |G|² (docs/covariance.md); pass "
            "covariance='full' (affine or linear controls) or 'diagonal' (neural controls)",
            UserWarning,
            stacklevel=2,
        )
    if not (isinstance(warmup, int) and 0 <= warmup <= total):
        raise ValueError(f"warmup must be an int in [0, steps], but got {warmup!r}")
    decay = 1.0 if steps is None else (final_lr / lr) ** (1.0 / steps)
    optim = pyro.optim.ClippedAdam(_LearningRates(guide, lr, decay))
    if max_plate_nesting is None or num_particles is None:
        guide_trace, model_trace = guided_traces(model, guide, args, kwargs)
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting(guide_trace, model_trace)
    if num_particles is None:
        num_particles = min(8, max(1, PARTICLE_COORDINATES // latent_size(guide_trace)))
    options = {
        "num_particles": num_particles,
        "vectorize_particles": True,
        "max_plate_nesting": max_plate_nesting,
    }
    elbo = Trace_ELBO(**options)
    frozen = SVI(poutine.block(model, hide_types=["param"]), guide, optim, elbo)
    joint = SVI(model, guide, optim, elbo)
    losses = SVIHistory()
    settle_until = None
    with tqdm(range(total), desc="SVI", unit="step", disable=not progress) as bar:
        for step in bar:
            svi = frozen if step < warmup else joint
            losses.append(svi.step(*args, **kwargs))
            if step % 10 == 0 or step == total - 1:
                bar.set_postfix(elbo=f"{-np.mean(losses[-10:]):.2f}")
            if steps is not None:
                continue
            if settle_until is None and step >= warmup:
                width = max(window, (step + 1 - warmup) // 4)
                if _plateau(losses[warmup:], width):
                    settle_until = step + width
                    optim.pt_optim_args.scale(optim, final_lr / lr)
            if settle_until is not None and step + 1 >= settle_until:
                losses.converged = True
                break
    if steps is None:
        _report(losses, progress, max_steps)
    return losses


def _starts_at_laplace(guide, *args, **kwargs) -> bool:
    """Whether ``guide`` starts its latent sites at their Laplace approximation (a
    :class:`~pyro_nsde.GirsanovGuide` whose ``"auto"`` options chose it; set up here)."""
    options = getattr(guide, "options", None)
    if options is None or not hasattr(guide, "prototype_trace"):
        return False
    if guide.prototype_trace is None:
        guide(*args, **kwargs)
    return guide.options.init_latents == "laplace"


def _plateau(losses, window: int) -> bool:
    """Whether the mean of the last ``window`` losses is no longer below the mean of the
    ``window`` before by more than the standard error of their difference."""
    if len(losses) < 2 * window:
        return False
    last = np.asarray(losses[-window:])
    before = np.asarray(losses[-2 * window : -window])
    error = np.sqrt((last.var(ddof=1) + before.var(ddof=1)) / window)
    return before.mean() - last.mean() < error


class _LearningRates:
    """ClippedAdam's arguments per parameter (by its name in the param store): ``lr``, but
    :data:`LOCATION_RATE` start sds for the locations of a family with a ``start_scale``."""

    def __init__(self, guide, lr: float, decay: float):
        self.lr, self.decay, self.rates = lr, decay, {}
        modules = guide.modules() if hasattr(guide, "modules") else ()
        for module in modules:
            scale = getattr(module, "start_scale", None)
            if scale is None:
                continue
            for name, _ in module.named_parameters():
                name = name.removesuffix("_unconstrained")
                if name == "loc" or name.startswith("locs."):
                    store_name = f"{module._pyro_name}.{name}"
                    self.rates[store_name] = min(lr, LOCATION_RATE * scale)

    def __call__(self, param_name: str) -> dict:
        lr = self.rates.get(param_name, self.lr)
        return {"lr": lr, "lrd": self.decay, "clip_norm": 10.0}

    def scale(self, optim, factor: float) -> None:
        """Multiply every rate by ``factor``, in the optimizers made so far and later."""
        self.lr *= factor
        self.rates = {k: v * factor for k, v in self.rates.items()}
        for optimizer in optim.optim_objs.values():
            for group in optimizer.param_groups:
                group["lr"] *= factor


def _report(losses: SVIHistory, progress: bool, max_steps: int) -> None:
    if not losses.converged:
        losses.converged = False
        warnings.warn(
            f"fit_svi did not converge in max_steps={max_steps} steps (the ELBO was still "
            f"improving); pass a larger max_steps, or steps= for a fixed number",
            RuntimeWarning,
            stacklevel=3,
        )
    elif progress:
        elbo = -np.mean(losses[-10:])
        print(f"SVI converged after {len(losses)} steps (ELBO {elbo:.2f})")


__all__ = ["SVIHistory", "fit_svi", "model_has_parameters"]
