r"""Posterior-predictive simulation with :mod:`torchsde`'s solvers.

Fitting needs the Euler–Maruyama path density, so the model's grid is the Euler–Maruyama grid.
Prediction needs no density: once drift, diffusion and a state are drawn from the posterior, the
SDE ``dX = f(t, X) dt + G(t, X) dW`` can be solved at a finer step, or with a higher-order scheme
(stochastic Runge–Kutta, Milstein), for smoother and more accurate sample paths and forecasts.

- :func:`solve_sde` solves the SDE from given states with :func:`torchsde.sdeint`.
- :func:`predictive_paths` draws from the posterior of a fitted model (its guide), takes each
  draw's SDE (the model's own drift and diffusion at that site, with that draw's parameters)
  and its state at a grid time, and solves forward from there.

(:func:`pyro_nsde.analysis.forecast` continues the draws of an ArviZ or MCMC posterior with the
model's
own Euler–Maruyama chain instead.)

Schemes (torchsde names), for Itô SDEs: ``"euler"`` (any noise), ``"milstein"`` (strong order
1 for ``"diagonal"``, ``"scalar"`` and ``"additive"`` noise) and ``"srk"`` (strong order 1.5
for ``"diagonal"``/``"scalar"``, 2.0 for ``"additive"``). Diagonal noise here means torchsde's:
``g_i`` depends on ``x_i`` only, as :class:`~pyro_nsde.zoo.nn.DiffusionNet` with
``coupled=False`` guarantees; Milstein and SRK are of lower order otherwise.
"""

import pyro
import torch
import torchsde
from pyro import poutine

from ..sde.checks import check_positive_int
from ..sde.noise import check_noise_type, diffusion_event_dim
from ..sde.sites import guided_plate_nesting, unwrap_path_distribution

#: Schemes available for each noise type, the first being the default.
METHODS = {
    "diagonal": ("srk", "milstein", "euler"),
    "scalar": ("srk", "milstein", "euler"),
    "additive": ("srk", "milstein", "euler"),
    "general": ("euler",),
}


class _FlatSDE:
    """The SDE in torchsde's layout: states ``(B, d)`` with ``B = prod(batch)``; drift and
    diffusion see them as ``batch + (d,)`` so that batched parameters broadcast."""

    sde_type = "ito"

    def __init__(self, drift, diffusion, noise_type, batch, state_dim):
        self.drift, self.diffusion = drift, diffusion
        self.noise_type = noise_type
        self.batch, self.state_dim = batch, state_dim

    def f(self, t, y):
        x = y.reshape(self.batch + (self.state_dim,))
        return self.drift(t, x).expand(x.shape).reshape(y.shape)

    def g(self, t, y):
        x = y.reshape(self.batch + (self.state_dim,))
        g = self.diffusion(t, x) if callable(self.diffusion) else self.diffusion
        event = g.shape[g.dim() - diffusion_event_dim(self.noise_type) :]
        return g.expand(self.batch + event).reshape(y.shape[:1] + event)


def solve_sde(
    drift,
    diffusion,
    x0: torch.Tensor,
    times: torch.Tensor,
    *,
    noise_type: str = "diagonal",
    method: str | None = None,
    dt: float | None = None,
    bm=None,
    **options,
) -> torch.Tensor:
    r"""Solve ``dX = f(t, X) dt + G(t, X) dW`` from ``X(times[0]) = x0`` with torchsde.

    :param callable drift: ``f(t, x) -> (..., d)``, as for :class:`~pyro_nsde.EulerMaruyama`
        (called with ``x`` ``batch + (d,)`` and a 0-dim ``t``).
    :param diffusion: a tensor or a callable ``G(t, x)``, shaped as ``noise_type`` requires.
    :param torch.Tensor x0: initial states ``batch + (d,)``.
    :param torch.Tensor times: ``(T,)`` increasing output times, ``times[0]`` the start.
    :param str noise_type: ``"diagonal"``, ``"scalar"``, ``"general"`` or ``"additive"``.
    :param str method: a torchsde scheme (default: ``"srk"``, or ``"euler"`` for general
        noise); see :data:`METHODS`.
    :param float dt: the solver's step (default: the smallest gap of ``times`` / 10).
    :param bm: a torchsde Brownian motion of size ``(prod(batch), m)`` (default: a fresh
        ``BrownianInterval`` seeded from torch's random generator, so ``torch.manual_seed``
        makes the result reproducible; pass ``dt`` to a ``BrownianInterval`` of your own, it
        is many times faster with it).
    :param options: passed on to :func:`torchsde.sdeint` (e.g. ``adaptive=True``).
    :returns: paths ``batch + (T, d)``; ``[..., j, :]`` is the state at ``times[j]``.
    """
    noise_type = check_noise_type(noise_type)
    allowed = METHODS[noise_type]
    method = allowed[0] if method is None else method
    if method not in allowed:
        raise ValueError(
            f"method must be one of {allowed} for noise_type={noise_type!r}, but got {method!r}"
        )
    if not isinstance(x0, torch.Tensor) or x0.dim() < 1:
        raise ValueError("x0 must be a tensor of shape batch + (d,)")
    if not isinstance(times, torch.Tensor) or times.dim() != 1 or times.numel() < 2:
        raise ValueError(f"times must be a 1-D tensor of >= 2 times, but got {times!r}")
    if not (times.diff() > 0).all():
        raise ValueError("times must be strictly increasing")
    batch, d = x0.shape[:-1], x0.shape[-1]
    times = times.to(x0)
    dt = float(times.diff().min()) / 10 if dt is None else float(dt)
    if not dt > 0:
        raise ValueError(f"dt must be > 0, but got {dt}")
    sde = _FlatSDE(drift, diffusion, noise_type, batch, d)
    y0 = x0.reshape(-1, d)
    if bm is None:
        noise = sde.g(times[0], y0).shape[-1] if noise_type != "diagonal" else d
        levy = {"srk": "space-time"}.get(method, "none")
        bm = torchsde.BrownianInterval(
            t0=float(times[0]),
            t1=float(times[-1]),
            size=(y0.shape[0], noise),
            dtype=y0.dtype,
            device=y0.device,
            levy_area_approximation=levy,
            entropy=int(torch.randint(2**31 - 1, ())),
            dt=dt,  # the hint sets up its dependency tree at once: ~15x faster than without
        )
    ys = torchsde.sdeint(sde, y0, times, method=method, dt=dt, bm=bm, **options)
    return ys.movedim(0, 1).reshape(batch + (times.shape[0], d))


