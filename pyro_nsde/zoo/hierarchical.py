r"""A population of Ornstein–Uhlenbeck series, each with its own rate, and the exact posterior of
the population.

Series ``i = 1, ..., N`` follow ``dx = -θ_i x dt + σ dW`` on the Euler–Maruyama grid
``t_k = k h`` (``x_{k+1} = (1 - h θ_i) x_k + σ sqrt(h) ξ_k``, ``x_0 ~ N(0, 1)``), observed every
``every`` steps with noise ``τ``; the rates come from a population,

    ``log θ_i ~ N(m, s²)``,   ``m ~ N(m_0, v_m)``,   ``log s ~ N(l_0, v_s)``.

Given ``θ_i`` a series is a linear Gaussian state-space model, so its likelihood
``p(y_i | θ_i)`` is a Kalman filter's; between two observations ``n`` steps apart the chain
moves by ``x ↦ a^n x`` with added variance ``σ² h (1 - a^{2n}) / (1 - a²)`` (``a = 1 - h θ``),
so the filter steps from observation to observation. The population's posterior is then a
two-dimensional integral over ``(m, log s)`` of one-dimensional integrals over each ``log θ_i``,
computed by quadrature (:meth:`HierarchicalOU.population_posterior`): the exact answer the
hierarchical guide is checked against, at numbers of series where sampling every path is out of
reach (``benchmarks/accuracy/hierarchical.py``, ``tutorials/hierarchical_ou.py``).
"""

import dataclasses
import math

import pyro
import pyro.distributions as dist
import torch

from ..sde.euler_maruyama import EulerMaruyama


