"""Backtests of ``pyro-nsde fit`` against an automatically selected ARIMA on real series.

Each series ships with statsmodels (annual, quarterly, monthly); the command fits the first
80 % of its rows with its defaults (``--holdout 0.2``), forecasts the rest and scores both its
forecast and the ARIMA baseline's (``pyro_nsde.analysis.backtest``: coverage of the 50 % and
90 % intervals, mean interval scores, CRPS). Prints one row per series and the pooled figures.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/accuracy/backtest.py
    python benchmarks/accuracy/backtest.py --model ou --series nile sunspots
"""

import argparse
import contextlib
import io
import pathlib
import tempfile
import time
import warnings

import numpy as np
import pandas as pd

from pyro_nsde.app.cli import main


def _macro(column):
    def load(sm):
        data = sm.datasets.macrodata.load_pandas().data
        times = data["year"] + (data["quarter"] - 1) / 4
        return pd.DataFrame({"time": times, column: data[column]})

    return load


def _plain(dataset, time, column):
    def load(sm):
        data = getattr(sm.datasets, dataset).load_pandas().data
        return pd.DataFrame({"time": data[time].astype(float), column: data[column]})

    return load


def _interest(column):
    def load(sm):
        data = sm.datasets.interest_inflation.load_pandas().data
        return pd.DataFrame(
            {"time": data["year"] + (data["quarter"] - 1) / 4, column: data[column]}
        )

    return load


def _danish(column):
    def load(sm):
        data = sm.datasets.danish_data.load_pandas().data
        return pd.DataFrame(
            {"time": np.arange(len(data)) / 4 + 1974.0, column: data[column].values}
        )

    return load


def _co2(sm):
    data = sm.datasets.co2.load_pandas().data["co2"].resample("MS").mean()
    data = data.iloc[-300:]
    return pd.DataFrame({"time": np.arange(len(data)) / 12 + 1977.0, "co2": data.values})


def _elnino(sm):
    data = sm.datasets.elnino.load_pandas().data
    values = data.drop(columns="YEAR").values.reshape(-1)[-300:]
    return pd.DataFrame({"time": np.arange(len(values)) / 12 + 1976.0, "temperature": values})


def _fertility(country):
    def load(sm):
        data = sm.datasets.fertility.load_pandas().data
        row = data[data["Country Name"] == country].iloc[0]
        years = [c for c in data.columns if c.isdigit()]
        values = row[years].astype(float).values
        keep = ~np.isnan(values)
        return pd.DataFrame({"time": np.array(years, dtype=float)[keep], "births": values[keep]})

    return load


SERIES = {
    "nile": _plain("nile", "year", "volume"),
    "sunspots": _plain("sunspots", "YEAR", "SUNACTIVITY"),
    "realgdp": _macro("realgdp"),
    "unemp": _macro("unemp"),
    "infl": _macro("infl"),
    "cpi": _macro("cpi"),
    "interest": _interest("R"),
    "inflation_dp": _interest("Dp"),
    "danish_lrm": _danish("lrm"),
    "danish_ibo": _danish("ibo"),
    "co2": _co2,
    "elnino": _elnino,
    "fertility_india": _fertility("India"),
    "fertility_japan": _fertility("Japan"),
}

#: Series that took no part in choosing the defaults (``--set validation``): other columns of
#: the same data sets, and other countries.
VALIDATION = {
    "realcons": _macro("realcons"),
    "realinv": _macro("realinv"),
    "m1": _macro("m1"),
    "tbilrate": _macro("tbilrate"),
    "realint": _macro("realint"),
    "pop": _macro("pop"),
    "danish_lry": _danish("lry"),
    "danish_lpy": _danish("lpy"),
    "danish_ide": _danish("ide"),
    "fertility_usa": _fertility("United States"),
    "fertility_china": _fertility("China"),
    "fertility_brazil": _fertility("Brazil"),
    "fertility_germany": _fertility("Germany"),
}


def run(name, model, folder, extra):
    import statsmodels.api as sm

    data = {**SERIES, **VALIDATION}[name](sm)
    path = folder / f"{name}.csv"
    data.to_csv(path, index=False)
    out = folder / f"{name}_{model}"
    argv = ["fit", str(path), "--time", "time", "--holdout", "0.2", "--quiet"]
    argv += ["--out", str(out), *(["--model", model] if model else []), *extra]
    start = time.perf_counter()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(argv)
    seconds = time.perf_counter() - start
    table = pd.read_csv(out / "backtest.csv")
    fitted = [line for line in printed.getvalue().splitlines() if line.startswith("fitting")]
    table["sde"] = fitted[0].split(" SDE")[0].removeprefix("fitting a latent ") if fitted else ""
    table["sde"] = table["sde"].replace("Ornstein-Uhlenbeck", "OU")
    table.insert(0, "rows", len(data))
    table.insert(0, "name", name)
    table["seconds"] = seconds
    return table


def main_():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", nargs="+", default=None, help="default: all of --set")
    parser.add_argument(
        "--set",
        choices=("tuning", "validation"),
        default="tuning",
        help="tuning: the series the defaults were chosen on (the README's table); validation: "
        "series that took no part in choosing them",
    )
    parser.add_argument("--model", default=None, help="--model of pyro-nsde fit (default: its)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    if args.series is None:
        args.series = list(SERIES if args.set == "tuning" else VALIDATION)
    tables = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.series:
            try:
                table = run(name, args.model, pathlib.Path(folder), args.extra)
            except SystemExit as error:
                print(f"{name:>16} failed: {error}", flush=True)
                continue
            tables.append(table)
            ours, arima = table.iloc[0], table.iloc[1]
            ratio = ours["interval_score_90"] / arima["interval_score_90"]
            print(
                f"{name:>16} {int(ours['rows']):4d} rows, {int(ours['points']):3d} held out, "
                f"{ours['sde']}: "
                f"coverage 50/90 {ours['coverage_50']:.2f}/{ours['coverage_90']:.2f} "
                f"(ARIMA {arima['coverage_50']:.2f}/{arima['coverage_90']:.2f}), "
                f"IS90 {ours['interval_score_90']:.3g} vs {arima['interval_score_90']:.3g} "
                f"({ratio:.2f}x; {arima['model']}), "
                f"IS50 {ours['interval_score_50'] / arima['interval_score_50']:.2f}x, "
                f"CRPS {ours['crps'] / arima['crps']:.2f}x, {ours['seconds']:.0f} s",
                flush=True,
            )
    table = pd.concat(tables)
    ours = table[table["model"] == "pyro-nsde"]
    arima = table[table["model"] != "pyro-nsde"]
    weights = ours["points"].values
    for label, part in (("pyro-nsde", ours), ("ARIMA", arima)):
        cover = [np.average(part[f"coverage_{k}"], weights=weights) for k in (50, 90)]
        print(f"pooled {label}: coverage 50 % {cover[0]:.2f}, 90 % {cover[1]:.2f}")
    ratios = ours["interval_score_90"].values / arima["interval_score_90"].values
    ratios50 = ours["interval_score_50"].values / arima["interval_score_50"].values
    print(
        f"interval score / ARIMA's: 90 % mean {ratios.mean():.2f} (max {ratios.max():.2f}), "
        f"50 % mean {ratios50.mean():.2f} (max {ratios50.max():.2f}); "
        f"max time {ours['seconds'].max():.0f} s"
    )


if __name__ == "__main__":
    main_()
