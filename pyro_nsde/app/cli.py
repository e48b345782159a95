r"""The command line: ``python -m pyro_nsde demo`` and ``pyro-nsde fit DATA.csv``.

Both commands fit a latent SDE with a :class:`~pyro_nsde.GirsanovGuide` by SVI (a progress bar
shows the ELBO) and write into an output folder:

- ``posterior.nc``: the fit as ArviZ NetCDF
  (:func:`~pyro_nsde.analysis.diagnostics.to_inference_data`:
  posterior, posterior predictive, observed data, pointwise log-likelihood);
- ``summary.csv``: posterior mean, sd and 90% HDI of the parameters (rates and noise scales),
  the same columns with ArviZ 0.x and 1.x;
- ``paths.png``: posterior bands of the latent paths with the data;
- ``forecast.png``: the same with a forecast fan past the data, and the predictive bands of
  future observations;
- ``forecast.csv``: the predictive mean and quantiles of each future observation (observation
  noise included) in the data's units (:func:`~pyro_nsde.analysis.forecast.forecast_table`);
- ``elbo.png``: the ELBO history.

``demo`` fits :class:`~pyro_nsde.zoo.models.LotkaVolterra` to the lynx–hare pelts 1900–1920
(:func:`~pyro_nsde.zoo.datasets.lynx_hare`) and forecasts to 1930. ``fit`` reads a CSV file
(:func:`~pyro_nsde.zoo.datasets.read_csv`), standardizes each column and fits a
:class:`~pyro_nsde.zoo.models.LocalLinearTrend`, an
:class:`~pyro_nsde.zoo.models.OrnsteinUhlenbeck` (by default the OU model where KPSS and
Dickey–Fuller tests find the data stationary, else the trend; with a cycle where the
periodogram finds one: :func:`choose_model`) or a
:class:`~pyro_nsde.zoo.models.NeuralSDE` model; with ``--holdout`` it fits all but the last
rows and scores its forecast of them against an automatically selected ARIMA
(``backtest.csv``).
Bad input ends the command with a one-line message and exit status 1.

Set ``PYRO_NSDE_FAST=1`` for a quick run (few SVI steps and draws) unless ``--steps`` and
``--samples`` are given.
"""

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch

from ..analysis import arviz_adapter
from ..analysis.forecast import forecast_table
from ..guide.guide import GirsanovGuide
from ..zoo.datasets import TimeSeries, lynx_hare, read_csv
from ..zoo.models import (
    LocalLinearTrend,
    LotkaVolterra,
    NeuralSDE,
    OrnsteinUhlenbeck,
    Seasonal,
)
from .training import fit_svi

#: Posterior means of the Lotka–Volterra rates for the same data (per year, populations in
#: thousands), from the deterministic-ODE model with lognormal errors fitted by NUTS in
#: Carpenter (2018), "Predator-Prey Population Dynamics: the Lotka-Volterra model in Stan".
PUBLISHED_RATES = {"alpha": 0.55, "beta": 0.028, "gamma": 0.80, "delta": 0.024}

#: Options of the neural model's guide beyond the defaults (the statistical models use
#: ``GirsanovGuide(model)`` as it is: the Gauss–Markov path following every draw of the
#: parameters through a Kalman smoother, a full-rank normal over the rates and scales started
#: at their Laplace approximation). A neural drift is a model parameter, not a latent: there is
#: no drawn θ for the path to follow, and a smoother per step over a long grid would dominate
#: the run; the path's coefficients start at the Laplace fit and are re-fitted every 50 steps.
#: The Gauss–Markov family (``"linear"``, drawn by the parallel scan) takes 36 ms a step on
#: sunspots (984 steps, d = 2) where the affine control's sequential loop took 553 ms; its
#: 1000 steps take 48 s where 500 affine ones took 268 s, and forecast better. Subsampling
#: the steps (``subsample_steps=100``) saved a sixth of the time on this single short path and
#: forecast worse: it pays on many long paths (``benchmarks/subsample_steps.py``), not here.
NEURAL_GUIDE_OPTIONS = {"control": "linear", "conditional": None, "refresh_every": 50}
#: Options of the guide of ``fit``'s linear models beyond the defaults: the Laplace start also
#: searches from two draws of the prior (on Danish inflation with ``--seed 2`` the one search
#: from the family's start stopped in a mode of pure noise: 2.36x ARIMA's interval score, now
#: 1.11x). Not for the demo's Lotka-Volterra model: there the extra starts cost 1.3-1.8 s and
#: found no better fit.
LINEAR_GUIDE_OPTIONS = {"prior_starts": 2}

#: Defaults of ``--steps`` (``None``: until the ELBO stops improving, :func:`fit_svi`) and
#: ``--samples``, and their values under ``PYRO_NSDE_FAST=1``.
DEFAULT_STEPS = {
    "demo": None,
    "fit": {"neural": 1000, "ou": None, "trend": None, "auto": None},
}
DEFAULT_SAMPLES = 1000
FAST_STEPS, FAST_SAMPLES = 30, 100

