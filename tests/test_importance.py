"""Importance resampling of a guide: widened proposals, Pareto smoothing, resampling."""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_nsde.importance import (
    WidenMessenger,
    importance_resample,
    psis_weights,
    systematic_resample,
)

DATA = torch.tensor([0.1, -0.3, 0.25, 0.05])


def _model():
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.5))
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 4):
        pyro.sample("y", dist.Normal(loc, scale), obs=DATA)


def _exact_posterior_mean_of_scale():
    """Quadrature on a fine grid: the skewed posterior of ``scale`` given four points."""
    scales = torch.linspace(1e-3, 8.0, 3000, dtype=torch.float64)
    locs = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)
    s, m = torch.meshgrid(scales, locs, indexing="ij")
    log_joint = (
        dist.LogNormal(0.0, 1.5).log_prob(s)
        + dist.Normal(0.0, 1.0).log_prob(m)
        + dist.Normal(m[..., None], s[..., None]).log_prob(DATA.double()).sum(-1)
    )
    weights = (log_joint - log_joint.max()).exp()
    return float((weights * s).sum() / weights.sum())


def test_resampling_corrects_a_poor_guide():
    """A guide far too narrow (untrained, scale 0.05 around the prior median) is corrected by
    resampling towards the posterior mean of ``scale``, and ``k̂`` says the weights are poor."""
    guide = AutoMultivariateNormal(_model, init_scale=0.05)
    guide()
    draws = importance_resample(
        _model, guide, num_samples=4000, num_proposals=40_000, max_plate_nesting=1
    )
    scale = draws.model_trace.nodes["scale"]["value"].reshape(-1)[draws.indices]
    exact = _exact_posterior_mean_of_scale()
    assert abs(float(scale.mean()) - exact) < 0.1 * exact
    assert draws.pareto_k > 0.7 and not draws.reliable


def test_a_mean_field_proposal_too_poor_to_correct_is_flagged():
    """Independent Student-t laws around the same narrow guide miss the posterior's correlated
    corner: the resampled mean stays off, and ``k̂`` is what tells the user."""
    guide = AutoNormal(_model, init_scale=0.05)
    guide()
    draws = importance_resample(
        _model, guide, num_samples=2000, num_proposals=20_000, max_plate_nesting=1
    )
    scale = draws.model_trace.nodes["scale"]["value"].reshape(-1)[draws.indices]
    exact = _exact_posterior_mean_of_scale()
    assert abs(float(scale.mean()) - exact) > 0.2 * exact
    assert draws.pareto_k > 1.0 and draws.ess < 100


def test_widened_proposal_keeps_location_and_inflates_scale():
    guide = AutoMultivariateNormal(_model, init_scale=0.3)
    guide()
    trace = pyro.poutine.trace(WidenMessenger(df=5.0, inflate=2.0)(guide)).get_trace()
    latent = next(site for name, site in trace.nodes.items() if name.endswith("_latent"))
    wide = latent["fn"]
    assert isinstance(wide, dist.MultivariateStudentT)
    assert torch.allclose(wide.loc, guide.loc)
    expected = 2.0 * guide.get_posterior().scale_tril
    assert torch.allclose(wide.scale_tril, expected)


def test_psis_weights_of_equal_log_weights_are_uniform():
    weights, khat = psis_weights(torch.zeros(400))
    assert torch.allclose(weights, torch.full((400,), 1 / 400, dtype=weights.dtype))
    assert math.isnan(khat)  # no tail to fit: all weights equal


def test_psis_estimates_a_heavy_tail():
    """Weights with a Pareto tail of shape 0.8 (infinite variance) give ``k̂`` near 0.8."""
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(20_000, generator=generator, dtype=torch.float64)
    log_weights = -0.8 * torch.log(uniform)  # P(w > t) = t^(-1/0.8)
    _, khat = psis_weights(log_weights)
    assert abs(khat - 0.8) < 0.1


def test_systematic_resampling_follows_the_weights():
    weights = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    indices = systematic_resample(weights, 8000, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(indices, minlength=4).double() / 8000
    assert torch.allclose(counts, weights, atol=1e-3)
