r"""Posterior forecasts of a latent path past the end of its grid.

For an SDE observed on ``t_0 < ... < t_K``, the path after ``t_K`` depends on the data only
through the final state and the parameters (the Euler–Maruyama chain is Markov given ``θ``):

    ``p(x(s_1), ..., x(s_J) | y) = ∫ p(x(s_1), ..., x(s_J) | x_K, θ) p(x_K, θ | y) dx_K dθ``,

so a forecast draw continues each posterior draw ``(x_K, θ)`` with the model's own
Euler–Maruyama chain on the grid ``t_K < s_1 < ... < s_J``:

    ``x(s_{j+1}) = x(s_j) + (s_{j+1} - s_j) f_θ(s_j, x(s_j)) + G_θ(s_j, x(s_j)) ΔW_j``.

The drift ``f_θ`` and diffusion ``G_θ`` are those of the model's
:class:`~pyro_nsde.EulerMaruyama` at the path site, evaluated with the parameters of each draw.

A future *observation* carries the observation noise too: :func:`forecast_observations` puts
each draw's parameters and continued path into the same model observed at the future times
as well, and draws its likelihood there (:func:`forecast_table` writes their quantiles).
"""

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..sde.checks import broadcasts_to
from ..sde.euler_maruyama import EulerMaruyama
from ..sde.sites import unwrap_path_distribution
from . import arviz_adapter
from .arviz_adapter import SAMPLE_DIMS
from .draws import conditioned_trace, per_draw
from .layout import default_layout, grid_coordinate

if TYPE_CHECKING:
    import pandas
    import xarray

#: The predictive quantiles of :func:`forecast_table` (columns ``q05``, ..., ``q95``).
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: :func:`forecast_observations` leaves out a draw whose continued path grows past this many
#: times the largest magnitude of its fitted path or of the data.
RUNAWAY_FACTOR = 1e3
_QUANTILE_COLUMNS = [f"q{round(100 * q):02d}" for q in QUANTILES]


def _posterior_samples(posterior):
    """``({name: (S, *shape) tensor}, num_chains, dataset or None)`` from an ArviZ object
    (its ``posterior`` group) or a dict of tensors with a leading draw dim."""
    if isinstance(posterior, dict):
        samples = {k: torch.as_tensor(v) for k, v in posterior.items()}
        sizes = {v.shape[0] for v in samples.values() if v.dim() > 0}
        if len(sizes) != 1 or any(v.dim() == 0 for v in samples.values()):
            raise ValueError(
                "posterior must be a dict of tensors (num_draws, *site_shape) with one "
                f"num_draws, but got shapes { {k: tuple(v.shape) for k, v in samples.items()} }"
            )
        return samples, 1, None
    dataset = arviz_adapter.group(posterior, "posterior")
    samples = {}
    for name, array in dataset.data_vars.items():
        if tuple(array.dims[:2]) != SAMPLE_DIMS:
            raise ValueError(f"posterior variable {name!r} must have dims (chain, draw, ...)")
        values = torch.as_tensor(np.ascontiguousarray(array.values))
        samples[name] = values.reshape((-1, *values.shape[2:]))
    return samples, dataset.sizes["chain"], dataset


def _forecast_grid(path: EulerMaruyama, future_times, batch_shape) -> torch.Tensor:
    """``(t_K, s_1, ..., s_J)``, shape ``(..., J+1)``."""
    last = path.times[..., -1:]
    future = torch.as_tensor(future_times, dtype=last.dtype, device=last.device)
    if future.dim() < 1 or future.shape[-1] < 1:
        raise ValueError(
            f"future_times must have shape (J,) or (..., J) with J >= 1, "
            f"but got shape {tuple(future.shape)}"
        )
    grid_batch = torch.broadcast_shapes(last.shape[:-1], future.shape[:-1])
    if not broadcasts_to(grid_batch, batch_shape):
        raise ValueError(
            f"future_times batch shape {tuple(future.shape[:-1])} must broadcast to the path's "
            f"series shape {tuple(batch_shape)}"
        )
    if not (future[..., :1] > last).all():
        raise ValueError(
            f"future_times must start after the last grid time t_K = "
            f"{last.reshape(-1)[0].item():.6g}, but future_times[..., 0] = "
            f"{future[..., 0].reshape(-1)[0].item():.6g}"
        )
    grid = torch.cat(
        [last.expand(grid_batch + (1,)), future.expand(grid_batch + future.shape[-1:])], -1
    )
    steps = grid[..., 1:] - grid[..., :-1]
    if not (steps > 0).all():
        raise ValueError("future_times must be strictly increasing")
    return grid


