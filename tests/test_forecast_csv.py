"""Predictive quantiles of future observations (``forecast.csv``) and the backtest scores.

For an Ornstein–Uhlenbeck model with known parameters and a known path up to its last time
``t_K``, a future observation ``k`` Euler–Maruyama steps of size ``h`` later is normal:

    ``y ~ N(μ + (x_K - μ) a^k, σ² h Σ_{i<k} a^{2i} + τ²)``,   ``a = 1 - θ h``,

so the quantiles of ``forecast.csv`` are known exactly, observation noise ``τ`` included.
"""

import argparse
import csv
import math
import re

import numpy as np
import pytest
import torch
from scipy.stats import norm

from pyro_nsde.analysis.backtest import (
    crps_draws,
    crps_normal,
    differences,
    interval_score,
    scores,
    stationary,
)
from pyro_nsde.analysis.forecast import QUANTILES, forecast_observations, forecast_table
from pyro_nsde.app.cli import choose_model, dominant_period, main
from pyro_nsde.zoo.datasets import TimeSeries
from pyro_nsde.zoo.models import LocalLinearTrend, OrnsteinUhlenbeck, Seasonal

QUICK = ["--steps", "3", "--samples", "50", "--quiet"]
COLUMNS = ["time", "series", "mean", "q05", "q25", "q50", "q75", "q95"]


@pytest.mark.parametrize("noise", [0.5, 0.05])
def test_forecast_observations_have_the_exact_predictive_quantiles(default_dtype, noise):
    default_dtype(torch.float64)
    theta, mu, sigma, last = 0.8, 0.3, 0.6, -1.2
    model = OrnsteinUhlenbeck(torch.tensor([0.0, 1.0, 2.0]), 1, steps_per_unit=2)
    num_draws = 20000
    known = {"theta": theta, "mu": mu, "sigma_process": sigma, "sigma_obs": noise}
    samples = {k: torch.full((num_draws, 1), v) for k, v in known.items()}
    path = torch.linspace(0.0, last, model.times.shape[0]).reshape(-1, 1)
    samples["x"] = path.expand(num_draws, -1, -1)
    future = torch.tensor([2.5, 3.0, 4.0])
    torch.manual_seed(0)
    draws, _ = forecast_observations(model, samples, future, torch.zeros(3, 1))
    assert draws.shape == (num_draws, 3, 1)
    table = forecast_table(draws, future.numpy() + 1900, ["level"], loc=[100.0], scale=[10.0])
    assert list(table.columns) == COLUMNS
    np.testing.assert_allclose(table["time"], [1902.5, 1903.0, 1904.0])
    h, a = 0.5, 1 - theta * 0.5
    for row, steps in zip(table.itertuples(), (1, 2, 4), strict=True):
        mean = mu + (last - mu) * a**steps
        sd = math.sqrt(sigma**2 * h * sum(a ** (2 * i) for i in range(steps)) + noise**2)
        # 20000 draws: the q05 estimate has a standard error of 0.015 sd.
        assert abs(row.mean - (100 + 10 * mean)) < 10 * 0.05 * sd
        for q in QUANTILES:
            expected = 100 + 10 * (mean + sd * norm.ppf(q))
            assert abs(getattr(row, f"q{round(100 * q):02d}") - expected) < 10 * 0.06 * sd, q


def test_forecast_table_is_long_with_one_row_per_time_and_series():
    draws = torch.randn(400, 2, 3)
    table = forecast_table(draws, [5.0, 6.0], ["a", "b", "c"])
    assert list(table["series"]) == ["a", "b", "c"] * 2
    assert list(table["time"]) == [5.0] * 3 + [6.0] * 3
    values = table[COLUMNS[3:]].to_numpy()
    assert (np.diff(values, axis=1) >= 0).all()
    np.testing.assert_allclose(table["q50"], np.median(draws.numpy(), 0).reshape(-1))


