"""The Kalman smoother's Gauss–Markov posterior against the dense Gaussian reference.

``tests/reference.py`` conditions the whole path, written as a linear map of its Gaussian noise,
on the observations with dense linear algebra; it knows nothing of filters. The smoother of
:mod:`pyro_nsde.posterior.kalman` must reproduce its conditional law of each Wiener increment given
the
state (the control and increment covariance of the best Girsanov guide), the posterior of
``x_0`` and the marginals, for full-rank and rank-deficient noise, a known ``x_0`` and
non-uniform grids.
"""

import pytest
import torch
from reference import LinearGaussianPath, init_posterior, step_noise_regressions

from pyro_nsde.posterior.kalman import GaussianSites, LinearChain, smooth

F64 = torch.float64


def _grid(num_steps, seed):
    generator = torch.Generator().manual_seed(seed)
    steps = 0.02 + 0.1 * torch.rand(num_steps, generator=generator, dtype=F64)
    return torch.cat([torch.zeros(1, dtype=F64), steps.cumsum(0)])


CASES = {
    # 3-D OU with general, correlated noise on a non-uniform grid
    "general": (
        [[-1.0, 0.3, 0.0], [0.2, -0.5, 0.1], [0.0, -0.2, -0.8]],
        [[0.7, 0.1, 0.0], [0.0, 0.4, 0.2], [0.1, 0.0, 0.3]],
        [[1.0, 0.0, 0.0], [0.0, 0.3, 1.0]],
        True,
    ),
    # oscillator with noise on the velocity only (rank-deficient G)
    "rank_deficient": ([[0.0, 1.0], [-4.0, -0.2]], [[0.0], [0.8]], [[1.0, 0.0]], True),
    # the same from a known x_0 (Σ_0 = 0)
    "known_x0": ([[0.0, 1.0], [-4.0, -0.2]], [[0.0], [0.8]], [[1.0, 0.0]], False),
}


def _problem(name, num_steps=37, obs_every=4, noise=0.1, seed=0):
    A, G, H, random_x0 = (
        torch.tensor(v, dtype=F64) if i < 3 else v for i, v in enumerate(CASES[name])
    )
    d, m = G.shape
    times = _grid(num_steps, seed)
    P0 = torch.eye(d, dtype=F64) if random_x0 else torch.zeros(d, d, dtype=F64)
    m0 = torch.linspace(-0.5, 0.5, d, dtype=F64)
    b = torch.linspace(0.2, -0.1, d, dtype=F64)
    path = LinearGaussianPath(A, b, G, m0, P0, times)
    obs = list(range(obs_every, num_steps + 1, obs_every))
    generator = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(len(obs), H.shape[0], generator=generator, dtype=F64)
    R = noise**2 * torch.eye(H.shape[0], dtype=F64)
    posterior = path.observe(H, obs, R, y)
    h = times[1:] - times[:-1]
    chain = LinearChain(
        torch.eye(d, dtype=F64) + h[:, None, None] * A,
        h[:, None] * b,
        G.expand(num_steps, d, m),
        h,
        m0,
        P0,
    )
    J = torch.zeros(num_steps + 1, d, d, dtype=F64)
    j = torch.zeros(num_steps + 1, d, dtype=F64)
    for n, k in enumerate(obs):
        J[k] += H.T @ torch.linalg.solve(R, H)
        j[k] += H.T @ torch.linalg.solve(R, y[n])
    return posterior, chain, GaussianSites(J, j), h, random_x0


@pytest.mark.parametrize("name", list(CASES))
def test_smoother_matches_dense_posterior(name):
    reference, chain, sites, h, _ = _problem(name)
    posterior = smooth(chain, sites)
    loc, gain, cov = step_noise_regressions(reference)
    # The reference gives the law of ξ_k = ΔW_k / sqrt(h_k): N(α + β x, P).
    # Where Cov(x_k) is singular (a known x_0, noise on some coordinates only) the gain is
    # unique only on the support of x_k: compare the control at the mean of x_k and the gain
    # applied to the covariance of x_k.
    root_h = h.sqrt()[:, None]
    ref_mean, _ = reference.marginals()
    T, d = reference.path.T, reference.path.d
    cov_x = torch.stack(
        [T[k * d : (k + 1) * d] @ reference.cov_w @ T[k * d : (k + 1) * d].T for k in range(len(h))]
    )
    ours = root_h * (
        posterior.control_loc + (posterior.control_gain @ ref_mean[:-1, :, None])[..., 0]
    )
    theirs = loc + (gain @ ref_mean[:-1, :, None])[..., 0]
    assert torch.allclose(posterior.step_cov, cov, atol=1e-10)
    assert torch.allclose(ours, theirs, atol=1e-8)
    assert torch.allclose(
        root_h[..., None] * posterior.control_gain @ cov_x, gain @ cov_x, atol=1e-8
    )
    init_loc, init_cov = init_posterior(reference)
    assert torch.allclose(posterior.init_loc, init_loc, atol=1e-10)
    assert torch.allclose(posterior.init_cov, init_cov, atol=1e-10)
    mean, cov = posterior.marginals()
    ref_mean, ref_sd = reference.marginals()
    assert torch.allclose(mean, ref_mean, atol=1e-9)
    assert torch.allclose(cov.diagonal(dim1=-2, dim2=-1).sqrt(), ref_sd, atol=1e-8)
    assert torch.allclose(posterior.mean_path(), ref_mean, atol=1e-9)


def test_smoother_broadcasts_over_series():
    """Independent series in a batch dim give each series' own posterior."""
    results = [_problem("general", seed=seed) for seed in (0, 0)]
    _, chain, sites, _, _ = results[0]
    batched_sites = GaussianSites(
        torch.stack([sites.precision, 2 * sites.precision], dim=1),
        torch.stack([sites.information, -sites.information], dim=1),
    )
    batched = smooth(chain, batched_sites)
    for index, (scale, sign) in enumerate(((1, 1), (2, -1))):
        single = smooth(chain, GaussianSites(scale * sites.precision, sign * sites.information))
        assert torch.allclose(batched.control_loc[:, index], single.control_loc, atol=1e-10)
        assert torch.allclose(batched.step_cov[:, index], single.step_cov, atol=1e-12)
        assert torch.allclose(batched.init_loc[index], single.init_loc, atol=1e-10)