def forecast(
    model,
    posterior,
    future_times,
    *,
    model_args=(),
    model_kwargs=None,
    site: str | None = None,
) -> "xarray.DataArray":
    r"""Forecast the path site ``site`` of ``model`` at ``future_times`` from posterior draws.

    Each posterior draw is put back into the model (one vectorized run, conditioned on all
    latent sites), and its final state ``x_K`` is continued with the site's own
    Euler–Maruyama chain, with that draw's parameters, on ``t_K < s_1 < ... < s_J`` (see the
    module docstring). Use a fine ``future_times`` grid: it is also the step grid of the
    forecast. Only the latent path is forecast; observations beyond ``t_K`` follow by
    applying the likelihood to it.

    :param callable model: the Pyro model that was fitted.
    :param posterior: the result of :func:`~pyro_nsde.to_inference_data` (its ``posterior``
        group is used; chains kept), or a dict ``{site: tensor (num_draws, *site_shape)}`` as
        returned by ``mcmc.get_samples()``.
    :param torch.Tensor future_times: ``(J,)``, or ``(..., J)`` per series (broadcasting with
        the site's series dims), strictly increasing and after the grid's last time.
    :param tuple model_args: positional arguments of the model (the data of the fit).
    :param dict model_kwargs: keyword arguments of the model.
    :param str site: the path site (default: the model's only path site).
    :returns: an :class:`xarray.DataArray` named ``site`` with dims
        ``(chain, draw, *series dims, time, state)`` (the names of the posterior's variable, or
        the defaults of :func:`~pyro_nsde.to_inference_data`) and the ``time`` coordinate
        ``s_1, ..., s_J`` (per series: step index plus ``"{time}_value"``); values
        ``(chains, draws, *series, J, d)``.
    """
    kwargs = {} if model_kwargs is None else dict(model_kwargs)
    samples, num_chains, dataset = _posterior_samples(posterior)
    num_draws = next(iter(samples.values())).shape[0]
    trace, sites, _ = conditioned_trace(model, samples, model_args, kwargs)
    paths = [k for k in samples if k in sites and sites[k].kind == "latent" and sites[k].path]
    if site is None and len(paths) == 1:
        site = paths[0]
    if site not in paths:
        raise ValueError(f"site must name one of the posterior's path sites {paths}, got {site!r}")
    info = sites[site]
    law, _ = unwrap_path_distribution(trace.nodes[site]["fn"])
    series_shape = info.shape[:-2]
    grid = _forecast_grid(law, future_times, series_shape)
    with torch.no_grad():
        last_state = trace.nodes[site]["value"][..., -1, :]
        continuation = EulerMaruyama(
            law.drift,
            law.diffusion,
            last_state,
            grid,
            noise_type=law.noise_type,
            validate_args=False,
        )
        future = continuation.rsample()[..., 1:, :]
    shape = series_shape + (grid.shape[-1] - 1, info.shape[-1])
    future = per_draw(future, num_draws, info.pad, shape)
    diverged = int((~torch.isfinite(future).flatten(1).all(1)).sum())
    if diverged:
        warnings.warn(
            f"{diverged} of {num_draws} draws diverged on the forecast grid: the Euler-Maruyama "
            f"chain is unstable for their parameters at its step size (e.g. an Ornstein-Uhlenbeck "
            f"rate with theta * h > 2); their forecasts are NaN",
            RuntimeWarning,
            stacklevel=2,
        )
    values = future.cpu().numpy()
    values = values.reshape((num_chains, num_draws // num_chains, *shape))

    if dataset is not None:
        dims = list(dataset[site].dims[2:])
        kept = [*dims[:-2], dims[-1]]
        coords = {d: dataset[d].values for d in kept if d in dataset.coords}
    else:
        dims, coords = default_layout(sites)[0][site], {}
    times = grid[..., 1:]
    per_series = grid_coordinate(times, dims, shape)
    if per_series is None:
        coords[dims[-2]] = times.reshape(-1).cpu().numpy()
    else:
        coords[dims[-2]] = np.arange(shape[-2])
        coords[per_series[0]] = per_series[1:]
    coords.update(chain=np.arange(num_chains), draw=np.arange(num_draws // num_chains))
    import xarray

    return xarray.DataArray(values, dims=(*SAMPLE_DIMS, *dims), coords=coords, name=site)


def forecast_observations(model, posterior, future_times, y, *, site: str = "x"):
    """Draws of the observations of a ready-made model
    (:class:`~pyro_nsde.zoo.models.LatentSDEModel`) at ``future_times``, observation noise
    included: each posterior draw's path is continued onto the grid of the model observed at
    its own times and then ``future_times`` (:func:`forecast`), and the model there, conditioned
    on the draw's parameters and continued path, draws its likelihood.

    :param model: the fitted model.
    :param posterior: as for :func:`forecast`.
    :param torch.Tensor future_times: ``(J,)`` times after the model's last observation time.
    :param torch.Tensor y: ``(N, D)`` the data of the fit.
    :param str site: the path site.
    :returns: ``(draws, path)``: the observation draws ``(S, J, D)`` in the model's units,
        without the draws whose path diverges on the extended grid (an unstable
        Euler–Maruyama step, :func:`forecast` warns) or runs away, still finite, past
        :data:`RUNAWAY_FACTOR` times its fitted range or the data's (with a warning), and the
        continued paths on that grid (:func:`forecast`'s result, every draw).
    """
    future_times = torch.as_tensor(future_times, dtype=model.obs_times.dtype)
    extended = model.with_obs_times(torch.cat([model.obs_times, future_times]))
    num_grid = model.times.shape[-1]
    path = forecast(model, posterior, extended.times[num_grid:], model_args=(y,), site=site)
    samples, _, _ = _posterior_samples(posterior)
    continued = torch.as_tensor(path.values).reshape((-1, *path.shape[2:]))
    kept = _contained(samples[site], continued, y)
    if not kept.any():
        raise ValueError("every posterior draw diverged on the forecast grid")
    if not kept.all():
        samples = {name: value[kept] for name, value in samples.items()}
        continued = continued[kept]
    samples[site] = torch.cat([samples[site], continued.to(samples[site])], dim=-2)
    # Not Pyro's Predictive: it runs the model once unconditioned, and a path drawn from the
    # prior may leave the range where Euler–Maruyama is stable on the extended grid.
    trace, sites, _ = conditioned_trace(extended, samples, (None,), {})
    info = sites["y"]
    draws = per_draw(trace.nodes["y"]["value"], continued.shape[0], info.pad, info.shape)
    return draws[:, model.obs_times.shape[-1] :], path


def _contained(fitted, continued, y):
    """Which draws' continued paths ``(S, ..., K', d)`` stay finite and within
    :data:`RUNAWAY_FACTOR` times the largest magnitude of their fitted paths ``(S, ..., K, d)``
    and of the data ``y``; warns about the finite runaways (:func:`forecast` warned about the
    others). A runaway is an Euler–Maruyama chain unstable at the draw's parameters (a damped
    cycle with ``γh > 2``, say) that has not yet overflowed: one such draw of a thousand made
    the mean of a forecast 10⁴ times the data's range."""
    finite = torch.isfinite(continued).flatten(1).all(1)
    data = torch.as_tensor(y).to(continued).nan_to_num(0.0).abs().max()
    scale = torch.maximum(fitted.to(continued).abs().flatten(1).amax(1), data)
    largest = continued.nan_to_num(0.0, posinf=0.0, neginf=0.0).abs().flatten(1).amax(1)
    runaway = finite & (largest > RUNAWAY_FACTOR * scale)
    if runaway.any():
        warnings.warn(
            f"{int(runaway.sum())} of {len(runaway)} draws grew past {RUNAWAY_FACTOR:g} times "
            f"their fitted path's range on the forecast grid (an Euler-Maruyama chain unstable "
            f"for their parameters at its step size); they are left out of the forecast",
            RuntimeWarning,
            stacklevel=3,
        )
    return finite & ~runaway


def forecast_table(draws, times, columns, loc=0.0, scale=1.0) -> "pandas.DataFrame":
    """The long table of ``forecast.csv``: one row per time and series with the columns
    ``time, series, mean, q05, q25, q50, q75, q95`` of ``loc + scale · draws``.

    :param draws: ``(S, J, D)`` predictive draws.
    :param times: ``(J,)`` their times.
    :param columns: the ``D`` series names.
    :param loc: per-series shift ``(D,)`` (a standardized model back to the data's units).
    :param scale: per-series scale ``(D,)``.
    """
    import pandas

    values = np.asarray(loc) + np.asarray(scale) * np.asarray(draws, dtype=np.float64)
    num_times, num_series = values.shape[1:]
    table = {
        "time": np.repeat(np.asarray(times, dtype=np.float64), num_series),
        "series": np.tile(np.asarray(columns, dtype=object), num_times),
        "mean": values.mean(0).reshape(-1),
    }
    quantiles = np.quantile(values, QUANTILES, axis=0)  # (Q, J, D): rows time-major
    table.update(zip(_QUANTILE_COLUMNS, quantiles.reshape(len(QUANTILES), -1), strict=True))
    return pandas.DataFrame(table)


__all__ = ["QUANTILES", "forecast", "forecast_observations", "forecast_table"]