#: SVI without ``--steps``: until converged, at most this many steps (the guide starts at its
#: Laplace fit; on monthly series of 300 rows a step of the seasonal models costs 0.1-0.2 s);
#: ``fit`` with a linear model takes this many particles per step (the demo and the neural
#: model fit_svi's default).
FIT_MAX_STEPS, FIT_PARTICLES = 500, 4

#: ``fit`` corrects the guide's draws by importance resampling for paths of at most this many
#: coordinates (grid points × state dimension).
RESAMPLE_MAX_COORDINATES = 2048

#: The models of ``fit --model``.
MODEL_NAMES = {
    "neural": "neural",
    "ou": "Ornstein-Uhlenbeck",
    "trend": "local linear trend",
}

#: Central probabilities of the posterior predictive intervals whose coverage is reported.
COVERAGE_LEVELS = (0.5, 0.9)
#: Observations whose leave-one-out Pareto ``k̂`` exceeds this are counted as unreliable.
PARETO_K_MAX = 0.7


def fast_mode() -> bool:
    """Whether ``PYRO_NSDE_FAST`` asks for a quick run."""
    return os.environ.get("PYRO_NSDE_FAST", "") not in ("", "0")


# --------------------------------------------------------------------------- fitting


def interval_coverage(pit: np.ndarray, level: float = 0.9) -> float:
    """Share of observations inside the central ``level`` interval of their predictive laws,
    from the probability integral transforms ``pit`` (``u_i = P(ỹ_i ≤ y_i)``) of the
    observations: ``|u_i - 1/2| ≤ level/2``; ``NaN`` values are left out.

    :param np.ndarray pit: PIT values in ``[0, 1]``.
    :param float level: in ``(0, 1)``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), but got {level!r}")
    pit = np.asarray(pit, dtype=float).reshape(-1)
    present = ~np.isnan(pit)
    return float((np.abs(pit[present] - 0.5) <= level / 2).mean())


# --------------------------------------------------------------------------- outputs


def _in_data_units(array, state_loc, state_scale, names, log: bool):
    """A path variable ``(chain, draw, time, state)`` in data units:
    ``loc + scale · state`` per coordinate, then ``exp`` if ``log``; state labels ``names``."""
    value = state_loc + state_scale * array  # numpy broadcasting along the state dim
    value = np.exp(value) if log else value
    return value.assign_coords({array.dims[-1]: names}).rename(array.name)


def _write_outputs(out: Path, idata, losses, future, units, observations, parameters, title, table):
    """Write the NetCDF file, the summary, the forecast table and the figures.

    :param idata: the fit, from :func:`~pyro_nsde.analysis.diagnostics.to_inference_data`
        (``InferenceData`` or ``DataTree``).
    :param losses: the SVI losses.
    :param future: the forecast of the path (plotted with the posterior paths, both in data
        units: :func:`_in_data_units` with ``units``).
    :param observations: ``(times, values)`` drawn as points.
    :param parameters: the variables summarized.
    :param str title: the title of the path figures.
    :param table: the predictive quantiles of future observations (:func:`forecast_table`),
        written to ``forecast.csv`` and drawn on the forecast figure.
    :returns: ``({what: file}, summary table)``.
    """
    import matplotlib.pyplot as plt

    from ..analysis.plots import plot_elbo, plot_forecast, plot_path_bands

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "posterior": out / "posterior.nc",
        "summary": out / "summary.csv",
        "forecast table": out / "forecast.csv",
    }
    arviz_adapter.to_netcdf(idata, files["posterior"])
    summary = arviz_adapter.summary(idata, var_names=parameters, hdi_prob=0.9)
    summary.to_csv(files["summary"], float_format="%.6g")
    # Times at full precision (they join the data), the quantiles to 6 digits.
    exact = table.assign(time=[repr(float(t)) for t in table["time"]])
    exact.to_csv(files["forecast table"], index=False, float_format="%.6g")

    paths = _in_data_units(arviz_adapter.group(idata, "posterior")["x"], **units)
    future = _in_data_units(future, **units)
    view = arviz_adapter.from_datasets({"posterior": paths.to_dataset()})
    figures = {
        "paths": plot_path_bands(view, observations=observations),
        "forecast": plot_forecast(view, future, observations=observations),
        "elbo": plot_elbo(losses),
    }
    _draw_observation_bands(figures["forecast"][1], table)
    for name in ("paths", "forecast"):
        fig, axes = figures[name]
        axes[0, 0].set_title(f"{title}: {'posterior' if name == 'paths' else 'forecast'}")
        width, height = fig.get_size_inches()
        fig.set_size_inches(max(width, 8.0), height + 0.5)
    for name, (fig, _) in figures.items():
        files[name] = out / f"{name}.png"
        fig.savefig(files[name], dpi=110)
        plt.close(fig)
    return files, summary


def _draw_observation_bands(axes, table):
    """The 50 % and 90 % predictive intervals of future observations (``forecast.csv``) on
    the forecast figure: series ``i`` observes the path's coordinate ``i`` (row ``i``)."""
    labels = ("observation 90%", "observation 50%")
    for row, (_, rows) in enumerate(table.groupby("series", sort=False)):
        axis = axes[row, 0]
        for (low, high, alpha), label in zip(
            (("q05", "q95", 0.15), ("q25", "q75", 0.3)), labels, strict=True
        ):
            axis.fill_between(
                rows["time"], rows[low], rows[high], color="C3", alpha=alpha, lw=0, label=label
            )
        axis.plot(rows["time"], rows["q50"], color="C3", lw=1, label="observation median")
    # The figure's legend (below the panels) was drawn before the bands: draw it again.
    figure = axes[0, 0].figure
    for legend in figure.legends:
        legend.remove()
    handles, names = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncols=3)


