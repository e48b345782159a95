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

from pyro_nsde.posterior.kalman import GaussianSites, GaussMarkovPosterior, LinearChain, smooth
from pyro_nsde.posterior.small import cholesky_or_nan

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


def _batched_problem(name, noise, seed=0):
    """The chain of ``_problem(name)`` with a batch of 3 drift matrices ``θ_b A`` and
    diffusions ``G / θ_b`` (parameters ``θ`` with a gradient), and sites of ``noise``."""
    _, chain, sites, h, _ = _problem(name, noise=noise, seed=seed)
    theta = torch.tensor([0.5, 1.0, 2.0], dtype=F64, requires_grad=True)
    eye = torch.eye(chain.transition.shape[-1], dtype=F64)
    drift = (chain.transition - eye) / h[:, None, None]
    scale = theta[:, None, None]
    batched = LinearChain(
        eye + h[:, None, None, None] * scale * drift.unsqueeze(1),
        chain.offset.unsqueeze(1) * theta[:, None],
        chain.diffusion.unsqueeze(1) / scale,
        h[:, None].expand(-1, 3),
        chain.init_loc,
        chain.init_cov,
    )
    return batched, sites, theta


def _outputs(posterior):
    return (
        posterior.control_loc,
        posterior.control_gain,
        posterior.step_cov,
        posterior.init_loc,
        posterior.init_cov,
    )


@pytest.mark.parametrize("noise", [0.1, 1e-3])
@pytest.mark.parametrize("name", list(CASES))
def test_scan_smoother_equals_the_sequential_one(name, noise):
    """Values and gradients of the parallel smoother equal the sequential information filter's
    to float64 precision: non-uniform grids, rank-deficient noise, a known ``x_0``, a batch of
    parameters, observations precise to 1e-3."""
    chain, sites, theta = _batched_problem(name, noise)
    ours, reference = _outputs(smooth(chain, sites)), _outputs(sequential_smooth(chain, sites))
    weights = [
        torch.randn(t.shape, dtype=F64, generator=torch.Generator().manual_seed(i))
        for i, t in enumerate(ours)
    ]
    for mine, theirs in zip(ours, reference, strict=True):
        scale = 1 + float(theirs.detach().abs().max())
        assert torch.allclose(mine, theirs, rtol=1e-9, atol=1e-9 * scale)
    grads = [
        torch.autograd.grad(
            sum((w * t).sum() for w, t in zip(weights, out, strict=True)), theta, retain_graph=True
        )[0]
        for out in (ours, reference)
    ]
    assert torch.allclose(
        grads[0], grads[1], rtol=1e-8, atol=1e-8 * float(1 + grads[1].abs().max())
    )


def test_scan_smoother_has_no_loop_over_steps():
    """The smoother's cost in batched calls grows like log K, not K: twice the steps add a
    few scan rounds of calls."""
    counts = {}
    for num_steps in (64, 128):
        _, chain, sites, _, _ = _problem("general", num_steps=num_steps)
        with torch.autograd.profiler.profile() as prof:
            smooth(chain, sites)
        counts[num_steps] = sum(
            1 for event in prof.function_events if event.name == "aten::linalg_solve"
        )
    assert counts[128] - counts[64] <= 8, counts


def symmetric(matrix):
    return 0.5 * (matrix + matrix.transpose(-1, -2))


