"""The command line (``demo`` and ``fit``) and the models it fits.

The commands run in-process through ``main(argv)`` with a handful of SVI steps; one test runs
``python -m pyro_nsde --help`` in a subprocess. The model densities are checked against the
state-space density written out step by step with :mod:`torch.distributions`.
"""

import csv
import math
import subprocess
import sys

import arviz as az
import matplotlib.image
import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from torch.distributions import LogNormal, Normal

from pyro_nsde import GirsanovGuide
from pyro_nsde.analysis.arviz_adapter import group_names
from pyro_nsde.analysis.forecast import forecast
from pyro_nsde.app.cli import interval_coverage, main, overshoot_note
from pyro_nsde.zoo.models import (
    LotkaVolterra,
    NeuralSDE,
    OrnsteinUhlenbeck,
    observation_grid,
    states_at,
)

QUICK = ["--steps", "3", "--samples", "20", "--quiet"]
OUTPUTS = ("posterior.nc", "summary.csv", "paths.png", "forecast.png", "elbo.png")


# --------------------------------------------------------------------------- models


def test_observation_grid_puts_every_observation_on_the_grid():
    obs = torch.tensor([0.0, 0.3, 1.0, 2.5], dtype=torch.float64)
    times, index = observation_grid(obs, steps_per_unit=4)
    # Gaps 0.3, 0.7, 1.5 need ceil(4 * gap) = 2, 3, 6 steps.
    assert index.tolist() == [0, 2, 5, 11]
    assert torch.equal(times[index], obs)
    steps = times[1:] - times[:-1]
    assert (steps > 0).all() and (steps <= 0.25 + 1e-12).all()


def test_states_at_drops_the_singleton_plate_slots():
    path = torch.arange(5 * 2.0).reshape(5, 2)
    index = torch.tensor([0, 3])
    assert torch.equal(states_at(path, index), path[index])
    batched = path.expand(7, 1, 1, 5, 2)
    assert torch.equal(states_at(batched, index), path[index].expand(7, 2, 2))
    assert states_at(path.expand(7, 1, 5, 2), index).shape == (7, 2, 2)


def lotka_volterra_drift(x, alpha, beta, gamma, delta):
    """The Lotka–Volterra equations for log-populations, written out."""
    u, v = x[..., 0], x[..., 1]
    return torch.stack([alpha - beta * torch.exp(v), -gamma + delta * torch.exp(u)], -1)


def test_lotka_volterra_drift_follows_the_equations_for_batched_parameters():
    model = LotkaVolterra(torch.arange(3.0), torch.zeros(2))
    rates = {
        name: torch.rand(4, 1, 1) * scale + scale / 2
        for name, scale in zip(model.rate_names, (0.5, 0.03, 0.8, 0.02), strict=True)
    }
    x = torch.randn(6, 4, 1, 1, 2) + 3.0  # step axis leftmost, as log_prob calls it
    expected = lotka_volterra_drift(x, *(rates[n] for n in model.rate_names))
    assert torch.allclose(model.drift(rates)(torch.zeros(6, 1, 1, 1, 1), x), expected)


def hand_written_log_joint(model, values, y, priors, init, transition_mean, observation):
    """``log p(θ) + log p(x_0) + Σ_k log N(x_{k+1}; x_k + h f(x_k), σ² h) + Σ log p(y | x)``
    over the observed entries, one term at a time."""
    total = sum(prior.log_prob(values[name]).sum() for name, prior in priors.items())
    x, sigma = values["x"], values["sigma_process"]
    total += init.log_prob(x[0]).sum()
    times = model.times
    for k in range(times.shape[0] - 1):
        h = times[k + 1] - times[k]
        mean = x[k] + h * transition_mean(x[k])
        total += Normal(mean, sigma * h.sqrt()).log_prob(x[k + 1]).sum()
    for n, k in enumerate(model.obs_index.tolist()):
        for i in range(y.shape[1]):
            if not math.isnan(y[n, i]):
                total += observation(x[k, i], i).log_prob(y[n, i])
    return total


def test_lotka_volterra_log_joint_matches_the_state_space_density_with_missing_values(
    default_dtype,
):
    default_dtype(torch.float64)
    init_loc = torch.tensor([3.0, 1.5])
    model = LotkaVolterra(torch.tensor([0.0, 1.0, 2.5]), init_loc, steps_per_unit=2)
    y = torch.tensor([[20.0, 4.0], [float("nan"), 6.0], [35.0, float("nan")]])
    values = {
        "alpha": torch.tensor(0.6),
        "beta": torch.tensor(0.03),
        "gamma": torch.tensor(0.7),
        "delta": torch.tensor(0.02),
        "sigma_process": torch.tensor([0.2, 0.1]),
        "sigma_obs": torch.tensor([0.3, 0.4]),
        "x": init_loc + 0.3 * torch.randn(model.times.shape[0], 2),
    }
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(y)
    priors = {
        "alpha": LogNormal(math.log(0.55), 0.5),
        "beta": LogNormal(math.log(0.028), 0.5),
        "gamma": LogNormal(math.log(0.8), 0.5),
        "delta": LogNormal(math.log(0.024), 0.5),
        "sigma_process": LogNormal(-2.0, 1.0),
        "sigma_obs": LogNormal(-1.0, 1.0),
    }
    rates = [values[n] for n in model.rate_names]
    expected = hand_written_log_joint(
        model,
        values,
        y,
        priors,
        Normal(init_loc, 0.5),
        lambda x: lotka_volterra_drift(x, *rates),
        lambda state, i: LogNormal(state, values["sigma_obs"][i]),
    )
    assert torch.allclose(trace.log_prob_sum(), expected)