def _loo_check(idata, num_observed) -> tuple[dict | None, str]:
    """``({level: coverage} or None, the line to print)``: the share of the observed values
    inside the central intervals of their leave-one-out predictive laws (PSIS-LOO PIT), with
    the number of observations whose Pareto ``k̂`` exceeds :data:`PARETO_K_MAX` (their
    leave-one-out weights unreliable). In-sample intervals (the posterior predictive law that
    has seen ``y_i``) cover more than their level by construction; these do not. ``None``
    where PSIS cannot run (ArviZ ≥ 1 needs at least 5 draws in the tail of each
    observation's weights: about 25 posterior draws)."""
    title = "leave-one-out predictive check (PSIS-LOO)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # k̂ > 0.7: counted and reported instead
            pit = arviz_adapter.loo_pit(idata, "y")
            pareto_k = arviz_adapter.loo(idata, "y").pareto_k
    except ValueError as error:
        return None, f"{title} not run: {error}"
    coverage = {level: interval_coverage(pit, level) for level in COVERAGE_LEVELS}
    inside = ", ".join(f"{value:.0%} in the {level:.0%}" for level, value in coverage.items())
    line = (
        f"{title}: of the {num_observed} observations, {inside} central intervals given the others"
    )
    unreliable = int((pareto_k > PARETO_K_MAX).sum())
    if unreliable:
        line += (
            f"; Pareto k > {PARETO_K_MAX} for {unreliable} of them, whose leave-one-out weights "
            f"are unreliable (the shares lean towards in-sample ones, too high); --holdout "
            f"scores the forecast on held-out rows"
        )
    return coverage, line


def _report(files, check: str):
    print(check)
    width = max(len(name) for name in files)
    print("outputs:")
    for name, path in files.items():
        print(f"  {name:<{width}}  {path}")


def _svi_steps(steps: int | None) -> str:
    return "SVI until converged" if steps is None else f"{steps} SVI steps"


# --------------------------------------------------------------------------- commands


def _fit_and_forecast(model, values, coords, future_obs, args, particles=None):
    """Fit ``model`` to ``values`` with a ``GirsanovGuide`` (its defaults; for a neural model
    :data:`NEURAL_GUIDE_OPTIONS`) and :func:`~pyro_nsde.fit_svi`, convert the posterior to ArviZ
    (importance-resampled where its Pareto ``k̂`` allows), and forecast the path and the
    observations at the ``future_obs`` times (the path on the model's grid continued to them):
    ``(losses, idata, forecast path, observation draws (S, J, D))``."""
    # Imported here, not at the top: ArviZ and xarray are slow to import and --help needs neither.
    from ..analysis.forecast import forecast_observations
    from ..analysis.inference_data import to_inference_data

    options = {}
    if isinstance(model, NeuralSDE):
        options = NEURAL_GUIDE_OPTIONS
    elif isinstance(model, (OrnsteinUhlenbeck, LocalLinearTrend, Seasonal)):
        options = LINEAR_GUIDE_OPTIONS
    guide = GirsanovGuide(model, **options)
    # Out of the timing: ArviZ's import, and torch's lazy import of its compiler (on the first
    # step of any torch optimizer).
    arviz_adapter.load()
    import torch._dynamo  # noqa: F401

    start = time.perf_counter()
    losses = fit_svi(
        model,
        guide,
        values,
        steps=args.steps,
        max_steps=FIT_MAX_STEPS,
        num_particles=particles,
        max_plate_nesting=2,
        progress=not args.quiet,
    )
    # Importance resampling weighs 2000 to 6000 guide draws of the whole path: on a long path
    # of several coordinates that is most of the run (2000 draws of a 957-step path of 4
    # coordinates: 23-43 s), and it is declined there (k > 1 on monthly series).
    cheap = model.times.shape[0] * model.state_dim <= RESAMPLE_MAX_COORDINATES
    idata = to_inference_data(
        model,
        guide=guide,
        model_args=(values,),
        num_samples=args.samples,
        coords=coords,
        importance_resampling="auto" if cheap else False,
    )
    seconds = time.perf_counter() - start
    stats = arviz_adapter.group(idata, "sample_stats").attrs
    if not args.quiet and "importance_resampled" in stats:
        state = "applied" if stats["importance_resampled"] else "not applied (k >= 0.7)"
        print(
            f"importance resampling {state}: Pareto k {stats['importance_pareto_k']:.2f}, "
            f"effective sample size {stats['importance_ess']:.0f} of "
            f"{stats['importance_proposals']} weighted proposals"
        )
    if not args.quiet:
        print(f"fit: {seconds:.1f} s ({len(losses)} SVI steps and the posterior draws)")
    draws, path = forecast_observations(model, idata, future_obs, values)
    return losses, idata, path, draws


