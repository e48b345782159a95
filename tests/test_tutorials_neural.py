"""The neural-SDE tutorials run end to end in fast mode, write their figures and learn."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

TUTORIALS = pathlib.Path(__file__).resolve().parents[1] / "tutorials"


@pytest.mark.parametrize(
    "script, outputs",
    [
        ("latent_sde_toy.py", ["latent_sde_toy.png", "latent_sde_toy.json"]),
        (
            "lorenz.py",
            ["lorenz_samples.png", "lorenz_forecast.png", "lorenz_elbo.png", "lorenz.json"],
        ),
    ],
)
def test_tutorial_runs_in_fast_mode_and_improves_the_elbo(script, outputs, tmp_path):
    env = dict(os.environ, PYRO_NSDE_FAST="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(TUTORIALS / script), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / outputs[-1]).read_text())
    assert summary["fast"] is True
    before, after = summary["elbo_before"], summary["elbo_after"]
    assert after - before > 0.5 * abs(before)  # the fit closes most of the initial gap


def test_lorenz_forecast_scores_band_future_observations():
    """The Lorenz tutorial's forecast band is one for future *observations*: ``observe`` adds
    the model's noise (sd ``NOISE``) to the mapped paths, and ``forecast_scores`` counts the
    held-out points inside the 5-95 % band of the draws, per forecast time too."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("lorenz_tutorial", TUTORIALS / "lorenz.py")
    lorenz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lorenz)
    torch.manual_seed(0)
    paths = torch.zeros(20000, 2, 3, 3)
    observed = lorenz.observe(paths)
    assert abs(float(observed.std()) - lorenz.NOISE) < 0.02 * lorenz.NOISE
    # A noise-free band has no width: only observations equal to the path fall inside it.
    held_out = torch.full((2, 3, 3), 0.5 * lorenz.NOISE)
    held_out[:, 0] = 3 * lorenz.NOISE  # beyond the 95 % quantile (1.645 sd)
    assert lorenz.forecast_scores(paths, held_out)["coverage"] == 0.0
    scores = lorenz.forecast_scores(observed, held_out)
    assert scores["coverage_by_time"] == pytest.approx([0.0, 1.0, 1.0])
    assert scores["coverage"] == pytest.approx(2 / 3)
    assert scores["rmse"] == pytest.approx(float(held_out.pow(2).mean().sqrt()), abs=1e-3)