def _matvec(matrix, vector):
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def sequential_smooth(chain, sites):
    """The Gauss–Markov posterior of a ``LinearChain`` given ``GaussianSites``, by a sequential
    backward information filter: the smoother pyro-nsde used before its parallel scan (issue
    22), kept here as the reference the scan must reproduce. A sequential backward pass over
    the ``K`` steps in square-root form: with
    ``R_k = chol(I + h_k G_kᵀ Λ_{k+1} G_k)`` and ``V_k = R_k⁻¹ sqrt(h_k) G_kᵀ Λ_{k+1}``, the
    correction ``h Λ G P Gᵀ Λ`` is ``V_kᵀ V_k`` (symmetric by construction). The loop keeps
    ``R_k``, ``V_k`` and ``R_k⁻¹ sqrt(h_k) G_kᵀ (λ_{k+1} - Λ_{k+1} c_k)``; the controls and
    ``P_k = R_k⁻ᵀ R_k⁻¹`` are computed from them for all steps at once afterwards.
    """
    batch = torch.broadcast_shapes(sites.precision.shape[1:-2], sites.information.shape[1:-1])
    chain = chain.broadcast(batch)
    batch = chain.init_loc.shape[:-1]
    d, m = chain.diffusion.shape[-2:]
    num_steps = chain.transition.shape[0]

    def stepped(tensor, event):  # (K+1, *some batch, *event) -> (K+1, *batch, *event)
        missing = len(batch) - (tensor.dim() - 1 - event)
        tensor = tensor.reshape(tensor.shape[:1] + (1,) * missing + tensor.shape[1:])
        return tensor.expand((num_steps + 1, *batch) + tensor.shape[tensor.dim() - event :])

    J = stepped(sites.precision, 2)
    j = stepped(sites.information, 1)
    eye_m = torch.eye(m, dtype=J.dtype, device=J.device)
    root_h = chain.h.sqrt()[..., None, None]
    scaled_t = root_h * chain.diffusion.mT  # sqrt(h) Gᵀ, (K, *batch, m, d)
    steps = zip(
        chain.transition.unbind(0),
        chain.offset.unbind(0),
        scaled_t.unbind(0),
        J[:-1].unbind(0),
        j[:-1].unbind(0),
        strict=True,
    )
    Lam, lam = symmetric(J[-1]), j[-1]
    factors, projections, whitened = [], [], []
    for F, c, Gt, J_k, j_k in reversed(list(steps)):
        GtL = Gt @ Lam  # sqrt(h) Gᵀ Λ  (m, d)
        # Positive definite in exact arithmetic; where rounding (or a non-finite model at an
        # extreme parameter draw) breaks that, the draw's coefficients become NaN instead of
        # stopping the whole batch: importance weighting then gives it weight zero.
        R = cholesky_or_nan(eye_m + GtL @ Gt.mT)
        V = torch.linalg.solve_triangular(R, GtL, upper=False)
        residual = lam - _matvec(Lam, c)  # λ - Λ c
        w = torch.linalg.solve_triangular(R, _matvec(Gt, residual).unsqueeze(-1), upper=False)
        w = w.squeeze(-1)
        factors.append(R)
        projections.append(V @ F)
        whitened.append(w)
        Lam = J_k + F.mT @ (Lam - V.mT @ V) @ F
        lam = j_k + _matvec(F.mT, residual - _matvec(V.mT, w))
    R = torch.stack(factors[::-1])
    Rt = R.mT
    inv_root_h = 1.0 / root_h
    control_loc = (
        torch.linalg.solve_triangular(
            Rt, torch.stack(whitened[::-1]).unsqueeze(-1), upper=True
        ).squeeze(-1)
        * inv_root_h[..., 0]
    )
    control_gain = (
        -torch.linalg.solve_triangular(Rt, torch.stack(projections[::-1]), upper=True) * inv_root_h
    )
    step_cov = symmetric(torch.cholesky_inverse(R))
    Lam = symmetric(Lam)
    eye_d = torch.eye(d, dtype=J.dtype, device=J.device)
    S0 = chain.init_cov
    system = eye_d + S0 @ Lam
    init_cov = symmetric(torch.linalg.solve(system, S0))
    init_loc = torch.linalg.solve(system, (chain.init_loc + _matvec(S0, lam)).unsqueeze(-1))
    return GaussMarkovPosterior(
        chain, init_loc.squeeze(-1), init_cov, control_loc, control_gain, step_cov
    )