def run_demo(args) -> dict:
    """The ``demo`` command: stochastic Lotka–Volterra on the lynx–hare data."""
    data = lynx_hare()
    first_year, last_year = float(data.times[0]), float(data.times[-1])
    if not args.forecast_to > last_year:
        raise ValueError(
            f"--forecast-to must be a year after the data's last year {last_year:g}, "
            f"but got {args.forecast_to:g}"
        )
    years = data.times - first_year
    model = LotkaVolterra(years, data.values[0].log(), steps_per_unit=args.steps_per_year)
    print(
        f"fitting a stochastic Lotka-Volterra model to the lynx-hare pelts "
        f"{first_year:.0f}-{last_year:.0f} ({model.times.shape[0] - 1} "
        f"Euler-Maruyama steps, {_svi_steps(args.steps)})"
    )
    coords = {
        "series": list(data.columns),
        "obs_time": data.times.numpy(),
        "state": ["log_hare", "log_lynx"],
    }
    horizon = args.forecast_to - last_year
    # Yearly, and the last year asked for if it is not a whole number of years on.
    ahead = torch.arange(1, math.floor(horizon) + 1, dtype=years.dtype)
    if math.floor(horizon) < horizon:
        ahead = torch.cat([ahead, ahead.new_tensor([horizon])])
    future_obs = float(years[-1]) + ahead
    fitted = _fit_and_forecast(model, data.values, coords, future_obs, args)
    losses, idata, path, draws = fitted
    table = forecast_table(draws, future_obs.numpy() + first_year, data.columns)
    # Years since the first observation → calendar years.
    time = arviz_adapter.group(idata, "posterior").time + first_year
    idata = arviz_adapter.update_group(idata, "posterior", coords={"time": time})
    path = path.assign_coords(time=path.time + first_year)
    names = [f"{name} (thousands)" for name in data.columns]
    units = {"state_loc": np.zeros(2), "state_scale": np.ones(2), "names": names, "log": True}
    files, summary = _write_outputs(
        Path(args.out),
        idata,
        losses,
        path,
        units,
        (data.times.numpy(), data.values.numpy()),
        [*LotkaVolterra.rate_names, "sigma_process", "sigma_obs"],
        "Lotka-Volterra SDE",
        table,
    )
    print("rates per year (posterior mean ± sd; Carpenter 2018 posterior mean):")
    for name, published in PUBLISHED_RATES.items():
        row = summary.loc[name]
        print(f"  {name:<6} {row['mean']:.3f} ± {row['sd']:.3f}   ({published})")
    coverage, check = _loo_check(idata, int(data.mask.sum()))
    _report(files, check)
    return {"files": files, "coverage": coverage, "summary": summary}


