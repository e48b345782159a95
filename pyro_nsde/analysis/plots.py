"""Plots of posterior paths, forecasts and ELBO traces (matplotlib; each returns ``(fig, axes)``).

Path plots read a path variable with dims ``(chain, draw, *series dims, time, state)`` from the
result of :func:`~pyro_nsde.to_inference_data` (``InferenceData`` or ``DataTree``): one panel
per state coordinate (rows) and per series (columns), showing the posterior mean and the
highest-density intervals (HDI) of each time point's marginal.
"""

import numpy as np

from . import arviz_adapter
from .arviz_adapter import SAMPLE_DIMS


def hdi(draws: np.ndarray, prob: float) -> tuple[np.ndarray, np.ndarray]:
    """The narrowest interval holding ``⌊prob · S⌋ + 1`` of the ``S`` sorted draws, per entry.

    :param np.ndarray draws: ``(S, ...)``.
    :param float prob: in ``(0, 1)``.
    :returns: ``(lower, upper)``, each of shape ``draws.shape[1:]``.
    """
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), but got {prob!r}")
    ordered = np.sort(np.asarray(draws), axis=0)
    num = ordered.shape[0]
    inside = int(np.floor(prob * num))
    if inside < 1:
        raise ValueError(f"{num} draws are too few for a {prob:.0%} interval")
    widths = ordered[inside:] - ordered[: num - inside]
    start = np.argmin(widths, axis=0)[None]
    lower = np.take_along_axis(ordered, start, 0)[0]
    upper = np.take_along_axis(ordered, start + inside, 0)[0]
    return lower, upper


def _path_variable(dataset, var_name):
    if var_name is None:
        candidates = [
            name
            for name, array in dataset.data_vars.items()
            if array.ndim >= 4 and (array.dims[-2] == "time" or array.dims[-2].endswith("_time"))
        ]
        if len(candidates) != 1:
            raise ValueError(
                f"var_name must name the path variable to plot; candidates: {candidates}"
            )
        var_name = candidates[0]
    if var_name not in dataset.data_vars:
        raise ValueError(f"var_name {var_name!r} is not a variable of {list(dataset.data_vars)}")
    array = dataset[var_name]
    if array.ndim < 4 or tuple(array.dims[:2]) != SAMPLE_DIMS:
        raise ValueError(
            f"{var_name!r} must have dims (chain, draw, *series, time, state), but has {array.dims}"
        )
    return array


def _series_layout(array):
    """Flatten the series dims of a path array ``(chain, draw, *series, T, d)``.

    :returns: ``(draws (S, N, T, d), times (N, T), series labels, state labels)``.
    """
    series_dims = list(array.dims[2:-2])
    time_dim, state_dim = array.dims[-2:]
    values = array.values
    num_series = int(np.prod([array.sizes[d] for d in series_dims], dtype=int))
    draws = values.reshape((-1, num_series, *values.shape[-2:]))
    grid_name = f"{time_dim}_value"
    if grid_name in array.coords:
        grid = array.coords[grid_name]
        grid = grid.transpose(*[d for d in series_dims if d in grid.dims], time_dim).values
        times = np.broadcast_to(grid, (*array.shape[2:-2], array.sizes[time_dim]))
    else:
        times = np.broadcast_to(array[time_dim].values, (*array.shape[2:-2], array.sizes[time_dim]))
    times = times.reshape(num_series, -1)
    labels = []
    for index in np.ndindex(*array.shape[2:-2]):
        parts = [f"{d}={array[d].values[i]}" for d, i in zip(series_dims, index, strict=True)]
        labels.append(", ".join(parts))
    states = [f"{state_dim}={s}" for s in array[state_dim].values]
    return draws, times, labels, states


def _draw_bands(ax, times, draws, hdi_probs, color, label):
    """Mean and nested HDI bands of ``draws`` ``(S, T)`` over ``times`` ``(T,)``."""
    probs = sorted(hdi_probs, reverse=True)
    for i, prob in enumerate(probs):
        lower, upper = hdi(draws, prob)
        alpha = 0.18 + 0.22 * i / max(len(probs) - 1, 1)
        ax.fill_between(
            times, lower, upper, color=color, alpha=alpha, lw=0, label=f"{label} {prob:.0%} HDI"
        )
    ax.plot(times, draws.mean(0), color=color, lw=1.5, label=f"{label} mean")