def test_local_linear_trend_forecast_continues_the_slope(default_dtype):
    """Without noise the trend model's mean forecast is the level plus the slope integrated as
    it relaxes to β: ``v(t) = β + (v_K - β)(1 - κh)^k`` step by step."""
    default_dtype(torch.float64)
    model = LocalLinearTrend(torch.tensor([0.0, 1.0]), 1, steps_per_unit=4)
    num = 8
    known = {"kappa": 0.4, "beta": 0.1, "sigma_level": 1e-9, "sigma_slope": 1e-9}
    samples = {k: torch.full((num, 1), v) for k, v in {**known, "sigma_obs": 1e-9}.items()}
    samples["x"] = torch.tensor([[0.0, 0.5]] * model.times.shape[0]).expand(num, -1, -1)
    draws, _ = forecast_observations(model, samples, torch.tensor([2.0]), torch.zeros(2, 1))
    level, slope = 0.0, 0.5
    for _ in range(4):
        level, slope = level + 0.25 * slope, slope + 0.25 * 0.4 * (0.1 - slope)
    np.testing.assert_allclose(draws[:, 0, 0].numpy(), level, atol=1e-6)


# --------------------------------------------------------------------------- scores


def test_interval_score_is_the_width_plus_the_scaled_miss():
    lower, upper = np.array([0.0, 0.0, 0.0]), np.array([2.0, 2.0, 2.0])
    y = np.array([1.0, -0.5, 3.0])
    expected = [2.0, 2.0 + 2 / 0.1 * 0.5, 2.0 + 2 / 0.1 * 1.0]
    np.testing.assert_allclose(interval_score(lower, upper, y, 0.9), expected)
    result = scores({0.5: lower, 0.9: lower}, {0.5: upper, 0.9: upper}, np.zeros(3), y)
    assert result["points"] == 3 and result["coverage_90"] == pytest.approx(1 / 3)


def test_crps_of_draws_is_the_energy_form_and_matches_the_normal_closed_form():
    rng = np.random.default_rng(0)
    small = rng.normal(size=(7, 2))
    y = np.array([0.3, -2.0])
    brute = np.abs(small - y).mean(0) - 0.5 * np.abs(small[:, None] - small[None]).mean((0, 1))
    np.testing.assert_allclose(crps_draws(small, y), brute)
    draws = rng.normal(1.0, 2.0, size=(200000, 3))
    y = np.array([1.0, -3.0, 6.0])
    np.testing.assert_allclose(crps_draws(draws, y), crps_normal(1.0, 2.0, y), rtol=0.01)


def test_differences_follow_kpss():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=200)
    assert differences(noise) == 0
    assert differences(np.cumsum(noise)) == 1
    assert differences(np.cumsum(np.cumsum(noise))) == 2


# --------------------------------------------------------------------------- the command


def write_series(path, num=40, missing=(3, 17)):
    """A random walk with drift in large units (standardizing matters), values missing."""
    rng = np.random.default_rng(2)
    level = 5000.0
    rows = ["year,sales"]
    for k in range(num):
        level += 20.0 + 30.0 * rng.normal()
        rows.append(f"{1950 + k},{'' if k in missing else f'{level:.1f}'}")
    path.write_text("\n".join(rows) + "\n")
    return np.array([float(r.split(",")[1] or "nan") for r in rows[1:]])


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize("model", ["ou", "trend"])
def test_fit_holdout_writes_forecast_and_backtest_tables(tmp_path, model, capsys):
    data = tmp_path / "sales.csv"
    values = write_series(data)
    out = tmp_path / "out"
    argv = ["fit", str(data), "--time", "year", "--holdout", "0.2", "--model", model]
    assert main([*argv, "--out", str(out), *QUICK]) == 0
    fields, rows = read_csv(out / "forecast.csv")
    assert fields == COLUMNS
    assert [float(r["time"]) for r in rows] == [1950.0 + k for k in range(32, 40)]
    quantiles = np.array([[float(r[c]) for c in COLUMNS[3:]] for r in rows])
    assert np.isfinite(quantiles).all() and (np.diff(quantiles, axis=1) >= 0).all()
    # In the data's units: the medians are near the last kept level, not near 0.
    observed = values[:32][~np.isnan(values[:32])]
    assert np.all(np.abs(quantiles[:, 2] - observed[-1]) < 10 * observed.std())
    fields, rows = read_csv(out / "backtest.csv")
    assert fields[:3] == ["series", "model", "points"]
    assert rows[0]["model"] == "pyro-nsde" and rows[1]["model"].startswith("ARIMA")
    assert all(int(r["points"]) == 8 for r in rows)
    for r in rows:
        assert 0 <= float(r["coverage_50"]) <= float(r["coverage_90"]) <= 1
        assert float(r["interval_score_90"]) > 0 and float(r["crps"]) > 0
    printed = capsys.readouterr().out
    assert "ARIMA" in printed and str(out / "backtest.csv") in printed