def predictive_paths(
    model,
    guide,
    *args,
    site: str,
    times: torch.Tensor,
    num_samples: int = 100,
    start: int = -1,
    method: str | None = None,
    dt: float | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""Posterior-predictive paths of a path site, solved on ``times`` by torchsde.

    Draws ``num_samples`` posterior samples at once (the guide under a particle plate, then
    the model replayed on them, as :class:`~pyro.infer.Predictive` with ``parallel=True``
    does). For each draw the site's :class:`~pyro_nsde.EulerMaruyama` gives the SDE (drift
    and diffusion with that draw's parameters) and the path its state at grid point
    ``start``; the SDE is solved from there:

        ``X(t_start) = x_start``,  ``dX = f(t, X) dt + G(t, X) dW``,  reported at ``times``.

    With ``start=-1`` (the default) and ``times`` past the grid this is a forecast; with
    ``start=0`` it re-simulates the fitted prior SDE from the posterior initial states, at a
    finer step than the fitting grid.

    :param model: the model.
    :param guide: a fitted guide (e.g. :class:`~pyro_nsde.GirsanovGuide`).
    :param args: the model's arguments.
    :param str site: the path site.
    :param torch.Tensor times: ``(T,)`` increasing, with ``times[0] >= t_start`` (the grid
        time at ``start``, which must be the same for every series).
    :param int num_samples: ``S``.
    :param int start: the grid index to start from.
    :param str method: a torchsde scheme (see :func:`solve_sde`).
    :param float dt: the solver's step (see :func:`solve_sde`).
    :param kwargs: the model's keyword arguments.
    :returns: ``(S, *batch, T, d)`` paths: ``batch`` is the site's batch shape under the
        model's plates (size 1 along plates the site is not in).
    """
    check_positive_int("num_samples", num_samples)
    max_plate_nesting = guided_plate_nesting(model, guide, args, kwargs)
    with torch.no_grad(), poutine.block():
        with pyro.plate("_num_predictive_samples", num_samples, dim=-max_plate_nesting - 1):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(
                *args, **kwargs
            )
    if site not in model_trace.nodes:
        raise ValueError(f"site {site!r} is not a sample site of the model")
    law, _ = unwrap_path_distribution(model_trace.nodes[site]["fn"])
    if law is None:
        raise ValueError(f"site {site!r} is not an EulerMaruyama path site")
    path = model_trace.nodes[site]["value"]
    t_start = law.times[..., start].unique()
    if t_start.numel() != 1:
        raise ValueError(
            f"the grid time at start={start} differs between series ({t_start.tolist()}); "
            f"predictive_paths needs a common start time"
        )
    times = times.to(path)
    if times.dim() != 1 or times[0] < t_start:
        raise ValueError(
            f"times must be 1-D and start at or after the grid time {float(t_start):g}"
        )
    prepend = bool(times[0] > t_start)
    solve_times = torch.cat([t_start.to(times), times]) if prepend else times
    x_start = path[..., start, :]
    batch = torch.broadcast_shapes(x_start.shape[:-1], law.batch_shape)
    x_start = x_start.expand(batch + x_start.shape[-1:])
    with torch.no_grad():
        paths = solve_sde(
            law.drift,
            law.diffusion,
            x_start,
            solve_times,
            noise_type=law.noise_type,
            method=method,
            dt=dt,
        )
    return paths[..., 1:, :] if prepend else paths


__all__ = ["METHODS", "predictive_paths", "solve_sde"]
