"""Save and resume: training N steps, saving, loading in a fresh process and training M more
steps gives the parameters of N + M uninterrupted steps, bit for bit."""

import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.app.checkpoint import load_checkpoint, save_checkpoint

N_SERIES = 3
TIMES = torch.linspace(0.0, 1.0, 11)
OBS = torch.arange(2, 11, 2)
DATA = torch.randn(N_SERIES, len(OBS), generator=torch.Generator().manual_seed(1))
STEPS_BEFORE, STEPS_AFTER = 4, 4
CONTROLS = ("mlp", "affine")


def model(y):
    theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
    with pyro.plate("series", N_SERIES, dim=-1):
        x = pyro.sample(
            "x",
            EulerMaruyama(
                lambda t, x: -theta[..., None] * x,
                torch.tensor([0.7]),
                dist.Normal(torch.zeros(1), 1.0).to_event(1),
                TIMES,
            ),
        )
        pyro.sample("y", dist.Normal(x[..., OBS, 0], 0.1).to_event(1), obs=y)


def make_run(control):
    """The run's guide, optimizer, ELBO and SVI, built the same way in every process."""
    pyro.clear_param_store()
    guide = GirsanovGuide(
        model, control=control, hidden_dims=(8,), covariance="prior", latents="normal"
    )
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})
    # No max_plate_nesting: the ELBO guesses it on its first step (drawing random numbers),
    # so the checkpoint must carry it.
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True)
    return guide, optim, elbo, SVI(model, guide, optim, elbo)


def parameters():
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def resume(checkpoints, out):
    """Entry point of the fresh process: for each checkpoint, load it, train ``STEPS_AFTER``
    steps and collect the parameters; save them all to ``out``."""
    results = {}
    for checkpoint in checkpoints:
        control = torch.load(checkpoint, weights_only=False)["metadata"]["control"]
        guide, optim, elbo, svi = make_run(control)
        guide(DATA)
        metadata = load_checkpoint(checkpoint, optim=optim, guide=guide, elbo=elbo)
        assert metadata == {"control": control, "step": STEPS_BEFORE}
        for _ in range(STEPS_AFTER):
            svi.step(DATA)
        results[control] = parameters()
    torch.save(results, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """For each control: the parameters at the checkpoint, after ``STEPS_BEFORE + STEPS_AFTER``
    uninterrupted steps, and after resuming from the checkpoint in one fresh process."""
    tmp = tmp_path_factory.mktemp("resume")
    saved, expected, checkpoints = {}, {}, []
    for control in CONTROLS:
        pyro.set_rng_seed(0)
        guide, optim, elbo, svi = make_run(control)
        for _ in range(STEPS_BEFORE):
            svi.step(DATA)
        checkpoints.append(str(tmp / f"{control}.pt"))
        save_checkpoint(
            checkpoints[-1], optim=optim, guide=guide, elbo=elbo, control=control, step=STEPS_BEFORE
        )
        saved[control] = parameters()
        for _ in range(STEPS_AFTER):
            svi.step(DATA)
        expected[control] = parameters()
    out = tmp / "resumed.pt"
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_checkpoint; test_checkpoint.resume({checkpoints!r}, {str(out)!r})"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ))
    resumed = torch.load(out)
    return {control: (saved[control], expected[control], resumed[control]) for control in CONTROLS}


@pytest.mark.parametrize("control", CONTROLS)
def test_resuming_in_a_fresh_process_follows_the_uninterrupted_trajectory(runs, control):
    saved, expected, resumed = runs[control]
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert not torch.equal(expected[name], saved[name]), f"{name} did not train"
        assert torch.equal(resumed[name], expected[name]), name


def test_loading_into_a_guide_that_has_not_built_its_parameters_is_rejected(tmp_path):
    guide, optim, elbo, svi = make_run("affine")
    svi.step(DATA)
    save_checkpoint(tmp_path / "run.pt", optim=optim, guide=guide, elbo=elbo)
    guide, optim, elbo, _ = make_run("affine")
    with pytest.raises(ValueError, match=r"guide.*call guide\(\*args, \*\*kwargs\) once"):
        load_checkpoint(tmp_path / "run.pt", optim=optim, guide=guide, elbo=elbo)


def test_loading_into_an_optimizer_that_has_stepped_is_rejected(tmp_path):
    _, optim, _, svi = make_run("affine")
    svi.step(DATA)
    save_checkpoint(tmp_path / "run.pt", optim=optim)
    with pytest.raises(ValueError, match="optim must be a fresh optimizer"):
        load_checkpoint(tmp_path / "run.pt", optim=optim)


def test_loading_a_file_that_is_not_a_checkpoint_is_rejected(tmp_path):
    torch.save({"params": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by save_checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_loading_restores_parameters_without_optimizer_for_prediction(tmp_path):
    *_, svi = make_run("affine")
    for _ in range(STEPS_BEFORE):
        svi.step(DATA)
    save_checkpoint(tmp_path / "run.pt")
    trained = parameters()
    guide, *_ = make_run("affine")
    guide(DATA)
    load_checkpoint(tmp_path / "run.pt", guide=guide, restore_rng=False)
    median = guide.median(DATA)
    assert parameters().keys() == trained.keys()
    for name, value in parameters().items():
        assert torch.equal(value, trained[name]), name
    loc = trained["GirsanovGuide.latent_guide.locs.theta"]
    assert torch.allclose(median["theta"], loc.exp())
