"""Fixtures shared by the test suite, and the hand-written path densities the tests compare to.

The densities here are written from the mathematics alone, one step at a time with dense
matrices and :mod:`torch.distributions`; they never call :mod:`pyro_nsde`. For a step
``x_{k+1} = x_k + h f(t_k, x_k) + G ΔW`` with ``ΔW ~ N(h u, h S Sᵀ)`` (``u = 0``, ``S = I`` for
the prior) and residual ``r = x_{k+1} - x_k - h f``:

- ``m ≥ d`` (``G Gᵀ`` invertible): ``r ~ N_d(h G u, h G S Sᵀ Gᵀ)``, a density on ``R^d``;
- ``m < d`` (``G`` of full column rank): the density on ``x_k + h f + range(G)`` is
  ``N_m(ΔW; h u, h S Sᵀ) - ½ log det(Gᵀ G)``, with ``ΔW`` the least-squares solution of
  ``G ΔW = r`` (the reference measure documented in :mod:`pyro_nsde.sde.noise`).
"""

import pyro
import pytest
import torch
from torch.distributions import Distribution, MultivariateNormal


@pytest.fixture(autouse=True)
def seeded_and_clean_param_store():
    """Every test starts from seed 0 with an empty parameter store."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture
def default_dtype():
    """Call with a dtype to make it the default for the rest of the test (restored after)."""
    saved = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(saved)


def dense_diffusion(noise_type: str, g: torch.Tensor) -> torch.Tensor:
    """The diffusion as a ``(..., d, m)`` matrix: ``diag(g)`` for diagonal noise, else ``g``."""
    return torch.diag_embed(g) if noise_type == "diagonal" else g


def step_log_density(r, G, h, u=None, S=None):
    """Log density of the residual ``r`` ``(..., d)`` of one step.

    :param G: ``(..., d, m)``; :param h: step sizes, shape ``(...)``;
    :param u: noise-space shift ``(..., m)`` or ``None``; :param S: ``(..., m, m)`` or ``None``.
    """
    d, m = G.shape[-2:]
    h = h.unsqueeze(-1)
    shift = torch.zeros_like(r[..., :1]).expand(r.shape[:-1] + (m,)) if u is None else u
    noise_cov = torch.eye(m, dtype=r.dtype) if S is None else S @ S.transpose(-1, -2)
    noise_cov = h.unsqueeze(-1) * noise_cov
    if m >= d:
        loc = h * (G @ shift.unsqueeze(-1)).squeeze(-1)
        cov = G @ noise_cov @ G.transpose(-1, -2)
        return MultivariateNormal(loc, covariance_matrix=cov).log_prob(r)
    batch = torch.broadcast_shapes(G.shape[:-2], r.shape[:-1])
    dw = torch.linalg.lstsq(G.expand(batch + (d, m)), r.expand(batch + (d,)).unsqueeze(-1))
    dw = dw.solution.squeeze(-1)
    volume = 0.5 * torch.logdet(G.transpose(-1, -2) @ G)
    return MultivariateNormal(h * shift, covariance_matrix=noise_cov).log_prob(dw) - volume


def control_law(control, covariance, t, x):
    """``(u, S)`` of a control ``u(t, x, None)`` with ``S`` as a dense matrix (``None`` = I)."""
    if covariance == "prior":
        return control(t, x, None), None
    u, scale = control(t, x, None)
    return u, (torch.diag_embed(scale) if covariance == "diagonal" else scale)


def path_log_density(value, drift, diffusion, noise_type, init, times, control=None):
    """Log density of Euler–Maruyama paths ``value`` ``(..., K+1, d)``, written step by step.

    :param init: a distribution of ``x_0`` (scored on ``value[..., 0, :]``) or a known ``x_0``
        tensor (then ``value[..., 0, :]`` is ignored).
    :param times: ``(K+1,)`` or ``(..., K+1)``.
    :param control: ``None`` (the prior) or ``(callable, covariance)`` for the Girsanov law
        with ``ΔW_k ~ N(h u_k, h S_k S_kᵀ)``.
    """
    if isinstance(init, Distribution):
        x = value[..., 0, :]
        log_prob = init.log_prob(x)
    else:
        x = init
        log_prob = torch.zeros((), dtype=value.dtype)
    for k in range(value.shape[-2] - 1):
        t = times[..., k : k + 1]
        h = times[..., k + 1] - times[..., k]
        x_next = value[..., k + 1, :]
        g = diffusion(t, x) if callable(diffusion) else diffusion
        r = x_next - x - h.unsqueeze(-1) * drift(t, x)
        u, S = (None, None) if control is None else control_law(*control, t, x)
        log_prob = log_prob + step_log_density(r, dense_diffusion(noise_type, g), h, u, S)
        x = x_next
    return log_prob


@pytest.fixture
def hand_log_prob():
    """:func:`path_log_density`, the hand-written path density."""
    return path_log_density
