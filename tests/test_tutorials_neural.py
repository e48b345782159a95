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