def test_ornstein_uhlenbeck_log_joint_matches_the_state_space_density(default_dtype):
    default_dtype(torch.float64)
    model = OrnsteinUhlenbeck(torch.tensor([0.0, 0.5, 2.0]), 2, steps_per_unit=2)
    y = torch.tensor([[0.1, float("nan")], [0.5, -0.3], [float("nan"), 0.2]])
    values = {
        "theta": torch.tensor([1.5, 0.4]),
        "mu": torch.tensor([0.3, -0.2]),
        "sigma_process": torch.tensor([0.5, 0.8]),
        "sigma_obs": torch.tensor([0.1, 0.2]),
        "x": torch.randn(model.times.shape[0], 2),
    }
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(y)
    priors = {
        "theta": LogNormal(0.0, 1.0),
        "mu": Normal(0.0, 1.0),
        "sigma_process": LogNormal(0.0, 1.0),
        "sigma_obs": LogNormal(math.log(0.1), 1.0),
    }
    expected = hand_written_log_joint(
        model,
        values,
        y,
        priors,
        Normal(0.0, 1.0),
        lambda x: values["theta"] * (values["mu"] - x),
        lambda state, i: Normal(state, values["sigma_obs"][i]),
    )
    assert torch.allclose(trace.log_prob_sum(), expected)


def test_predictive_draws_drive_the_forecast_of_each_draw_with_its_own_parameters():
    """The models' layout is the one Predictive(parallel=True) and pyro_nsde.analysis.forecast use:
    with a vanishing diffusion each forecast path is the Euler–Maruyama recursion of the
    Lotka–Volterra ODE from that draw's last state, with that draw's rates."""
    model = LotkaVolterra(torch.arange(4.0), torch.tensor([3.0, 1.5]), steps_per_unit=4)
    guide = GirsanovGuide(model, control="affine")
    y = torch.tensor([[20.0, 4.0], [30.0, 6.0], [25.0, 9.0], [15.0, 7.0]])
    samples = Predictive(model, guide=guide, num_samples=5, parallel=True)(y)
    assert samples["x"].shape == (5, 1, 1, model.times.shape[0], 2)
    assert samples["sigma_obs"].shape == (5, 1, 2)
    samples["sigma_process"] = torch.full_like(samples["sigma_process"], 1e-7)
    # forecast takes one draw per row, shaped as the sites of an unbatched trace.
    draws = {k: v.reshape(5, *(n for n in v.shape[1:] if n != 1)) for k, v in samples.items()}
    paths = forecast(model, draws, torch.linspace(3.25, 5.0, 8), model_args=(y,))
    assert paths.dims == ("chain", "draw", "time", "state") and paths.shape == (1, 5, 8, 2)
    for s in range(5):
        rates = [samples[n][s].reshape(()) for n in model.rate_names]
        x = samples["x"][s, 0, 0, -1]
        for k in range(8):
            x = x + 0.25 * lotka_volterra_drift(x, *rates)
            assert np.allclose(paths.values[0, s, k], x.numpy(), atol=1e-4)


def test_neural_sde_observes_its_first_coordinates():
    model = NeuralSDE(torch.arange(5.0), 2, latent_dim=3, hidden_dims=(8,))
    y = model()
    assert y.shape == (5, 2)
    trace = poutine.trace(model).get_trace()
    assert trace.nodes["x"]["value"].shape == (model.times.shape[0], 3)
    assert trace.nodes["sigma_process"]["value"].shape == (3,)
    states = trace.nodes["x"]["value"][model.obs_index, :2]
    assert torch.equal(trace.nodes["y"]["fn"].loc, states)
    assert "drift_net$$$0.weight" in pyro.get_param_store()


# --------------------------------------------------------------------------- coverage


def test_interval_coverage_counts_pit_values_inside_the_central_interval():
    pit = np.array([0.01, 0.05, 0.3, 0.5, 0.76, 0.96, np.nan])
    assert interval_coverage(pit, level=0.9) == pytest.approx(4 / 6)
    assert interval_coverage(pit, level=0.5) == pytest.approx(2 / 6)
    uniform = (np.arange(1000) + 0.5) / 1000
    assert interval_coverage(uniform, level=0.5) == pytest.approx(0.5)


