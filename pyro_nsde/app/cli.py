r"""The command line: ``python -m pyro_nsde demo`` and ``pyro-nsde fit DATA.csv``.

Both commands fit a latent SDE with a :class:`~pyro_nsde.GirsanovGuide` by SVI (a progress bar
shows the ELBO) and write into an output folder:

- ``posterior.nc``: the fit as ArviZ NetCDF
  (:func:`~pyro_nsde.analysis.diagnostics.to_inference_data`:
  posterior, posterior predictive, observed data, pointwise log-likelihood);
- ``summary.csv``: posterior mean, sd and 90% HDI of the parameters (rates and noise scales),
  the same columns with ArviZ 0.x and 1.x;
- ``paths.png``: posterior bands of the latent paths with the data;
- ``forecast.png``: the same with a forecast fan past the data;
- ``elbo.png``: the ELBO history.

``demo`` fits :class:`~pyro_nsde.zoo.models.LotkaVolterra` to the lynx–hare pelts 1900–1920
(:func:`~pyro_nsde.zoo.datasets.lynx_hare`) and forecasts to 1930. ``fit`` reads a CSV file
(:func:`~pyro_nsde.zoo.datasets.read_csv`), standardizes each column and fits a
:class:`~pyro_nsde.zoo.models.NeuralSDE` or an :class:`~pyro_nsde.zoo.models.OrnsteinUhlenbeck`
model.
Bad input ends the command with a one-line message and exit status 1.

Set ``PYRO_NSDE_FAST=1`` for a quick run (few SVI steps and draws) unless ``--steps`` and
``--samples`` are given.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

from ..analysis import arviz_adapter
from ..guide.guide import GirsanovGuide
from ..zoo.datasets import TimeSeries, lynx_hare, read_csv
from ..zoo.models import LotkaVolterra, NeuralSDE, OrnsteinUhlenbeck
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
NEURAL_GUIDE_OPTIONS = {"control": "affine", "conditional": None, "refresh_every": 50}

#: Defaults of ``--steps`` (``None``: until the ELBO stops improving, :func:`fit_svi`) and
#: ``--samples``, and their values under ``PYRO_NSDE_FAST=1``.
DEFAULT_STEPS = {"demo": None, "fit": {"neural": 500, "ou": None}}
DEFAULT_SAMPLES = 1000
FAST_STEPS, FAST_SAMPLES = 30, 100

#: The models of ``fit --model``.
MODEL_NAMES = {"neural": "neural", "ou": "Ornstein-Uhlenbeck"}

#: Central probabilities of the posterior predictive intervals whose coverage is reported.
COVERAGE_LEVELS = (0.5, 0.9)


def fast_mode() -> bool:
    """Whether ``PYRO_NSDE_FAST`` asks for a quick run."""
    return os.environ.get("PYRO_NSDE_FAST", "") not in ("", "0")


# --------------------------------------------------------------------------- fitting


def interval_coverage(draws: np.ndarray, observed: np.ndarray, level: float = 0.9) -> float:
    """Fraction of observations inside the central ``level`` interval of their predictive draws.

    Each observation ``y_i`` is compared with the ``(1 - level)/2`` and ``(1 + level)/2``
    empirical quantiles of its draws; ``NaN`` observations are left out.

    :param np.ndarray draws: ``(S, *shape)`` predictive draws.
    :param np.ndarray observed: ``shape`` observations.
    :param float level: in ``(0, 1)``.
    """
    draws, observed = np.asarray(draws, dtype=float), np.asarray(observed, dtype=float)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), but got {level!r}")
    if draws.shape[1:] != observed.shape:
        raise ValueError(f"draws must have shape (S, *{observed.shape}), but got {draws.shape}")
    lower, upper = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
    present = ~np.isnan(observed)
    inside = (observed >= lower) & (observed <= upper)
    return float(inside[present].mean())


# --------------------------------------------------------------------------- outputs


def _in_data_units(array, state_loc, state_scale, names, log: bool):
    """A path variable ``(chain, draw, time, state)`` in data units:
    ``loc + scale · state`` per coordinate, then ``exp`` if ``log``; state labels ``names``."""
    value = state_loc + state_scale * array  # numpy broadcasting along the state dim
    value = np.exp(value) if log else value
    return value.assign_coords({array.dims[-1]: names}).rename(array.name)


def _write_outputs(out: Path, idata, losses, paths, future, observations, parameters, title):
    """Write the NetCDF file, the summary and the figures.

    :param idata: the fit, from :func:`~pyro_nsde.analysis.diagnostics.to_inference_data`
        (``InferenceData`` or ``DataTree``).
    :param losses: the SVI losses.
    :param paths: the posterior path variable in data units (plotted).
    :param future: the forecast of the path in data units.
    :param observations: ``(times, values)`` drawn as points.
    :param parameters: the variables summarized.
    :param str title: the title of the path figures.
    :returns: ``({what: file}, summary table)``.
    """
    import matplotlib.pyplot as plt

    from ..analysis.plots import plot_elbo, plot_forecast, plot_path_bands

    out.mkdir(parents=True, exist_ok=True)
    files = {"posterior": out / "posterior.nc", "summary": out / "summary.csv"}
    arviz_adapter.to_netcdf(idata, files["posterior"])
    summary = arviz_adapter.summary(idata, var_names=parameters, hdi_prob=0.9)
    summary.to_csv(files["summary"], float_format="%.6g")

    view = arviz_adapter.from_datasets({"posterior": paths.to_dataset()})
    figures = {
        "paths": plot_path_bands(view, observations=observations),
        "forecast": plot_forecast(view, future, observations=observations),
        "elbo": plot_elbo(losses),
    }
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


def _coverage(idata) -> dict:
    """``{level: coverage}`` of the observed values by their posterior predictive draws."""
    draws = arviz_adapter.group(idata, "posterior_predictive")["y"].values
    draws = draws.reshape((-1, *draws.shape[2:]))
    observed = arviz_adapter.group(idata, "observed_data")["y"].values
    return {level: interval_coverage(draws, observed, level) for level in COVERAGE_LEVELS}


def _report(files, coverage, num_observed):
    inside = ", ".join(f"{value:.0%} in the {level:.0%}" for level, value in coverage.items())
    print(
        f"posterior predictive check: of the {num_observed} observations, {inside} central "
        f"intervals"
    )
    width = max(len(name) for name in files)
    print("outputs:")
    for name, path in files.items():
        print(f"  {name:<{width}}  {path}")


def _svi_steps(steps: int | None) -> str:
    return "SVI until converged" if steps is None else f"{steps} SVI steps"


def _forecast_times(last: float, horizon: float, step: float) -> torch.Tensor:
    """``last + step, last + 2 step, ..., last + horizon`` (the last point exactly)."""
    num = max(1, math.ceil(horizon / step - 1e-9))
    return last + horizon * torch.arange(1, num + 1, dtype=torch.get_default_dtype()) / num


# --------------------------------------------------------------------------- commands


def _fit_and_forecast(model, values, coords, future, args):
    """Fit ``model`` to ``values`` with a ``GirsanovGuide`` (its defaults; for a neural model
    :data:`NEURAL_GUIDE_OPTIONS`) and :func:`~pyro_nsde.fit_svi`, convert the posterior to ArviZ
    (importance-resampled where its Pareto ``k̂`` allows) and forecast the path at ``future``
    times: ``(losses, idata, forecast path)``."""
    # Imported here, not at the top: ArviZ and xarray are slow to import and --help needs neither.
    from ..analysis.forecast import forecast
    from ..analysis.inference_data import to_inference_data

    options = NEURAL_GUIDE_OPTIONS if isinstance(model, NeuralSDE) else {}
    guide = GirsanovGuide(model, **options)
    # Out of the timing: ArviZ's import, and torch's lazy import of its compiler (on the first
    # step of any torch optimizer).
    arviz_adapter.load()
    import torch._dynamo  # noqa: F401

    start = time.perf_counter()
    losses = fit_svi(
        model, guide, values, steps=args.steps, max_plate_nesting=2, progress=not args.quiet
    )
    idata = to_inference_data(
        model, guide=guide, model_args=(values,), num_samples=args.samples, coords=coords
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
    return losses, idata, forecast(model, idata, future, model_args=(values,))


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
    future = _forecast_times(float(years[-1]), horizon, 1.0 / args.steps_per_year)
    losses, idata, path = _fit_and_forecast(model, data.values, coords, future, args)
    # Years since the first observation → calendar years.
    time = arviz_adapter.group(idata, "posterior").time + first_year
    idata = arviz_adapter.update_group(idata, "posterior", coords={"time": time})
    posterior = arviz_adapter.group(idata, "posterior")
    path = path.assign_coords(time=path.time + first_year)
    names = [f"{name} (thousands)" for name in data.columns]
    units = {"state_loc": np.zeros(2), "state_scale": np.ones(2), "names": names, "log": True}
    files, summary = _write_outputs(
        Path(args.out),
        idata,
        losses,
        _in_data_units(posterior["x"], **units),
        _in_data_units(path, **units),
        (data.times.numpy(), data.values.numpy()),
        [*LotkaVolterra.rate_names, "sigma_process", "sigma_obs"],
        "Lotka-Volterra SDE",
    )
    print("rates per year (posterior mean ± sd; Carpenter 2018 posterior mean):")
    for name, published in PUBLISHED_RATES.items():
        row = summary.loc[name]
        print(f"  {name:<6} {row['mean']:.3f} ± {row['sd']:.3f}   ({published})")
    coverage = _coverage(idata)
    _report(files, coverage, int(data.mask.sum()))
    return {"files": files, "coverage": coverage, "summary": summary}


def run_fit(args) -> dict:
    """The ``fit`` command: a latent neural SDE or OU model on a user's CSV file."""
    columns = None if args.columns is None else [c.strip() for c in args.columns.split(",")]
    # Read and standardize in double precision (times may be large, e.g. Unix timestamps),
    # then fit in the default dtype.
    series = read_csv(args.data, time=args.time, columns=columns, dtype=torch.float64)
    scaled, (loc, scale), (t0, unit) = _standardize(series, torch.get_default_dtype())
    span = (series.times[-1] - series.times[0]).item()
    horizon = 0.2 * span if args.forecast is None else args.forecast
    num = series.values.shape[1]
    if args.model == "neural":
        model = NeuralSDE(scaled.times, num, steps_per_unit=args.steps_per_unit)
        state_names = [*series.columns, *(f"z{i}" for i in range(1, model.state_dim - num + 1))]
    else:
        model = OrnsteinUhlenbeck(scaled.times, num, steps_per_unit=args.steps_per_unit)
        state_names = list(series.columns)
    print(
        f"fitting a latent {MODEL_NAMES[args.model]} SDE "
        f"to {', '.join(series.columns)} ({len(series)} rows, {int(series.mask.sum())} values, "
        f"{model.times.shape[0] - 1} Euler-Maruyama steps, {_svi_steps(args.steps)})"
    )
    coords = {
        "series": list(series.columns),
        "obs_time": series.times.numpy(),
        "state": state_names,
        "coordinates": state_names,
    }
    future = _forecast_times(float(scaled.times[-1]), horizon / unit, 1.0 / args.steps_per_unit)
    losses, idata, path = _fit_and_forecast(model, scaled.values, coords, future, args)
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
        _in_data_units(posterior["x"], **units),
        _in_data_units(path, **units),
        (series.times.numpy(), observations),
        [name for name in posterior.data_vars if name != "x"],
        f"latent {MODEL_NAMES[args.model]} SDE",
    )
    print(
        f"parameters are in standardized units: each column minus its mean, divided by its "
        f"standard deviation; time in units of {unit:.10g} {series.time_name} from {t0:.10g}"
    )
    coverage = _coverage(idata)
    _report(files, coverage, int(series.mask.sum()))
    return {"files": files, "coverage": coverage}


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyro-nsde`` (``python -m pyro_nsde``)."""
    parser = argparse.ArgumentParser(
        prog="pyro-nsde",
        description="Fit latent stochastic differential equations with Pyro and the Girsanov "
        "guide; write an ArviZ NetCDF file, a summary and plots.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub):
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

    demo = commands.add_parser(
        "demo",
        help="stochastic Lotka-Volterra model of the lynx-hare pelts 1900-1920",
        description="Fit a stochastic Lotka-Volterra model on log-populations to the Hudson's "
        "Bay Company lynx and hare pelts 1900-1920 and forecast to 1930.",
    )
    common(demo)
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
    fit.add_argument("data", help="the CSV file")
    fit.add_argument("--time", required=True, help="the name of the (numeric) time column")
    fit.add_argument("--columns", help="comma-separated value columns (default: all others)")
    fit.add_argument(
        "--model",
        choices=("neural", "ou"),
        default="neural",
        help="neural: a latent SDE with a neural drift; ou: independent Ornstein-Uhlenbeck "
        "processes (default: neural)",
    )
    fit.add_argument(
        "--forecast",
        type=_positive_float,
        help="forecast horizon in the time column's units (default: 20%% of the data's span)",
    )
    fit.add_argument(
        "--steps-per-unit",
        type=_positive_float,
        default=4.0,
        help="Euler-Maruyama steps per median gap between observations (default: 4)",
    )
    common(fit)
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


__all__ = ["build_parser", "fit_svi", "interval_coverage", "main", "run_demo", "run_fit"]