def test_fit_forecasts_one_step(tmp_path):
    data = tmp_path / "sales.csv"
    write_series(data, num=12, missing=(5,))
    out = tmp_path / "out"
    argv = ["fit", str(data), "--time", "year", "--model", "ou", "--forecast", "1"]
    assert main([*argv, "--out", str(out), *QUICK]) == 0
    _, rows = read_csv(out / "forecast.csv")
    assert [float(r["time"]) for r in rows] == [1962.0]
    assert main([*argv[:-2], "--holdout", "1", "--out", str(out), *QUICK]) == 0
    _, rows = read_csv(out / "forecast.csv")
    assert [float(r["time"]) for r in rows] == [1961.0]
    _, rows = read_csv(out / "backtest.csv")
    assert [int(r["points"]) for r in rows] == [1, 1]


def test_holdout_must_leave_rows_to_fit(tmp_path, capsys):
    data = tmp_path / "sales.csv"
    write_series(data, num=6, missing=())
    with pytest.raises(SystemExit):
        main(["fit", str(data), "--time", "year", "--holdout", "4", "--out", str(tmp_path), *QUICK])
    assert "at least 1 must be held out and 3 kept" in capsys.readouterr().err


def test_auto_model_follows_stationarity_tests_and_the_periodogram(capsys):
    rng = np.random.default_rng(3)
    times = torch.arange(120.0, dtype=torch.float64)
    noise = torch.tensor(rng.normal(size=(120, 2)))

    def choose(values, names=("a", "b")):
        args = argparse.Namespace(period=None)
        series = TimeSeries(times[: len(values)], values, list(names), "t")
        return choose_model(series, args), args.period

    assert choose(noise) == ("ou", None)
    wandering = torch.stack([noise[:, 0], noise[:, 1].cumsum(0)], dim=1)
    assert choose(wandering) == ("trend", None)
    assert "b not found stationary" in capsys.readouterr().out
    seasonal = noise + 3 * torch.sin(2 * math.pi * times / 12)[:, None]
    model, period = choose(seasonal)
    assert model == "ou" and period == pytest.approx(12.0, rel=0.05)
    assert re.search(r"a cycle of period 12(\.0\d)? t \(periodogram\)", capsys.readouterr().out)
    # 44 rows of a persistent AR(1): the KPSS test passes it, the Dickey-Fuller test cannot
    # reject a unit root; the data cannot tell, and the trend model is taken.
    rng = np.random.default_rng(0)
    persistent = np.zeros(44)
    for t in range(1, 44):
        persistent[t] = 0.9 * persistent[t - 1] + rng.normal()
    assert differences(persistent) == 0 and not stationary(persistent)
    assert choose(torch.tensor(persistent)[:, None], ["c"]) == ("trend", None)
    assert "c not found stationary" in capsys.readouterr().out


def test_draws_that_diverge_on_the_forecast_grid_are_left_out_with_a_warning(default_dtype):
    """An OU rate with ``θh > 2`` makes the Euler–Maruyama chain unstable: those draws'
    forecasts are NaN (with a warning) and the observation forecast leaves them out."""
    default_dtype(torch.float64)
    model = OrnsteinUhlenbeck(torch.tensor([0.0, 1.0]), 1, steps_per_unit=4)
    theta = torch.tensor([[0.5], [40.0], [1.0]])  # h = 0.25: the second draw diverges
    samples = {
        "theta": theta,
        "mu": torch.zeros(3, 1),
        "sigma_process": torch.full((3, 1), 0.1),
        "sigma_obs": torch.full((3, 1), 0.1),
        "x": torch.ones(3, model.times.shape[0], 1),
    }
    with pytest.warns(RuntimeWarning, match="1 of 3 draws diverged"):
        draws, _ = forecast_observations(model, samples, torch.tensor([200.0]), torch.zeros(2, 1))
    assert draws.shape == (2, 1, 1) and torch.isfinite(draws).all()
    # theta * h = 2.5: each step multiplies the deviation from mu by -1.5; 36 steps later the
    # draw is finite but 10^6 times its fitted range, and is left out too.
    samples["theta"] = torch.tensor([[0.5], [10.0], [1.0]])
    with pytest.warns(RuntimeWarning, match="1 of 3 draws grew past 1000 times"):
        draws, _ = forecast_observations(model, samples, torch.tensor([10.0]), torch.zeros(2, 1))
    assert draws.shape == (2, 1, 1) and draws.abs().max() < 10


