"""Long-horizon float32 stability: K = 10,000 Euler–Maruyama steps of an Ornstein–Uhlenbeck
process in single precision.

The Euler–Maruyama chain of ``dX = -θ X dt + σ dW`` on a uniform grid is the AR(1) recursion
``x_{k+1} = (1 - θh) x_k + σ sqrt(h) ξ_k``, whose exact stationary variance is

    ``v = σ² h / (1 - (1 - θh)²)``

(``0.5025 σ²/θ`` at ``θh = 0.01``, against ``σ²/(2θ)`` for the SDE itself). Started from
``N(0, v)`` the chain stays stationary, so every state has variance ``v``. The float32 grid
``linspace(0, 100, 10001)`` has step sizes that differ from ``h`` by up to ``1e-3`` relative
(rounding of times near 100), which is the kind of error that accumulates over a long horizon.
"""

import math

import pyro.distributions as dist
import torch

from pyro_nsde import EulerMaruyama

THETA, SIGMA, NUM_STEPS, HORIZON = 1.0, 1.0, 10_000, 100.0
STEP = HORIZON / NUM_STEPS
STATIONARY_VARIANCE = SIGMA**2 * STEP / (1 - (1 - THETA * STEP) ** 2)


def ou_law(dtype):
    """The chain on the float32 grid, computed in ``dtype``."""
    times = torch.linspace(0.0, HORIZON, NUM_STEPS + 1, dtype=torch.float32).to(dtype)
    init = dist.Normal(torch.zeros(1, dtype=dtype), math.sqrt(STATIONARY_VARIANCE)).to_event(1)
    return EulerMaruyama(lambda t, x: -THETA * x, torch.full((1,), SIGMA, dtype=dtype), init, times)


def test_float32_ou_path_keeps_the_stationary_variance_over_10000_steps():
    torch.manual_seed(0)
    num_paths = 1000
    with torch.no_grad():
        paths = ou_law(torch.float32).rsample((num_paths,))[..., 0]  # (paths, K+1)
    assert paths.dtype == torch.float32
    assert torch.isfinite(paths).all()
    # Each path's mean square over the second half estimates v; paths are independent, so their
    # spread gives the standard error of the overall estimate (about 0.6% of v here).
    per_path = paths[:, NUM_STEPS // 2 :].double().pow(2).mean(-1)
    estimate = per_path.mean().item()
    standard_error = per_path.std().item() / math.sqrt(num_paths)
    assert abs(estimate - STATIONARY_VARIANCE) < 4 * standard_error
    assert abs(estimate / STATIONARY_VARIANCE - 1) < 0.03  # the stated tolerance: 3%
    # The chain keeps its correlation structure: lag-1 autocorrelation 1 - θh.
    second_half = paths[:, NUM_STEPS // 2 :].double()
    lag1 = (second_half[:, 1:] * second_half[:, :-1]).mean() / second_half.pow(2).mean()
    assert abs(lag1.item() - (1 - THETA * STEP)) < 5e-4


def test_float32_log_prob_of_a_10000_step_path_matches_float64():
    torch.manual_seed(1)
    with torch.no_grad():
        paths = ou_law(torch.float64).rsample((8,))
        single = ou_law(torch.float32).log_prob(paths.float())
        double = ou_law(torch.float64).log_prob(paths.clone())
    assert single.dtype == torch.float32
    # ~1e4 terms of size ~1: float32 summation keeps the total to ~1e-6 relative.
    torch.testing.assert_close(single.double(), double, rtol=1e-5, atol=0.0)