@dataclasses.dataclass(frozen=True)
class HierarchicalOU:
    """The model of the module docstring.

    :param int num_series: ``N``.
    :param int num_steps: Euler–Maruyama steps ``K`` per series.
    :param float h: the step.
    :param int every: steps between observations (the first at step ``every``).
    :param float sigma: ``σ``. :param float tau: ``τ``.
    :param tuple m_prior: ``(m_0, sd)`` of ``m``. :param tuple log_s_prior: ``(l_0, sd)`` of
        ``log s``.
    :param int subsample_size: series per step in the model's plate (``None``: all).
    :param torch.dtype dtype: of the times, the simulated data and the model's tensors.
    """

    num_series: int
    num_steps: int
    h: float
    every: int
    sigma: float = 0.5
    tau: float = 0.2
    m_prior: tuple = (0.0, 1.0)
    log_s_prior: tuple = (math.log(0.5), 0.5)
    subsample_size: int | None = None
    dtype: torch.dtype = torch.float32

    @property
    def times(self) -> torch.Tensor:
        return torch.arange(self.num_steps + 1, dtype=self.dtype) * self.h

    @property
    def obs_steps(self) -> torch.Tensor:
        return torch.arange(self.every, self.num_steps + 1, self.every)

    def simulate(self, m: float = 0.0, s: float = 0.5, seed: int = 0):
        """``(y, θ)``: observations ``(N, n_obs)`` and the rates drawn with ``(m, s)``."""
        generator = torch.Generator().manual_seed(seed)
        options = {"generator": generator, "dtype": self.dtype}
        theta = (m + s * torch.randn(self.num_series, **options)).exp()
        x = torch.randn(self.num_series, **options)
        rows = [x]
        for _ in range(self.num_steps):
            noise = torch.randn(self.num_series, **options)
            x = x - self.h * theta * x + self.sigma * math.sqrt(self.h) * noise
            rows.append(x)
        path = torch.stack(rows, -1)[:, self.obs_steps]
        return path + self.tau * torch.randn(path.shape, **options), theta

    def model(self, y):
        """The Pyro model (sites ``"m"``, ``"s"``, and in ``pyro.plate("series")`` the rates
        ``"theta"``, the paths ``"x"`` and the observations ``"y"``)."""
        m = pyro.sample(
            "m", dist.Normal(torch.tensor(self.m_prior[0], dtype=self.dtype), self.m_prior[1])
        )
        s = pyro.sample(
            "s",
            dist.LogNormal(
                torch.tensor(self.log_s_prior[0], dtype=self.dtype), self.log_s_prior[1]
            ),
        )
        init = dist.Normal(torch.zeros(1, dtype=self.dtype), 1.0).to_event(1)
        diffusion = torch.tensor([self.sigma], dtype=self.dtype)
        obs = self.obs_steps
        with pyro.plate("series", self.num_series, subsample_size=self.subsample_size) as index:
            theta = pyro.sample("theta", dist.LogNormal(m, s))

            def drift(t, x):
                return -theta[..., None] * x

            x = pyro.sample("x", EulerMaruyama(drift, diffusion, init, self.times))
            pyro.sample("y", dist.Normal(x[..., obs, 0], self.tau).to_event(1), obs=y[index])

    def series_log_likelihoods(self, y, log_theta) -> torch.Tensor:
        """``log p(y_i | θ)`` ``(N, G)`` (float64) of every series at each ``θ = exp(log_theta)``
        ``(G,)``, by a Kalman filter from observation to observation."""
        y = torch.as_tensor(y, dtype=torch.float64)
        a = 1.0 - self.h * torch.as_tensor(log_theta, dtype=torch.float64).exp()
        mean = torch.zeros(y.shape[0], a.shape[0], dtype=torch.float64)
        var = torch.ones_like(mean)
        total = torch.zeros_like(mean)
        previous = 0
        for j, step in enumerate(self.obs_steps.tolist()):
            n = step - previous
            power = a**n
            ratio = (1 - power.square()) / (1 - a.square())
            added = self.sigma**2 * self.h * torch.where(a.abs() == 1, float(n), ratio)
            mean, var = power * mean, power.square() * var + added
            spread = var + self.tau**2
            residual = y[:, j, None] - mean
            total = total - 0.5 * (torch.log(2 * math.pi * spread) + residual.square() / spread)
            gain = var / spread
            mean, var = mean + gain * residual, (1 - gain) * var
            previous = step
        return total

    def population_posterior(self, y, num_points: int = 41) -> dict:
        """The posterior means and sds of ``m`` and ``s``: ``{"m": (mean, sd), "s": (mean,
        sd)}``, by quadrature over ``log θ_i`` (a fixed grid) and over ``(m, log s)`` (a grid
        over the prior's range, then twice one zoomed to the posterior's)."""
        log_theta = torch.linspace(-5.0, 3.0, 201, dtype=torch.float64)
        log_lik = self.series_log_likelihoods(y, log_theta)
        ranges = [
            (self.m_prior[0] - 5 * self.m_prior[1], self.m_prior[0] + 5 * self.m_prior[1]),
            (
                self.log_s_prior[0] - 5 * self.log_s_prior[1],
                self.log_s_prior[0] + 5 * self.log_s_prior[1],
            ),
        ]
        for _ in range(3):
            grids = [torch.linspace(*r, num_points, dtype=torch.float64) for r in ranges]
            weights = self._grid_posterior(log_lik, log_theta, *grids)
            moments, zoomed = {}, []
            for name, values, (low, high) in zip(
                ("m", "log_s"), (grids[0][:, None], grids[1][None, :]), ranges, strict=True
            ):
                mean = float((weights * values).sum())
                moments[name] = (mean, float((weights * (values - mean).square()).sum().sqrt()))
                half = max(6 * moments[name][1], 3 * (high - low) / (num_points - 1))
                zoomed.append((mean - half, mean + half))
            ranges = zoomed
        s = grids[1].exp()[None, :]
        s_mean = float((weights * s).sum())
        s_sd = float((weights * (s - s_mean).square()).sum().sqrt())
        return {"m": moments["m"], "s": (s_mean, s_sd)}

    def _grid_posterior(self, log_lik, log_theta, m, log_s) -> torch.Tensor:
        """Normalized posterior weights on the grid ``m × log_s``."""
        step = float(log_theta[1] - log_theta[0])
        log_post = torch.empty(len(m), len(log_s), dtype=torch.float64)
        for j, value in enumerate(log_s):
            z = (log_theta - m[:, None]) / value.exp()
            population = -0.5 * z.square() - value - 0.5 * math.log(2 * math.pi)
            per_series = torch.logsumexp(log_lik[:, None, :] + population + math.log(step), -1)
            log_post[:, j] = per_series.sum(0)
        log_post += dist.Normal(*self.m_prior).log_prob(m)[:, None]
        log_post += dist.Normal(*self.log_s_prior).log_prob(log_s)[None, :]
        weights = (log_post - log_post.max()).exp()
        return weights / weights.sum()


__all__ = ["HierarchicalOU"]