def _observation_arrays(observations, num_series, state_dim):
    """``(times (N, n), values (N, n, d))`` from ``(times, values)`` broadcast to the series."""
    try:
        obs_times, obs_values = (np.asarray(a, dtype=float) for a in observations)
    except (TypeError, ValueError) as error:
        raise TypeError("observations must be a pair (times, values) of arrays") from error
    if obs_values.ndim < 2 or obs_values.shape[-1] != state_dim:
        raise ValueError(
            f"observation values must have shape (*series, n, {state_dim}) with NaN for "
            f"unobserved entries, but got {obs_values.shape}"
        )
    n = obs_values.shape[-2]
    values = np.broadcast_to(obs_values, (*obs_values.shape[:-2], n, state_dim))
    values = values.reshape(-1, n, state_dim)
    if values.shape[0] not in (1, num_series):
        raise ValueError(
            f"observation values have {values.shape[0]} series, but the path has {num_series}"
        )
    values = np.broadcast_to(values, (num_series, n, state_dim))
    if obs_times.shape[-1] != n:
        raise ValueError(f"observation times must end in n = {n}, but got {obs_times.shape}")
    times = np.broadcast_to(obs_times.reshape(-1, n), (num_series, n))
    return times, values


def _figure_legend(fig, axes):
    """One legend for the figure, below the panels (labels of the first panel)."""
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))


def _bands(data, var_name, observations, hdi_probs, series, axes, color):
    """Draw the posterior bands; returns ``(fig, axes, (draws, times), chosen series)``."""
    import matplotlib.pyplot as plt

    array = _path_variable(arviz_adapter.group(data, "posterior"), var_name)
    draws, times, labels, states = _series_layout(array)
    chosen = list(range(draws.shape[1])) if series is None else list(series)
    d = draws.shape[-1]
    if axes is None:
        fig, axes = plt.subplots(
            d,
            len(chosen),
            figsize=(3.6 * len(chosen), 2.2 * d + 0.8),
            squeeze=False,
            sharex="col",
            layout="constrained",
        )
    else:
        axes = np.asarray(axes).reshape(d, len(chosen))
        fig = axes[0, 0].figure
    obs = None
    if observations is not None:
        obs = _observation_arrays(observations, draws.shape[1], d)
    for col, j in enumerate(chosen):
        for i in range(d):
            ax = axes[i, col]
            _draw_bands(ax, times[j], draws[:, j, :, i], hdi_probs, color, "posterior")
            if obs is not None:
                keep = ~np.isnan(obs[1][j, :, i])
                ax.plot(obs[0][j][keep], obs[1][j, keep, i], "o", color="k", ms=3, label="data")
            ax.set_ylabel(states[i] if col == 0 else "")
        axes[0, col].set_title(labels[j] or str(array.name))
        axes[-1, col].set_xlabel(array.dims[-2])
    return fig, axes, (draws, times), chosen


def plot_path_bands(
    data,
    var_name: str | None = None,
    *,
    observations=None,
    hdi_probs=(0.5, 0.9),
    series=None,
    axes=None,
    color="C0",
):
    """Posterior mean and HDI bands of a path, per state coordinate and series.

    :param data: the result of :func:`~pyro_nsde.to_inference_data`.
    :param str var_name: the path variable (default: the only variable with a time dim).
    :param observations: optional ``(times, values)`` drawn as points: ``times`` ``(n,)`` or
        ``(*series, n)``, ``values`` ``(n, d)`` or ``(*series, n, d)``; NaN marks an
        unobserved coordinate (e.g. a latent velocity).
    :param hdi_probs: the HDI levels drawn (nested bands).
    :param series: indices of the (flattened) series to draw (default: all).
    :param axes: optional array of axes ``(d, len(series))`` to draw into (lines already drawn
        there, e.g. true paths, join the legend).
    :param color: the colour of the posterior bands.
    :returns: ``(fig, axes)`` with ``axes`` a ``(d, num_series)`` numpy array.
    """
    fig, axes, _, _ = _bands(data, var_name, observations, hdi_probs, series, axes, color)
    _figure_legend(fig, axes)
    return fig, axes