def run_fit(args) -> dict:
    """The ``fit`` command: a latent neural SDE or OU model on a user's CSV file."""
    columns = None if args.columns is None else [c.strip() for c in args.columns.split(",")]
    # Read and standardize in double precision (times may be large, e.g. Unix timestamps),
    # then fit in the default dtype.
    series = read_csv(args.data, time=args.time, columns=columns, dtype=torch.float64)
    series, held_out = _split(series, args.holdout)
    scaled, (loc, scale), (t0, unit) = _standardize(series, torch.get_default_dtype())
    num = series.values.shape[1]
    if args.model == "neural" and args.period is not None:
        raise ValueError("--period adds a cycle to the trend and ou models, not to neural")
    if args.model == "auto":
        args.model = choose_model(series, args)
    period = None if args.period is None else args.period / unit
    model, state_names = _latent_model(args.model, scaled, args.steps_per_unit, period)
    title = MODEL_NAMES[args.model]
    title += "" if period is None else f" and cycle (period {args.period:.4g} {series.time_name})"
    print(
        f"fitting a latent {title} SDE "
        f"to {', '.join(series.columns)} ({len(series)} rows, {int(series.mask.sum())} values, "
        f"{model.times.shape[0] - 1} Euler-Maruyama steps, {_svi_steps(args.steps)})"
    )
    coords = {
        "series": list(series.columns),
        "obs_time": series.times.numpy(),
        "state": state_names,
        "coordinates": state_names,
    }
    future_obs = _future_observation_times(scaled, held_out, t0, unit, args.forecast)
    particles = None if args.model == "neural" else FIT_PARTICLES
    fitted = _fit_and_forecast(model, scaled.values, coords, future_obs, args, particles=particles)
    losses, idata, path, draws = fitted
    # In the time column's own values: the held-out rows' times as read, else the last row's
    # time plus whole median gaps.
    if held_out is not None:
        times = held_out.times.numpy()
    else:
        gaps = np.arange(1, len(future_obs) + 1, dtype=np.float64)
        times = series.times[-1].item() + unit * gaps
    table = forecast_table(draws, times, series.columns, loc.numpy(), scale.numpy())
    if isinstance(model, OrnsteinUhlenbeck):
        note = overshoot_note(
            model, arviz_adapter.group(idata, "posterior")["theta"], series.columns
        )
        if note:
            print(note)
    # Model time (median gaps since the first row) → the time column's units.
    time = t0 + unit * arviz_adapter.group(idata, "posterior").time.astype(np.float64)
    idata = arviz_adapter.update_group(idata, "posterior", coords={"time": time})
    posterior = arviz_adapter.group(idata, "posterior")
    path = path.assign_coords(time=t0 + unit * path.time.astype(np.float64))
    extra = model.state_dim - num
    units = {
        "state_loc": np.concatenate([loc.numpy(), np.zeros(extra)]),
        "state_scale": np.concatenate([scale.numpy(), np.ones(extra)]),
        "names": state_names,
        "log": False,
    }
    observations = np.concatenate(
        [series.values.numpy(), np.full((len(series), extra), np.nan)], axis=1
    )
    files, _ = _write_outputs(
        Path(args.out),
        idata,
        losses,
        path,
        units,
        (series.times.numpy(), observations),
        [name for name in posterior.data_vars if name != "x"],
        f"latent {title} SDE",
        table,
    )
    if held_out is not None:
        values = loc.numpy() + scale.numpy() * draws.double().numpy()
        files["backtest"] = Path(args.out) / "backtest.csv"
        result = backtest(series, held_out, values, files["backtest"])
        print(result.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(
        f"parameters are in standardized units: each column minus its mean, divided by its "
        f"standard deviation; time in units of {unit:.10g} {series.time_name} from {t0:.10g}"
    )
    coverage, check = _loo_check(idata, int(series.mask.sum()))
    _report(files, check)
    return {"files": files, "coverage": coverage}


def _future_observation_times(scaled: TimeSeries, held_out, t0, unit, horizon):
    """The forecast times of ``forecast.csv`` in model time: the held-out rows' times, else
    whole median gaps past the last row up to ``horizon`` (time column's units; default a
    quarter of the data's span: the last fifth of a series held out is a quarter of the rest)."""
    if held_out is not None:
        return ((held_out.times - t0) / unit).to(scaled.times.dtype)
    span = float(scaled.times[-1])
    gaps = math.ceil((0.25 * span if horizon is None else horizon / unit) - 1e-9)
    return span + torch.arange(1, max(gaps, 1) + 1, dtype=scaled.times.dtype)


def choose_model(series: TimeSeries, args) -> str:
    """``--model auto``: the Ornstein–Uhlenbeck model if every column is found stationary (a
    KPSS test at the 5 % level does not reject stationarity and an augmented Dickey–Fuller
    test rejects a unit root: :func:`~pyro_nsde.analysis.backtest.stationary`), else the local
    linear trend; with a stochastic cycle where the periodogram finds one
    (:func:`dominant_period`, which sets ``args.period``). Says which and why.

    A stationary series is forecast best by an OU process, which relaxes to its mean with a
    bounded variance; a trending or wandering one by the trend model, which continues its slope
    with a growing variance. Each loses where the other wins, but not equally (the backtests of
    the README, ``benchmarks/accuracy/backtest.py``): OU on a trending series scored 4-11x
    ARIMA's interval score, the trend model on a stationary one 1.2-2.2x. So the OU model
    needs both tests' evidence; the KPSS test alone (``auto.arima``'s rule for differencing)
    passed a short series that trends (44 rows of Danish money, OU 4.3x, trend 1.2x).
    Choosing by a backtest on the last rows of the data instead (fitting both to the rest) was
    tried: it costs two more fits, and on the README's series it picked the worse model more
    often than the tests. The marginal likelihood of the training rows (Laplace) was tried:
    it prefers the trend model's momentum on sunspots, whose forecasts it loses (2.2x)."""
    from ..analysis.backtest import stationary

    scaled, _, (_, unit) = _standardize(series, torch.float64)
    cycle = ""
    if args.period is None:
        period = dominant_period(scaled)
        if period is not None:
            args.period = period * unit
            cycle = f"; a cycle of period {args.period:.4g} {series.time_name} (periodogram)"
    values = scaled.values.numpy()
    if args.period is not None:  # the tests are for what the cycle leaves
        values = _without_cycle(values, args.period / unit)
    wandering = [
        name
        for name, column in zip(series.columns, values.T, strict=True)
        if not stationary(column)
    ]
    model = "trend" if wandering else "ou"
    reason = f"{', '.join(wandering)} not found stationary" if wandering else "stationary"
    print(f"model: {MODEL_NAMES[model]} (KPSS and Dickey-Fuller tests: {reason}{cycle})")
    return model


def _without_cycle(values: np.ndarray, period: float) -> np.ndarray:
    """``values`` ``(N, D)`` (``NaN`` missing; rows evenly spaced, as :func:`dominant_period`
    takes them) less each column's least-squares sinusoid of ``period`` rows."""
    angle = 2 * math.pi * np.arange(values.shape[0]) / period
    design = np.stack([np.ones_like(angle), np.cos(angle), np.sin(angle)], axis=1)
    result = values.copy()
    for j, column in enumerate(values.T):
        seen = ~np.isnan(column)
        coefficients = np.linalg.lstsq(design[seen], column[seen], rcond=None)[0]
        result[:, j] = column - design[:, 1:] @ coefficients[1:]
    return result


def dominant_period(scaled: TimeSeries, min_ratio: float = 30.0, min_cycles: float = 6.0):
    """The period (in the model's time units, median gaps) of the strongest cycle in the
    columns of ``scaled``, or ``None`` if none stands out: the periodogram of the columns with
    their linear trends removed (missing values set to the trend; the rows taken as evenly
    spaced), periods from 2 gaps to a ``min_cycles``-th of the span. A cycle is a narrow peak,
    so a peak is measured against its neighbourhood, not the whole spectrum (a wandering
    series has most of its power at low frequencies): its ratio to the median of the
    periodogram within 8 frequencies on either side (the two next to it left out) must pass
    ``min_ratio``; the period is then read off the peak of the periodogram between the Fourier
    frequencies. On 1800 simulated series without a cycle (random walks, AR(1) with
    ``φ = 0.9`` and white noise, 50–300 points) the largest ratio passed 26 in 1 % of them and
    36 in 0.1 %; on monthly CO2 and El Niño and quarterly inflation it is 4700, 560 and 230."""
    values = scaled.values.double().numpy()
    rows = np.arange(values.shape[0], dtype=np.float64)
    power, residuals = 0.0, []
    for column in values.T:
        seen = ~np.isnan(column)
        if seen.sum() < 8:
            return None
        slope, intercept = np.polyfit(rows[seen], column[seen], 1)
        residual = np.where(seen, column - (slope * rows + intercept), 0.0)
        residuals.append(residual)
        power = power + np.abs(np.fft.rfft(residual)) ** 2
    freqs = np.fft.rfftfreq(len(rows))
    searched = np.flatnonzero((freqs >= min_cycles / len(rows)) & (freqs > 0))
    if len(searched) < 3:
        return None
    ratios = []
    for k in searched:
        window = [j for j in range(k - 8, k + 9) if 0 < j < len(power) and abs(j - k) > 1]
        ratios.append(power[k] / max(np.median(power[window]), 1e-300))
    best = int(np.argmax(ratios))
    if ratios[best] <= min_ratio:
        return None
    # The peak between the Fourier frequencies: the periodogram on a grid 1/64 of their
    # spacing apart, within one spacing of the peak (12 rows, not 11.5, in 115 monthly rows).
    spacing = freqs[1]
    fine = freqs[searched[best]] + spacing * np.linspace(-1.0, 1.0, 129)
    waves = np.exp(-2j * np.pi * np.outer(fine, rows))
    fine_power = sum(np.abs(waves @ residual) ** 2 for residual in residuals)
    return float(1.0 / fine[int(np.argmax(fine_power))])


def _latent_model(name: str, scaled: TimeSeries, steps_per_unit: float, period=None):
    """``(model, state names)`` of ``fit --model name`` for standardized data (``period``:
    the seasonal model's, in the model's time units)."""
    num, columns = scaled.values.shape[1], list(scaled.columns)
    if name == "neural":
        model = NeuralSDE(scaled.times, num, steps_per_unit=steps_per_unit)
        return model, [*columns, *(f"z{i}" for i in range(1, model.state_dim - num + 1))]
    if name == "trend":
        model = LocalLinearTrend(scaled.times, num, steps_per_unit=steps_per_unit)
        names = [*columns, *(f"{column}_slope" for column in columns)]
    else:
        model = OrnsteinUhlenbeck(scaled.times, num, steps_per_unit=steps_per_unit)
        names = columns
    if period is None:
        return model, names
    cycle = [f"{column}_{part}" for part in ("cycle", "cycle_sine") for column in columns]
    return Seasonal(model, period), [*names, *cycle]


def _split(series: TimeSeries, holdout):
    """``(rows to fit, held-out rows or None)``: the last ``holdout`` rows (a count, or a
    fraction below 1 of the rows) held out."""
    if holdout is None:
        return series, None
    count = round(holdout * len(series)) if holdout < 1 else int(holdout)
    if holdout >= 1 and holdout != int(holdout):
        raise ValueError(f"--holdout must be a fraction below 1 or a count of rows, got {holdout}")
    if not 1 <= count <= len(series) - 3:
        raise ValueError(
            f"--holdout {holdout:g} holds out {count} of the {len(series)} rows; at least 1 "
            f"must be held out and 3 kept"
        )
    keep = len(series) - count

    def rows(part):
        return TimeSeries(series.times[part], series.values[part], series.columns, series.time_name)

    return rows(slice(None, keep)), rows(slice(keep, None))


def backtest(series: TimeSeries, held_out: TimeSeries, draws, path: Path):
    """Score the predictive ``draws`` ``(S, J, D)`` (data units) of the held-out rows, and the
    automatically selected ARIMA of each series fitted to the same rows
    (:mod:`~pyro_nsde.analysis.backtest`); write and return the table."""
    import pandas
    from scipy.stats import norm

    from ..analysis.backtest import LEVELS, arima_forecast, crps_draws, crps_normal, scores

    rows = []
    truth = held_out.values.numpy()
    for i, name in enumerate(series.columns):
        y = truth[:, i]
        tails = {level: ((1 - level) / 2, (1 + level) / 2) for level in LEVELS}
        bounds = {k: np.quantile(draws[:, :, i], v, axis=0) for k, v in tails.items()}
        ours = scores(
            {k: v[0] for k, v in bounds.items()},
            {k: v[1] for k, v in bounds.items()},
            crps_draws(draws[:, :, i], np.nan_to_num(y)),
            y,
        )
        rows.append({"series": name, "model": "pyro-nsde", **ours})
        mean, sd, order = arima_forecast(series.values[:, i].numpy(), len(y))
        z = {level: norm.ppf((1 + level) / 2) for level in LEVELS}
        baseline = scores(
            {k: mean - v * sd for k, v in z.items()},
            {k: mean + v * sd for k, v in z.items()},
            crps_normal(mean, sd, np.nan_to_num(y)),
            y,
        )
        rows.append({"series": name, "model": f"ARIMA{order}", **baseline})
    table = pandas.DataFrame(rows)
    table.to_csv(path, index=False, float_format="%.6g")
    return table


def overshoot_note(model: OrnsteinUhlenbeck, theta, columns, threshold: float = 0.005):
    """A note when more than ``threshold`` of the posterior draws of an OU rate ``θ`` (an
    array whose last axis runs over the series, the others over draws) put the Euler–Maruyama
    step past the mean, ``θ h > 1`` for the grid's largest step ``h``; ``None`` otherwise.

    There the chain's factor ``a = 1 - θ h`` is negative, and with an even number of steps
    between observations the discretized model barely tells ``a`` from ``-a`` (not at all for
    ``μ = 0``): it has a second mode at ``θ' = (2 - θ h) / h`` that the SDE does not have.
    Exact inference on the discretized model finds it (its mass is about the prior's ratio at
    ``θ'`` and ``θ``), and it inflates ``θ``'s sd far more than its quantiles."""
    step = float(model.times.diff().max())
    draws = np.asarray(theta).reshape(-1, len(columns))
    shares = (draws * step > 1).mean(0)
    flagged = [
        f"{name} {share:.1%}"
        for name, share in zip(columns, shares, strict=True)
        if share > threshold
    ]
    if not flagged:
        return None
    return (
        f"note: posterior draws of theta with theta * h > 1 (h = {step:.3g}, the Euler-Maruyama "
        f"step): {', '.join(flagged)}. There a step overshoots the mean, and the discretized "
        f"model has an aliased mode near theta = 2/h that the SDE does not have; it widens "
        f"theta's sd far more than its quantiles (read those), and a larger --steps-per-unit "
        f"moves it further out and shrinks it."
    )


def _standardize(series: TimeSeries, dtype: torch.dtype):
    """Columns to mean 0 and scale 1 (over their observed values), time to ``(t - t_0) / u``
    with ``u`` the median gap between observations.

    :returns: ``(scaled series in dtype, (loc, scale) per column, (t_0, u))``.
    """
    values, observed = series.values, series.mask
    count = observed.sum(0)
    filled = torch.where(observed, values, torch.zeros_like(values))
    loc = filled.sum(0) / count
    spread = torch.where(observed, values - loc, torch.zeros_like(values))
    scale = (spread.square().sum(0) / count).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    t0 = series.times[0].item()
    unit = (series.times[1:] - series.times[:-1]).median().item()
    scaled = TimeSeries(
        times=((series.times - t0) / unit).to(dtype),
        values=((values - loc) / scale).to(dtype),
        columns=series.columns,
        time_name=series.time_name,
    )
    return scaled, (loc, scale), (t0, unit)


# --------------------------------------------------------------------------- parsing


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _common_options(sub):
    """The options of both commands."""
    out = f"pyro_nsde_{sub.prog.split()[-1]}"
    steps = DEFAULT_STEPS[sub.prog.split()[-1]]
    if isinstance(steps, dict):
        steps = ", ".join(
            f"{value or 'until converged'} for --model {key}" for key, value in steps.items()
        )
    steps = steps or "until converged"
    sub.add_argument("--out", default=out, help=f"output folder (default: {out})")
    sub.add_argument("--steps", type=_positive_int, help=f"SVI steps (default: {steps})")
    sub.add_argument(
        "--samples",
        type=_positive_int,
        help=f"posterior draws written to the NetCDF file (default: {DEFAULT_SAMPLES})",
    )
    sub.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")


def _fit_options(fit):
    """The options of ``fit``."""
    fit.add_argument("data", help="the CSV file")
    fit.add_argument("--time", required=True, help="the name of the (numeric) time column")
    fit.add_argument("--columns", help="comma-separated value columns (default: all others)")
    fit.add_argument(
        "--model",
        choices=("auto", "trend", "ou", "neural"),
        default="auto",
        help="trend: a local linear trend per column (the level integrates a mean-reverting "
        "slope); ou: an Ornstein-Uhlenbeck process per column; neural: a latent SDE with a "
        "neural drift; auto: ou where KPSS and Dickey-Fuller tests find every column stationary, "
        "else trend,"
        " with a stochastic cycle where the periodogram finds one (default: auto)",
    )
    fit.add_argument(
        "--forecast",
        type=_positive_float,
        help="forecast horizon in the time column's units (default: a quarter of the data's "
        "span, in whole median gaps between rows)",
    )
    fit.add_argument(
        "--holdout",
        type=_positive_float,
        help="hold out the last rows (a fraction below 1, or a number of rows), forecast "
        "them and score the forecast against an ARIMA baseline in backtest.csv",
    )
    fit.add_argument(
        "--period",
        type=_positive_float,
        help="add a stochastic cycle of this period (in the time column's units) to the "
        "trend or ou model (default: none; with --model auto, the periodogram's peak where "
        "one stands out)",
    )
    fit.add_argument(
        "--steps-per-unit",
        type=_positive_float,
        default=4.0,
        help="Euler-Maruyama steps per median gap between observations (default: 4)",
    )
    _common_options(fit)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyro-nsde`` (``python -m pyro_nsde``)."""
    parser = argparse.ArgumentParser(
        prog="pyro-nsde",
        description="Fit latent stochastic differential equations with Pyro and the Girsanov "
        "guide; write an ArviZ NetCDF file, a summary and plots.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="stochastic Lotka-Volterra model of the lynx-hare pelts 1900-1920",
        description="Fit a stochastic Lotka-Volterra model on log-populations to the Hudson's "
        "Bay Company lynx and hare pelts 1900-1920 and forecast to 1930.",
    )
    _common_options(demo)
    demo.add_argument(
        "--steps-per-year",
        type=_positive_float,
        default=5.0,
        help="Euler-Maruyama steps per year (default: 5)",
    )
    demo.add_argument(
        "--forecast-to",
        type=float,
        default=1930.0,
        help="forecast the populations up to this year (default: 1930)",
    )

    fit = commands.add_parser(
        "fit",
        help="fit a latent SDE to the columns of a CSV file",
        description="Fit a latent SDE to the columns of a CSV file with a header row. Missing "
        "values (empty cells, NA, NaN) are allowed; times must be numeric and strictly "
        "increasing. Columns are standardized before fitting.",
    )
    _fit_options(fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``pyro-nsde`` with the arguments ``argv`` (default: ``sys.argv[1:]``).

    Seeds Pyro with ``--seed`` and clears Pyro's parameter store before fitting.

    :returns: ``0`` on success; bad input exits with status 1 and a one-line message on
        stderr (``SystemExit``), bad options with status 2 (argparse).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    fast = fast_mode()
    if args.steps is None:
        steps = DEFAULT_STEPS[args.command]
        if isinstance(steps, dict):
            steps = steps[args.model]
        args.steps = FAST_STEPS if fast else steps
    if args.samples is None:
        args.samples = FAST_SAMPLES if fast else DEFAULT_SAMPLES
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    command = run_demo if args.command == "demo" else run_fit
    try:
        command(args)
    except (ValueError, OSError) as error:
        parser.exit(1, f"pyro-nsde {args.command}: error: {error}\n")
    sys.stdout.flush()
    return 0


__all__ = [
    "build_parser",
    "choose_model",
    "fit_svi",
    "interval_coverage",
    "main",
    "run_demo",
    "run_fit",
]