def test_overshoot_note_names_the_series_whose_rate_overshoots_the_euler_step():
    model = OrnsteinUhlenbeck(torch.arange(10.0), 2, steps_per_unit=4.0)  # h = 0.25
    theta = np.full((2, 500, 2), 0.7)
    theta[0, :20, 1] = 7.3  # 2 % of the draws of the second series past θ h = 1
    note = overshoot_note(model, theta, ["a", "b"])
    assert note is not None and "step): b 2.0%." in note and "h = 0.25" in note
    theta[0, :20, 1] = 3.9  # θ h < 1: no note
    assert overshoot_note(model, theta, ["a", "b"]) is None


def test_interval_coverage_rejects_a_level_outside_zero_one():
    with pytest.raises(ValueError, match="level must be in"):
        interval_coverage(np.zeros(4), level=1.5)


# --------------------------------------------------------------------------- commands


def check_outputs(out, parameters):
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    idata = az.from_netcdf(out / "posterior.nc")  # InferenceData on ArviZ 0.x, DataTree on 1.x
    for group in ("posterior", "posterior_predictive", "observed_data", "log_likelihood"):
        assert group in group_names(idata), group
    assert idata.posterior["x"].dims[-2:] == ("time", "state")
    with open(out / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        summary = {row[""]: row for row in reader}
    assert reader.fieldnames == ["", "mean", "sd", "hdi_5%", "hdi_95%"]
    for name in parameters:
        assert any(row == name or row.startswith(f"{name}[") for row in summary), name
    assert all(math.isfinite(float(row["mean"])) for row in summary.values())
    for name in ("paths.png", "forecast.png", "elbo.png"):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 200
    return idata


def test_demo_writes_netcdf_summary_and_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *QUICK]) == 0
    idata = check_outputs(out, ["alpha", "beta", "gamma", "delta", "sigma_process", "sigma_obs"])
    assert idata.posterior.sizes["draw"] == 20
    assert idata.posterior["time"].values[[0, -1]].tolist() == [1900.0, 1920.0]
    assert idata.observed_data["y"].shape == (21, 2)
    printed = capsys.readouterr().out
    assert "leave-one-out predictive check" in printed and "Carpenter" in printed
    assert str(out / "forecast.png") in printed


@pytest.mark.parametrize("model", ["ou", "trend", "neural"])
def test_fit_handles_missing_values(tmp_path, model, capsys):
    rows = ["day,temp,sales,note"]
    for k in range(12):
        temp = "" if k in (2, 7) else f"{10 + 5 * math.sin(k / 2):.2f}"
        sales = "NA" if k == 5 else f"{100 + 3 * k}"
        rows.append(f"{0.5 * k},{temp},{sales},x")
    data = tmp_path / "series.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "fit"
    argv = ["fit", str(data), "--time", "day", "--columns", "temp,sales", "--model", model]
    assert main([*argv, "--forecast", "2", "--out", str(out), *QUICK]) == 0
    scales = ["sigma_level", "sigma_slope"] if model == "trend" else ["sigma_process"]
    idata = check_outputs(out, [*scales, "sigma_obs"])
    # The three missing values are left out of the observed data and the log-likelihood.
    assert idata.observed_data["y"].size == 2 * 12 - 3
    assert idata.log_likelihood["y"].shape[-1] == 2 * 12 - 3
    assert idata.posterior["time"].values[[0, -1]].tolist() == [0.0, 5.5]
    assert "standardized units" in capsys.readouterr().out


BAD_INPUTS = {
    "missing-time-column": ("t,x\n0,1\n1,2\n2,3\n", ["--time", "year"], "'year' not found"),
    "missing-value-column": ("t,x\n0,1\n1,2\n2,3\n", ["--columns", "x,y"], "'y' not found"),
    "non-numeric": ("t,x\n0,1\n1,one\n2,3\n", [], "non-numeric value 'one'"),
    "unsorted-times": ("t,x\n0,1\n2,2\n1,3\n", [], "not sorted"),
    "duplicate-times": ("t,x\n0,1\n1,2\n1,3\n", [], "duplicate time 1"),
    "too-few-rows": ("t,x\n0,1\n1,2\n", [], "at least 3 rows"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_fit_exits_with_a_message_naming_the_problem(tmp_path, capsys, case):
    text, options, message = BAD_INPUTS[case]
    data = tmp_path / "bad.csv"
    data.write_text(text)
    options = options if "--time" in options else ["--time", "t", *options]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(data), *options, "--out", str(tmp_path / "out"), *QUICK])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("pyro-nsde fit: error:") and message in error
    assert "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_fit_exits_with_a_message_for_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(tmp_path / "absent.csv"), "--time", "t", *QUICK])
    assert exit_info.value.code == 1
    assert "absent.csv" in capsys.readouterr().err


def test_demo_rejects_a_forecast_year_inside_the_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--forecast-to", "1915", "--out", str(tmp_path), *QUICK])
    assert exit_info.value.code == 1
    assert "--forecast-to must be a year after" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["demo", "--steps", "0"], ["fit", "x.csv", "--time", "t", "--model", "gp"], ["fit", "x.csv"]],
    ids=["zero-steps", "unknown-model", "no-time-column"],
)
def test_bad_options_exit_with_usage_status(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: pyro-nsde" in capsys.readouterr().err


def test_module_help_runs_in_a_fresh_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pyro_nsde", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "fit" in result.stdout