def test_seasonal_drift_rotates_the_cycle_and_the_series_observe_level_plus_cycle():
    base = LocalLinearTrend(torch.arange(5.0), 2)
    model = Seasonal(base, torch.tensor([12.0, 4.0]))
    assert model.state_dim == 8
    params = {
        "kappa": torch.tensor([0.5, 1.0]),
        "beta": torch.tensor([0.1, -0.2]),
        "damping": torch.tensor([0.05, 0.2]),
        "sigma_obs": torch.tensor([0.1, 0.2]),
    }
    x = torch.tensor([1.0, 2.0, 0.3, -0.4, 0.6, -1.0, 0.8, 0.5])  # levels, slopes, c, s
    omega = 2 * math.pi / torch.tensor([12.0, 4.0])
    expected = torch.cat(
        [
            torch.tensor([0.3, -0.4]),
            params["kappa"] * (params["beta"] - torch.tensor([0.3, -0.4])),
            -params["damping"] * x[4:6] - omega * x[6:],
            omega * x[4:6] - params["damping"] * x[6:],
        ]
    )
    torch.testing.assert_close(model.drift(params)(0.0, x), expected)
    torch.testing.assert_close(
        model.likelihood(x.expand(3, 8), params).mean, (x[:2] + x[4:6]).expand(3, 2)
    )
    ou = Seasonal(OrnsteinUhlenbeck(torch.arange(5.0), 1), 6.0)
    states = torch.tensor([[0.5, 0.25, -1.0]])
    observed = ou.likelihood(states, {"sigma_obs": torch.tensor([0.1])})
    torch.testing.assert_close(observed.mean, torch.tensor([[0.75]]))


def test_dominant_period_finds_a_cycle_and_not_a_random_walk():
    rng = np.random.default_rng(4)
    for num in (115, 150):  # 9.6 and 12.5 cycles: the period lies between Fourier frequencies
        rows = np.arange(float(num))
        seasonal = 0.02 * rows + np.sin(2 * np.pi * rows / 12) + 0.3 * rng.normal(size=num)
        series = TimeSeries(torch.tensor(rows), torch.tensor(seasonal)[:, None], ["a"], "t")
        assert dominant_period(series) == pytest.approx(12.0, rel=0.01)
    walk = np.cumsum(rng.normal(size=150))
    assert (
        dominant_period(TimeSeries(torch.tensor(rows), torch.tensor(walk)[:, None], ["a"], "t"))
        is None
    )


def test_fit_with_a_period_adds_a_cycle_to_the_model(tmp_path, capsys):
    rng = np.random.default_rng(5)
    rows = ["month,sales"] + [
        f"{k},{100 + 10 * math.sin(2 * math.pi * k / 6) + rng.normal():.2f}" for k in range(30)
    ]
    data = tmp_path / "sales.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["fit", str(data), "--time", "month", "--model", "ou", "--period", "6"]
    assert main([*argv, "--out", str(out), *QUICK]) == 0
    assert "Ornstein-Uhlenbeck and cycle (period 6 month)" in capsys.readouterr().out
    _, rows = read_csv(out / "summary.csv")
    assert {"damping", "sigma_cycle"} <= {r[""].split("[")[0] for r in rows}
    with pytest.raises(SystemExit):
        main(["fit", str(data), "--time", "month", "--model", "neural", "--period", "6", *QUICK])
    assert "--period adds a cycle to the trend and ou models" in capsys.readouterr().err


def test_forecast_times_are_the_held_out_times_as_written(tmp_path):
    """Monthly times in years (fractions that no short decimal writes): forecast.csv gives the
    held-out rows' times exactly, so that it joins the data on time."""
    rng = np.random.default_rng(6)
    times = [2000 + k / 12 for k in range(30)]
    rows = ["t,y"] + [f"{t!r},{v:.3f}" for t, v in zip(times, rng.normal(size=30), strict=True)]
    data = tmp_path / "monthly.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["fit", str(data), "--time", "t", "--model", "ou", "--holdout", "3"]
    assert main([*argv, "--out", str(out), *QUICK]) == 0
    _, rows = read_csv(out / "forecast.csv")
    assert [float(r["time"]) for r in rows] == times[-3:]