def plot_forecast(
    data,
    forecast,
    *,
    observations=None,
    hdi_probs=(0.5, 0.9),
    series=None,
    axes=None,
    colors=("C0", "C1"),
):
    """Posterior path bands up to ``t_K`` and the forecast fan after it.

    :param data: the result of :func:`~pyro_nsde.to_inference_data`.
    :param xarray.DataArray forecast: the result of :func:`~pyro_nsde.analysis.forecast` for the
        path
        variable ``forecast.name`` of ``data``. The fan starts at ``t_K`` from the posterior
        marginal of the final state.
    :param observations: as for :func:`plot_path_bands`.
    :param hdi_probs: the HDI levels of bands and fan.
    :param series: indices of the (flattened) series to draw (default: all).
    :param axes: optional array of axes ``(d, len(series))``.
    :param colors: colours of the posterior bands and of the forecast fan.
    :returns: ``(fig, axes)``.
    """
    fig, axes, (past, past_times), chosen = _bands(
        data, forecast.name, observations, hdi_probs, series, axes, colors[0]
    )
    future, future_times, _, _ = _series_layout(forecast)
    if future.shape[1] != past.shape[1] or future.shape[-1] != past.shape[-1]:
        raise ValueError(
            f"forecast has {future.shape[1]} series of dimension {future.shape[-1]}, but "
            f"{forecast.name!r} has {past.shape[1]} of dimension {past.shape[-1]}"
        )
    if future.shape[0] == past.shape[0]:  # bands are marginal: start the fan at x_K's
        future = np.concatenate([past[:, :, -1:], future], axis=2)
        future_times = np.concatenate([past_times[:, -1:], future_times], axis=1)
    for col, j in enumerate(chosen):
        for i in range(past.shape[-1]):
            ax = axes[i, col]
            _draw_bands(ax, future_times[j], future[:, j, :, i], hdi_probs, colors[1], "forecast")
            ax.axvline(past_times[j, -1], color="0.4", ls=":", lw=1)
    _figure_legend(fig, axes)
    return fig, axes


def plot_elbo(
    losses,
    *,
    window: int | None = None,
    reference: float | None = None,
    reference_label: str = "reference",
    ax=None,
):
    """ELBO history of one or several SVI runs.

    ``SVI.step`` returns a loss, the negative ELBO estimate of that step; this plots
    ``-loss`` (light) and its running mean over ``window`` steps (dark). The y-axis starts at
    the lowest running mean of the last 90% of the steps, so the initial transient does not
    squash the converged part.

    :param losses: a sequence of losses, or a dict ``{label: sequence}`` of several runs.
    :param int window: running-mean width (default: 2% of the steps, at least 1).
    :param float reference: an optional horizontal line, e.g. the exact ``log p(y)`` or the
        importance-sampling ``log_evidence`` of :func:`~pyro_nsde.variational_diagnostics`.
    :param str reference_label: its legend label.
    :param ax: optional axes to draw into.
    :returns: ``(fig, ax)``.
    """
    import matplotlib.pyplot as plt

    runs = losses if isinstance(losses, dict) else {"ELBO": losses}
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    else:
        fig = ax.figure
    bottoms, tops = [], []
    for k, (label, run) in enumerate(runs.items()):
        elbo = -np.asarray(run, dtype=float).reshape(-1)
        if elbo.size < 2:
            raise ValueError(f"losses of {label!r} need at least 2 steps, but got {elbo.size}")
        width = window or max(1, elbo.size // 50)
        smooth = np.convolve(elbo, np.ones(width) / width, mode="valid")
        steps = np.arange(1, elbo.size + 1)
        ax.plot(steps, elbo, color=f"C{k}", alpha=0.25, lw=0.7)
        ax.plot(steps[width - 1 :], smooth, color=f"C{k}", lw=1.6, label=label)
        bottoms.append(smooth[smooth.size // 10 :].min())
        tops.append(elbo.max())
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label=f"{reference_label} {reference:.2f}")
        tops.append(reference)
    span = max(max(tops) - min(bottoms), 1e-3)
    ax.set_ylim(min(bottoms) - 0.05 * span, max(tops) + 0.05 * span)
    ax.set_xlabel("SVI step")
    ax.set_ylabel("ELBO")
    ax.legend(fontsize="small", loc="lower right")
    return fig, ax


__all__ = ["hdi", "plot_elbo", "plot_forecast", "plot_path_bands"]
