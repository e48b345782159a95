"""Tests of the terminal-point deep latent Gaussian model (pyro_nsde.zoo.dlgm) and its tutorial."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.distributions import MultivariateNormal

from pyro_nsde.zoo.dlgm import (
    DLGM,
    VAE,
    ImageEncoder,
    importance_bounds,
    importance_log_weights,
    train,
)

TUTORIAL = pathlib.Path(__file__).parents[1] / "tutorials" / "dlgm_digits.py"


class RecordingEncoder(ImageEncoder):
    """An :class:`ImageEncoder` that remembers the data points it encoded last."""

    def forward(self, images, subsample_size=None):
        self.seen = pyro.subsample(images, event_dim=1)
        return super().forward(images, subsample_size)


def random_images(num, obs_dim):
    return (torch.rand(num, obs_dim) > 0.5).float()


def test_guide_encodes_only_the_minibatch_and_keeps_the_fixed_initial_state():
    images = random_images(40, 10)
    init = torch.tensor([0.3, -0.2, 0.1])
    dlgm = DLGM(3, 10, 5, init=init)
    encoder = RecordingEncoder(10, 4)
    guide = dlgm.guide(encoder)
    guide_trace = pyro.poutine.trace(guide).get_trace(images, subsample_size=8)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(dlgm.model, trace=guide_trace)).get_trace(
        images, subsample_size=8
    )
    model_trace.compute_log_prob()

    index = guide_trace.nodes["data"]["value"]
    assert index.shape == (8,)
    assert torch.equal(encoder.seen, images[index])
    path = guide_trace.nodes["x"]["value"]
    assert path.shape == (8, 6, 3)
    assert torch.equal(path[..., 0, :], init.expand(8, 3))
    assert torch.equal(model_trace.nodes["y"]["value"], images[index])
    assert model_trace.nodes["y"]["log_prob"].shape == (8,)
    assert model_trace.nodes["x"]["log_prob"].shape == (8,)
    assert not list(guide.x0_locs.parameters())  # no posterior of a known x_0


def test_learned_initial_state_is_a_trained_parameter_not_a_latent():
    images = random_images(20, 6)
    dlgm = DLGM(2, 6, 3, learn_init=True)
    guide = dlgm.guide(ImageEncoder(6, 4))
    svi = SVI(dlgm.model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    svi.step(images, subsample_size=5)
    assert "dlgm$$$init" in pyro.get_param_store()
    assert dlgm.init.abs().sum() > 0  # moved from zero by the step
    paths = guide(images)["x"]
    assert torch.equal(paths[..., 0, :], dlgm.init.detach().expand(20, 2))


def test_vae_shapes_under_subsampling():
    images = random_images(30, 12)
    vae = VAE(4, 12)
    guide_trace = pyro.poutine.trace(vae.guide).get_trace(images, subsample_size=7)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(vae.model, trace=guide_trace)).get_trace(
        images, subsample_size=7
    )
    model_trace.compute_log_prob()
    index = guide_trace.nodes["data"]["value"]
    assert guide_trace.nodes["z"]["value"].shape == (7, 4)
    assert torch.equal(model_trace.nodes["y"]["value"], images[index])
    assert model_trace.nodes["y"]["log_prob"].shape == (7,)
    z, probs = vae.sample(9)
    assert z.shape == (9, 4) and probs.shape == (9, 12)
    assert ((probs > 0) & (probs < 1)).all()


def test_untrained_model_ends_at_a_standard_normal_whatever_the_depth():
    """The default drift starts at zero and the diffusion at one: ``x_K ~ N(x_0, T I)``."""
    for num_steps in (1, 4):
        dlgm = DLGM(3, 5, num_steps, end_time=2.0)
        paths, probs = dlgm.sample(4000)
        assert paths.shape == (4000, num_steps + 1, 3) and probs.shape == (4000, 5)
        end = paths[:, -1]
        assert end.mean(0).abs().max() < 4 * math.sqrt(2.0 / 4000)
        assert (end.var(0) - 2.0).abs().max() < 4 * 2.0 * math.sqrt(2 / 4000)


def linear_gaussian_dlgm(num_steps):
    """A linear DLGM with a Gaussian decoder, and its exact marginal of ``y`` (by hand).

    ``x_{k+1} = (1 + h a) ⊙ x_k + g ⊙ sqrt(h) ξ_k`` gives ``x_K ~ N(m, diag v)`` with
    ``m = (1 + h a)^K ⊙ x_0`` and ``v = g² h Σ_{j<K} (1 + h a)^{2j}``, so
    ``y ~ N(W m + b, W diag(v) Wᵀ + σ² I)``.
    """
    generator = torch.Generator().manual_seed(1)
    x0, a, g = torch.tensor([0.5, -0.3]), torch.tensor([-0.8, 0.4]), torch.tensor([0.7, 1.1])
    weight, bias = torch.randn(4, 2, generator=generator), torch.randn(4, generator=generator)
    sigma = 0.3
    dlgm = DLGM(
        2,
        4,
        num_steps,
        drift=lambda t, x: a * x,
        diffusion=g,
        decoder=lambda x: x @ weight.T + bias,
        likelihood=lambda loc: dist.Normal(loc, sigma).to_event(1),
        init=x0,
    )
    h = 1.0 / num_steps
    growth = 1 + h * a
    mean = growth**num_steps * x0
    var = g**2 * h * sum(growth ** (2 * j) for j in range(num_steps))
    cov = weight @ torch.diag(var) @ weight.T + sigma**2 * torch.eye(4)
    return dlgm, MultivariateNormal(weight @ mean + bias, covariance_matrix=cov)


def test_importance_weighted_estimate_is_at_least_the_elbo_and_at_most_log_p():
    dlgm, marginal = linear_gaussian_dlgm(num_steps=4)
    y = marginal.sample((30,))
    log_p = marginal.log_prob(y).sum().item()
    guide = dlgm.guide(ImageEncoder(4, 8), covariance="diagonal")
    train(dlgm.model, guide, y, num_steps=150, batch_size=30, lr=0.02)

    # The ELBO as Pyro computes it, from its own draws.
    num_particles = 1000
    elbo_loss = Trace_ELBO(
        num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
    )
    with torch.no_grad():
        elbo = -elbo_loss.loss(dlgm.model, guide, y)
    # Independent draws for the importance-weighted estimate.
    log_w = importance_log_weights(dlgm.model, guide, y, num_samples=2000)
    assert log_w.shape == (2000, 30)
    iwae = (log_w.logsumexp(0) - math.log(2000)).sum().item()
    elbo_is = log_w.mean(0).sum().item()
    # Monte Carlo standard error of an ELBO estimate from n draws per point.
    spread = log_w.var(0).sum().sqrt().item()
    tol = 4 * spread * math.sqrt(1 / num_particles + 1 / 2000)

    assert abs(elbo - elbo_is) < tol  # the weights are the ELBO's log ratios
    assert elbo < log_p + tol
    assert iwae > elbo - tol
    assert iwae < log_p + tol
    assert log_p - iwae < 0.5 * (log_p - elbo)  # the IWAE bound is the tighter one

    bounds = importance_bounds(dlgm.model, guide, y, num_samples=200, chunk_size=64)
    assert bounds.elbo.shape == bounds.log_likelihood.shape == bounds.ess.shape == (30,)
    assert (bounds.log_likelihood >= bounds.elbo).all()  # Jensen, draw by draw
    assert ((bounds.ess >= 1) & (bounds.ess <= 200)).all()


def test_importance_weights_reject_latents_shared_by_data_points():
    images = random_images(6, 3)

    def model(images):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", 6):
            pyro.sample("y", dist.Normal(torch.zeros(3), scale[..., None]).to_event(1), obs=images)

    def guide(images):
        pyro.sample("scale", dist.LogNormal(0.0, 1.0))

    with pytest.raises(ValueError, match="'scale' is outside the 'data' plate"):
        importance_log_weights(model, guide, images, num_samples=4)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        DLGM(2, 4, 0)
    with pytest.raises(ValueError, match=r"init must have shape \(2,\)"):
        DLGM(2, 4, 3, init=torch.zeros(3))
    dlgm = DLGM(2, 4, 3)
    with pytest.raises(ValueError, match=r"images must be a tensor of shape \(N, 4\)"):
        pyro.poutine.trace(dlgm.model).get_trace(torch.zeros(5, 3))
    with pytest.raises(TypeError, match="context_dim"):
        dlgm.guide(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="batch_size must be an integer in"):
        train(
            dlgm.model, dlgm.guide(ImageEncoder(4, 2)), torch.zeros(5, 4), num_steps=1, batch_size=6
        )


def test_tutorial_fast_mode_writes_its_outputs_and_improves_the_elbo(tmp_path):
    env = {**os.environ, "PYRO_NSDE_FAST": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(TUTORIAL), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("table.md", "results.json", "curve.png", "samples.png", "paths.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "results.json").read_text())
    rows = summary["results"]
    kinds = {(r["kind"], r["num_layers"]) for r in rows}
    assert ("vae", None) in kinds
    for k in summary["settings"]["num_layers"]:
        assert {("mean shift", k), ("diagonal S", k)} <= kinds
    for row in rows:
        assert row["elbo"] > row["initial_elbo"] + 5.0, row["kind"]
        losses = row["losses"]
        assert sum(losses[-10:]) < sum(losses[:10])
        assert row["log_likelihood"] >= row["elbo"]
    table = (tmp_path / "table.md").read_text()
    assert "| DLGM, K = 1 |" in table and "VAE" in table
