"""Importance resampling of a guide: widened proposals, Pareto smoothing, resampling."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_nsde.analysis.importance import (
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


@pytest.mark.parametrize("rounds", [1, 3])
def test_resampling_corrects_a_poor_guide(rounds):
    """A guide far too narrow (untrained, scale 0.05 around the prior median) is corrected by
    resampling towards the posterior mean of ``scale``. Its widened proposals alone give poor
    weights, which ``k̂`` says; adapting the proposal to the weighted moments gives reliable
    ones."""
    guide = AutoMultivariateNormal(_model, init_scale=0.05)
    guide()
    draws = importance_resample(
        _model, guide, num_samples=4000, num_proposals=40_000, max_plate_nesting=1, rounds=rounds
    )
    scale = draws.model_trace.nodes["scale"]["value"].reshape(-1)[draws.indices]
    exact = _exact_posterior_mean_of_scale()
    assert abs(float(scale.mean()) - exact) < (0.05 if rounds > 1 else 0.1) * exact
    assert draws.log_weights.shape == draws.weights.shape == (max(rounds - 1, 1) * 40_000,)
    if rounds > 1:
        assert draws.pareto_k < 0.5 and draws.reliable and draws.ess > 5000
    else:
        assert draws.pareto_k > 0.7 and not draws.reliable


def test_mixture_weights_of_adapted_rounds_are_unbiased():
    """The proposals of all rounds, weighted against the mixture of the rounds' laws, estimate
    the normalizing constant (here 1: no data) and the moments of the target, from a first
    round centred 3 target sds away."""

    def target():
        pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))

    guide = AutoMultivariateNormal(target, init_loc_fn=lambda site: torch.full((2,), 3.0))
    guide()
    pyro.set_rng_seed(0)
    draws = importance_resample(
        target, guide, num_samples=1000, num_proposals=20_000, max_plate_nesting=0, rounds=3
    )
    z = draws.model_trace.nodes["z"]["value"].reshape(-1, 2).double()
    assert z.shape == (40_000, 2)
    assert abs(float(draws.log_weights.exp().mean()) - 1.0) < 0.05
    mean = draws.weights @ z
    second = draws.weights @ (z * z)
    assert torch.allclose(mean, torch.zeros(2, dtype=mean.dtype), atol=0.05)
    assert torch.allclose(second, torch.ones(2, dtype=mean.dtype), atol=0.08)
    assert draws.reliable
    resampled = z[draws.indices]
    assert torch.allclose(resampled.mean(0), torch.zeros(2, dtype=z.dtype), atol=0.15)


def test_rounds_must_be_a_positive_int():
    guide = AutoMultivariateNormal(_model)
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        importance_resample(_model, guide, num_samples=10, max_plate_nesting=1, rounds=0)


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


def test_to_inference_data_resamples_only_when_k_hat_allows(recwarn):
    from pyro_nsde import to_inference_data
    from pyro_nsde.analysis.arviz_adapter import group

    poor = AutoMultivariateNormal(_model, init_scale=0.05)
    poor()
    with pytest.warns(RuntimeWarning, match="importance resampling not applied"):
        idata = to_inference_data(
            _model,
            guide=poor,
            num_samples=500,
            importance_resampling={"num_proposals": 4000, "rounds": 1},
        )
    attrs = group(idata, "sample_stats").attrs
    assert attrs["importance_pareto_k"] > 0.7 and attrs["importance_resampled"] == 0
    assert attrs["importance_proposals"] == 4000
    assert "log_weight" in group(idata, "sample_stats")


def test_to_inference_data_resamples_the_draws_of_a_good_guide():
    from test_diagnostics import optimal_affine_guide

    from pyro_nsde import GirsanovGuide, to_inference_data
    from pyro_nsde.analysis.arviz_adapter import group

    model, _, y, _ = optimal_affine_guide("full", 10, noise=0.1)
    pyro.clear_param_store()
    guide = GirsanovGuide(model, control="affine", covariance="full")  # exact from the start
    idata = to_inference_data(
        model, guide=guide, model_args=(y,), num_samples=300, importance_resampling=True
    )
    stats = group(idata, "sample_stats")
    assert stats.attrs["importance_resampled"] == 1
    assert stats.attrs["importance_ess"] > 0.99 * 2 * 300  # 2 proposals per draw by default
    assert stats.attrs["importance_proposals"] == 2 * 300  # no multivariate site: one round
    assert "log_weight" not in stats and stats["lp"].shape == (1, 300)
    assert group(idata, "posterior")["x"].shape[:2] == (1, 300)


def test_equal_weights_of_an_exact_guide_count_as_reliable():
    from pyro_nsde.analysis.importance import ImportanceDraws

    weights, khat = psis_weights(torch.zeros(1000))
    draws = ImportanceDraws(None, torch.zeros(1000), weights, torch.arange(10), khat, 1000.0)
    assert math.isnan(draws.pareto_k) and draws.reliable
