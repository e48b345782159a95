r"""Ready-made latent SDE models: stochastic Lotka–Volterra, Ornstein–Uhlenbeck, neural drift.

Each model is a state-space model with a latent Euler–Maruyama path on a fine grid
``t_0 < ... < t_K`` that contains the ``N`` observation times ``t_{k_1}, ..., t_{k_N}``:

    ``θ ~ p(θ)``,   ``x_0 ~ p(x_0)``,
    ``x_{k+1} = x_k + h_k f_θ(t_k, x_k) + σ_θ ⊙ ΔW_k``,   ``ΔW_k ~ N(0, h_k I)``,
    ``y_{n,i} ~ p(y_{n,i} | x_{k_n}, θ)``   (independent given the path; missing values masked).

A model is a callable ``model(y=None)`` for Pyro: ``y`` is ``(N, D)`` with ``NaN`` where a value
is missing, and ``None`` samples it.

Sites and plates (``max_plate_nesting = 2``): the observations ``"y"`` live in
``pyro.plate("obs_time", N, dim=-2)`` and ``pyro.plate("series", D, dim=-1)`` (so the pointwise
log-likelihood has one entry per observed value); parameters with one value per series are
sampled in ``"series"``, parameters with one value per latent coordinate in
``pyro.plate("coordinates", d, dim=-1)``, scalars and the path ``"x"`` (event ``(K+1, d)``)
outside every plate. Only batch dims carry samples, so Pyro's particle plates, ``Predictive``
and the guide see one layout: under ``S`` samples a scalar is ``(S, 1, 1)``, a per-series
parameter ``(S, 1, D)``, the path ``(S, 1, 1, K+1, d)``. The drift captures the sampled
parameters and broadcasts them from the right (``alpha[..., None]``, and
:func:`per_coordinate` for vectors), as :class:`~pyro_nsde.EulerMaruyama` requires.
"""

import copy
import itertools
import math
from abc import ABC, abstractmethod

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..sde.euler_maruyama import EulerMaruyama

#: Value put in place of missing observations before masking them out (a valid point of the
#: support of every likelihood here; it never enters the log density).
_FILL_VALUE = 1.0


def observation_grid(
    obs_times: torch.Tensor, steps_per_unit: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fine grid through every observation time, with steps no longer than
    ``1 / steps_per_unit``.

    Each gap ``t_{n+1} - t_n`` is split into ``ceil(steps_per_unit * gap)`` equal steps, so
    irregular observation times are grid points.

    :param torch.Tensor obs_times: ``(N,)`` strictly increasing observation times.
    :param float steps_per_unit: the number of steps per unit of time (at least).
    :returns: ``(times, index)``: the grid ``(K+1,)`` (same dtype and device as ``obs_times``)
        and the grid index of each observation ``(N,)`` (``times[index] == obs_times``).
    """
    if not (isinstance(obs_times, torch.Tensor) and obs_times.dim() == 1):
        raise ValueError("obs_times must be a tensor of shape (N,)")
    if obs_times.shape[0] < 2:
        raise ValueError(f"obs_times must hold at least 2 times, but got {obs_times.shape[0]}")
    gaps = obs_times[1:] - obs_times[:-1]
    if not (gaps > 0).all():
        raise ValueError("obs_times must be strictly increasing")
    if not steps_per_unit > 0:
        raise ValueError(f"steps_per_unit must be positive, but got {steps_per_unit}")
    pieces, index, k = [], [0], 0
    for n, gap in enumerate(gaps.tolist()):
        num = max(1, math.ceil(steps_per_unit * gap - 1e-9))
        start, stop = obs_times[n], obs_times[n + 1]
        fractions = torch.arange(num, dtype=obs_times.dtype, device=obs_times.device) / num
        pieces.append(start + (stop - start) * fractions)
        k += num
        index.append(k)
    times = torch.cat(pieces + [obs_times[-1:]])
    return times, torch.tensor(index, device=obs_times.device)


def states_at(path: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The states of ``path`` at grid points ``index``, laid out for the observation plates.

    The path is sampled outside the ``"obs_time"`` and ``"series"`` plates (dims ``-2``, ``-1``),
    so under particle or sample plates its batch shape ends with their singleton slots,
    ``(S, 1, 1)`` (``(S, 1)`` as :class:`~pyro.infer.Predictive` conditions on it); these are
    dropped so that the selected time axis takes the ``"obs_time"`` plate's place.

    :param torch.Tensor path: ``(..., K+1, d)``.
    :param torch.Tensor index: ``(N,)`` grid indices.
    :returns: ``(..., N, d)`` with no singleton dim left of ``N``.
    """
    states = path.index_select(-2, index)
    while states.dim() > 2 and states.shape[-3] == 1:
        states = states.squeeze(-3)
    return states


def per_coordinate(value: torch.Tensor) -> torch.Tensor:
    """Lay out a parameter sampled in a plate over coordinates for the path.

    Without sample dims it is ``(d,)`` and stays so (the path's batch is ``()``). Under
    ``S`` samples it is ``(S, 1, d)`` (``(S, d)`` in a guide run without the observation
    plates) and becomes ``(S, 1, 1, d)`` (``(S, 1, d)``): the slot of the ``"obs_time"``
    plate is added, so that its batch matches the scalars' and the path's.
    """
    return value.unsqueeze(-2) if value.dim() > 1 else value


class LatentSDEModel(ABC):
    r"""Base class: a latent Euler–Maruyama path with diagonal noise observed on a grid.

    Subclasses define the priors (:meth:`sample_parameters`), the drift ``f_θ``
    (:meth:`drift`), the diffusion ``σ_θ`` (:meth:`diffusion`), the law of ``x_0``
    (:meth:`init`) and the observation model (:meth:`likelihood`).

    :param torch.Tensor obs_times: ``(N,)`` strictly increasing observation times, in the
        model's time unit; the grid starts at ``obs_times[0]``. Its dtype and device are those
        of every tensor of the model.
    :param float steps_per_unit: Euler–Maruyama steps per unit of time.
    """

    #: Latent state dimension ``d`` and number of observed series ``D``.
    state_dim: int
    obs_dim: int

    def __init__(self, obs_times: torch.Tensor, steps_per_unit: float):
        self.obs_times = obs_times
        self.times, self.obs_index = observation_grid(obs_times, steps_per_unit)
        self.steps_per_unit = steps_per_unit

    def with_obs_times(self, obs_times: torch.Tensor) -> "LatentSDEModel":
        """The same model (parameters, networks, priors) observed at ``obs_times``: with the
        model's own times first, its grid starts with the model's grid (each gap is split on
        its own), so posterior paths continue onto it."""
        model = copy.copy(self)
        model.obs_times = obs_times
        model.times, model.obs_index = observation_grid(obs_times, self.steps_per_unit)
        return model

    @abstractmethod
    def sample_parameters(self, series: pyro.plate) -> dict:
        """Sample the global parameters ``θ`` (Pyro sample sites); returns them by name.

        :param series: the plate over the observed series, for per-series parameters.
        """

    @abstractmethod
    def drift(self, params: dict):
        """The drift ``f_θ(t, x) -> (..., d)``, capturing the sampled ``params``."""

    def diffusion(self, params: dict) -> torch.Tensor:
        """Diagonal diffusion ``σ_θ``, ``(..., 1, 1, d)``: the ``"sigma_process"`` site."""
        return per_coordinate(params["sigma_process"])

    @abstractmethod
    def init(self, params: dict) -> dist.Distribution:
        """The law of ``x_0``, event ``(d,)``."""

    @abstractmethod
    def likelihood(self, states: torch.Tensor, params: dict) -> dist.Distribution:
        """``p(y | x)`` for states ``(..., N, d)``: batch ``(..., N, D)``, no event dims."""

    def path_law(self, params: dict, times: torch.Tensor | None = None, init=None):
        """The prior :class:`~pyro_nsde.EulerMaruyama` given ``params`` on ``times`` (default:
        the model's grid) from ``init`` (default: :meth:`init`)."""
        return EulerMaruyama(
            self.drift(params),
            self.diffusion(params),
            self.init(params) if init is None else init,
            self.times if times is None else times,
        )

    def __call__(self, y: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model.

        :param torch.Tensor y: ``(N, D)`` observations, ``NaN`` where missing, or ``None``.
        :returns: the observations (sampled when ``y`` is ``None``), ``(..., N, D)``.
        """
        num_obs = self.obs_index.shape[0]
        if y is not None and y.shape != (num_obs, self.obs_dim):
            raise ValueError(
                f"y must have shape ({num_obs}, {self.obs_dim}), but got {tuple(y.shape)}"
            )
        series = pyro.plate("series", self.obs_dim, dim=-1)
        params = self.sample_parameters(series)
        path = pyro.sample("x", self.path_law(params))
        states = states_at(path, self.obs_index)
        with pyro.plate("obs_time", num_obs, dim=-2), series:
            likelihood = self.likelihood(states, params)
            if y is not None:
                observed = ~torch.isnan(y)
                if not observed.all():
                    y = torch.where(observed, y, torch.full_like(y, _FILL_VALUE))
                    likelihood = likelihood.mask(observed)
            return pyro.sample("y", likelihood, obs=y)


class LotkaVolterra(LatentSDEModel):
    r"""Stochastic Lotka–Volterra dynamics on log-populations, with lognormal observations.

    With ``u = log(prey)``, ``v = log(predator)`` (populations in the data's unit):

        ``du = (α - β e^v) dt + σ_u dW_u``,
        ``dv = (-γ + δ e^u) dt + σ_v dW_v``,
        ``y_{n,i} ~ LogNormal(x_i(t_n), τ_i)``,   ``x = (u, v)``.

    The SDE is posed on the log scale directly (no Itô correction): the same process written
    for the populations ``H = e^u`` has drift ``H (α + σ_u²/2 - β L)``, i.e. its prey growth
    rate is ``α + σ_u²/2`` and its predator death rate ``γ - σ_v²/2``.

    Priors (independent), for time in years and populations in thousands:

    - ``α ~ LogNormal(log 0.55, 0.5)``, ``β ~ LogNormal(log 0.028, 0.5)``,
      ``γ ~ LogNormal(log 0.8, 0.5)``, ``δ ~ LogNormal(log 0.024, 0.5)`` (``rate_medians``:
      each allows a factor of ``e ≈ 2.7`` either way at two standard deviations),
    - ``sigma_process = (σ_u, σ_v) ~ LogNormal(-2, 1)`` (log-scale noise per ``sqrt(year)``),
    - ``sigma_obs = (τ_u, τ_v) ~ LogNormal(-1, 1)`` (Carpenter's prior),
    - ``x_0 ~ Normal(init_loc, init_scale)``.

    Sites: ``alpha``, ``beta``, ``gamma``, ``delta``; ``sigma_process``, ``sigma_obs`` in the
    ``"series"`` plate (the two species); ``x`` (event ``(K+1, 2)``); ``y`` ``(N, 2)``.

    :param torch.Tensor obs_times: ``(N,)`` observation times (e.g. years since the first).
    :param torch.Tensor init_loc: ``(2,)`` prior mean of ``x_0`` (e.g. the log of the first
        observations).
    :param float init_scale: prior standard deviation of ``x_0``.
    :param float steps_per_unit: Euler–Maruyama steps per unit of time.
    :param tuple rate_medians: prior medians of ``(α, β, γ, δ)``.
    :param float rate_scale: prior log-scale standard deviation of the rates.

    **References:**

    [1] Bob Carpenter (2018), "Predator-Prey Population Dynamics: the Lotka-Volterra model in
        Stan", Stan case studies.
    """

    state_dim = 2
    obs_dim = 2
    rate_names = ("alpha", "beta", "gamma", "delta")

    def __init__(
        self,
        obs_times: torch.Tensor,
        init_loc: torch.Tensor,
        *,
        init_scale: float = 0.5,
        steps_per_unit: float = 5.0,
        rate_medians=(0.55, 0.028, 0.8, 0.024),
        rate_scale: float = 0.5,
    ):
        super().__init__(obs_times, steps_per_unit)
        if init_loc.shape != (2,):
            raise ValueError(f"init_loc must have shape (2,), but got {tuple(init_loc.shape)}")
        if len(rate_medians) != 4 or min(rate_medians) <= 0:
            raise ValueError(f"rate_medians must be 4 positive numbers, but got {rate_medians}")
        self.init_loc = init_loc
        self.init_scale = init_scale
        self.rate_medians = tuple(float(r) for r in rate_medians)
        self.rate_scale = rate_scale

    def sample_parameters(self, series: pyro.plate) -> dict:
        like = self.obs_times
        params = {}
        for name, median in zip(self.rate_names, self.rate_medians, strict=True):
            loc = like.new_tensor(math.log(median))
            params[name] = pyro.sample(name, dist.LogNormal(loc, self.rate_scale))
        with series:
            for name, loc in (("sigma_process", -2.0), ("sigma_obs", -1.0)):
                params[name] = pyro.sample(name, dist.LogNormal(like.new_tensor(loc), 1.0))
        return params

    def drift(self, params: dict):
        alpha, beta, gamma, delta = (params[name][..., None] for name in self.rate_names)
        # f(x) = a + b ⊙ exp(flip(x)), a = (α, -γ), b = (-β, δ): three ops per call.
        a = torch.cat([alpha, -gamma], dim=-1)
        b = torch.cat([-beta, delta], dim=-1)

        def lotka_volterra(t, x):
            return torch.addcmul(a, b, x.flip(-1).exp())

        return lotka_volterra

    def init(self, params: dict) -> dist.Distribution:
        return dist.Normal(self.init_loc, self.init_scale).to_event(1)

    def likelihood(self, states: torch.Tensor, params: dict) -> dist.Distribution:
        return dist.LogNormal(states, params["sigma_obs"])


class OrnsteinUhlenbeck(LatentSDEModel):
    r"""Independent Ornstein–Uhlenbeck processes observed with Gaussian noise.

        ``dx_i = θ_i (μ_i - x_i) dt + σ_i dW_i``,   ``y_{n,i} ~ Normal(x_i(t_n), τ_i)``,

    for data standardized to mean 0 and scale 1 (the priors assume it), per series ``i``:
    ``θ ~ LogNormal(0, 1)``, ``μ ~ Normal(0, 1)``, ``σ ~ LogNormal(0, 1)``,
    ``τ ~ LogNormal(log 0.1, 1)``, ``x_0 ~ Normal(0, 1)``.

    Sites: ``theta``, ``mu``, ``sigma_process``, ``sigma_obs`` in the ``"series"`` plate;
    ``x`` (event ``(K+1, D)``); ``y`` ``(N, D)``.

    :param torch.Tensor obs_times: ``(N,)`` observation times.
    :param int obs_dim: ``D``, the number of observed series (also the state dimension).
    :param float steps_per_unit: Euler–Maruyama steps per unit of time.
    """

    def __init__(self, obs_times: torch.Tensor, obs_dim: int, *, steps_per_unit: float = 4.0):
        super().__init__(obs_times, steps_per_unit)
        self.state_dim = self.obs_dim = obs_dim

    def sample_parameters(self, series: pyro.plate) -> dict:
        zero = self.obs_times.new_tensor(0.0)
        priors = {
            "theta": dist.LogNormal(zero, 1.0),
            "mu": dist.Normal(zero, 1.0),
            "sigma_process": dist.LogNormal(zero, 1.0),
            "sigma_obs": dist.LogNormal(zero + math.log(0.1), 1.0),
        }
        with series:
            return {name: pyro.sample(name, prior) for name, prior in priors.items()}

    def drift(self, params: dict):
        theta, mu = per_coordinate(params["theta"]), per_coordinate(params["mu"])

        def ornstein_uhlenbeck(t, x):
            return theta * (mu - x)

        return ornstein_uhlenbeck

    def init(self, params: dict) -> dist.Distribution:
        zeros = self.obs_times.new_zeros(self.state_dim)
        return dist.Normal(zeros, 1.0).to_event(1)

    def likelihood(self, states: torch.Tensor, params: dict) -> dist.Distribution:
        return dist.Normal(states, params["sigma_obs"])


class LocalLinearTrend(LatentSDEModel):
    r"""A level that integrates a mean-reverting slope, observed with Gaussian noise: the
    continuous-time local linear trend (an integrated Ornstein–Uhlenbeck process). Per series
    ``i``, with level ``x_i`` and slope ``v_i``:

        ``dx_i = v_i dt + σ_i dW_i``,
        ``dv_i = κ_i (β_i - v_i) dt + ω_i dB_i``,   ``y_{n,i} ~ Normal(x_i(t_n), τ_i)``.

    The slope reverts to the long-run drift ``β_i`` at rate ``κ_i``: for large ``κ`` the level
    is a random walk with drift ``β`` (ARIMA(0,1,q) with a constant, in the limit), for small
    ``κ`` the slope itself wanders (an integrated random walk, ARIMA(0,2,q)); the posterior of
    ``κ`` weighs the two. The forecast continues the recent slope and relaxes it to ``β``.

    For data standardized to mean 0 and scale 1 and time in median gaps between observations
    (the priors assume it): ``κ ~ LogNormal(log 0.3, 1)``, ``β ~ Normal(0, 0.1)``,
    ``σ ~ LogNormal(log 0.1, 1.5)``, ``ω ~ LogNormal(log 0.02, 1.5)``,
    ``τ ~ LogNormal(log 0.1, 1.5)``, ``x_0 ~ Normal(0, 2)``, ``v_0 ~ Normal(0, 0.2)``.

    Sites: ``kappa``, ``beta``, ``sigma_level``, ``sigma_slope``, ``sigma_obs`` in the
    ``"series"`` plate; ``x`` (event ``(K+1, 2D)``: the ``D`` levels, then the ``D`` slopes);
    ``y`` ``(N, D)``.

    :param torch.Tensor obs_times: ``(N,)`` observation times.
    :param int obs_dim: ``D``, the number of observed series.
    :param float steps_per_unit: Euler–Maruyama steps per unit of time.
    """

    def __init__(self, obs_times: torch.Tensor, obs_dim: int, *, steps_per_unit: float = 4.0):
        super().__init__(obs_times, steps_per_unit)
        self.obs_dim, self.state_dim = obs_dim, 2 * obs_dim

    def sample_parameters(self, series: pyro.plate) -> dict:
        zero = self.obs_times.new_tensor(0.0)
        priors = {
            "kappa": dist.LogNormal(zero + math.log(0.3), 1.0),
            "beta": dist.Normal(zero, 0.1),
            "sigma_level": dist.LogNormal(zero + math.log(0.1), 1.5),
            "sigma_slope": dist.LogNormal(zero + math.log(0.02), 1.5),
            "sigma_obs": dist.LogNormal(zero + math.log(0.1), 1.5),
        }
        with series:
            return {name: pyro.sample(name, prior) for name, prior in priors.items()}

    def drift(self, params: dict):
        kappa, beta = per_coordinate(params["kappa"]), per_coordinate(params["beta"])
        num = self.obs_dim

        def local_linear_trend(t, x):
            slope = x[..., num:]
            relax = kappa * (beta - slope)
            return torch.cat([slope.expand_as(relax), relax], dim=-1)

        return local_linear_trend

    def diffusion(self, params: dict) -> torch.Tensor:
        return per_coordinate(torch.cat([params["sigma_level"], params["sigma_slope"]], dim=-1))

    def init(self, params: dict) -> dist.Distribution:
        scale = torch.cat(
            [
                self.obs_times.new_full((self.obs_dim,), 2.0),
                self.obs_times.new_full((self.obs_dim,), 0.2),
            ]
        )
        return dist.Normal(torch.zeros_like(scale), scale).to_event(1)

    def likelihood(self, states: torch.Tensor, params: dict) -> dist.Distribution:
        return dist.Normal(states[..., : self.obs_dim], params["sigma_obs"])


class Seasonal(LatentSDEModel):
    r"""A model plus a stochastic cycle of known period per series, added to what each series
    observes (Harvey's trend-cycle decomposition in continuous time): with ``ω_i = 2π/period_i``,

        ``dc_i = (-γ_i c_i - ω_i s_i) dt + ς_i dW'_i``,
        ``ds_i = (ω_i c_i - γ_i s_i) dt + ς_i dW''_i``,

    and the ``base`` model's observation of coordinate ``i`` made of ``x_i + c_i``. The cycle
    ``(c, s)`` turns at the angular frequency ``ω`` and is damped at the rate ``γ``; its noise
    lets its amplitude and phase drift. Priors (standardized data, time in median gaps):
    ``γ ~ LogNormal(log 0.05, 1)``, ``ς ~ LogNormal(log 0.05, 1.5)``, ``(c_0, s_0) ~
    Normal(0, 1)``; the base model's own. An Euler–Maruyama step multiplies an undamped
    cycle's amplitude by ``sqrt(1 + ω²h²)``: the chain's cycle persists for ``γ ≈ ω²h/2``,
    which the prior allows.

    Sites: the base model's, and ``damping``, ``sigma_cycle`` in the ``"series"`` plate;
    ``x`` (event ``(K+1, d + 2D)``: the base's ``d`` coordinates, then the ``c``, then the
    ``s``).

    :param LatentSDEModel base: a model whose ``D`` series observe its first ``D`` coordinates
        (:class:`OrnsteinUhlenbeck`, :class:`LocalLinearTrend`) and whose :meth:`init` is an
        independent normal.
    :param periods: the cycle's period per series (``(D,)`` or a number), in time units.
    """

    def __init__(self, base: LatentSDEModel, periods):
        super().__init__(base.obs_times, base.steps_per_unit)
        self.base = base
        like = base.obs_times
        periods = torch.as_tensor(periods, dtype=like.dtype, device=like.device)
        self.periods = periods.expand(base.obs_dim).clone()
        self.obs_dim, self.state_dim = base.obs_dim, base.state_dim + 2 * base.obs_dim

    def sample_parameters(self, series: pyro.plate) -> dict:
        params = self.base.sample_parameters(series)
        zero = self.obs_times.new_tensor(0.0)
        with series:
            params["damping"] = pyro.sample("damping", dist.LogNormal(zero + math.log(0.05), 1.0))
            params["sigma_cycle"] = pyro.sample(
                "sigma_cycle", dist.LogNormal(zero + math.log(0.05), 1.5)
            )
        return params

    def drift(self, params: dict):
        base = self.base.drift(params)
        damping = per_coordinate(params["damping"])
        omega = 2 * math.pi / self.periods
        inner, num = self.base.state_dim, self.obs_dim

        def seasonal(t, x):
            cos, sin = x[..., inner : inner + num], x[..., inner + num :]
            parts = [base(t, x[..., :inner]), -damping * cos - omega * sin]
            parts.append(omega * cos - damping * sin)
            return _cat_last(parts)

        return seasonal

    def diffusion(self, params: dict) -> torch.Tensor:
        cycle = per_coordinate(params["sigma_cycle"])
        return _cat_last([self.base.diffusion(params), cycle, cycle])

    def init(self, params: dict) -> dist.Distribution:
        base = self.base.init(params).base_dist
        zeros = self.obs_times.new_zeros(2 * self.obs_dim)
        loc = _cat_last([base.loc, zeros])
        return dist.Normal(loc, _cat_last([base.scale, zeros + 1.0])).to_event(1)

    def likelihood(self, states: torch.Tensor, params: dict) -> dist.Distribution:
        inner, num = self.base.state_dim, self.obs_dim
        observed = states[..., :num] + states[..., inner : inner + num]
        return self.base.likelihood(_cat_last([observed, states[..., num:inner]]), params)


def _cat_last(parts) -> torch.Tensor:
    """Concatenate along the last dim, broadcasting the others."""
    batch = torch.broadcast_shapes(*(part.shape[:-1] for part in parts))
    return torch.cat([part.expand(*batch, part.shape[-1]) for part in parts], dim=-1)


class NeuralSDE(LatentSDEModel):
    r"""A latent SDE with a neural drift, observed with Gaussian noise on its first ``D``
    coordinates.

        ``dx = f_φ(x) dt + σ ⊙ dW``,   ``y_{n,i} ~ Normal(x_i(t_n), τ_i)``,  ``i ≤ D``,

    ``f_φ`` a multilayer perceptron ``R^d → R^d`` (tanh) whose weights ``φ`` are learned by
    maximising the ELBO (``pyro.module``: point estimates), like the prior drift of Li et al.
    (2020). The ``d - D`` unobserved coordinates let the dynamics carry memory (an autonomous
    1-D SDE cannot oscillate). For standardized data: ``σ ~ LogNormal(log 0.3, 1)`` per
    coordinate, ``τ ~ LogNormal(log 0.1, 1)`` per series, ``x_0 ~ Normal(0, 1)``.

    Sites: ``sigma_process`` in the ``"coordinates"`` plate, ``sigma_obs`` in ``"series"``,
    ``x`` (event ``(K+1, d)``), ``y`` ``(N, D)``; module ``drift_net``.

    :param torch.Tensor obs_times: ``(N,)`` observation times.
    :param int obs_dim: ``D``.
    :param int latent_dim: ``d >= D`` (default ``D + 1``).
    :param tuple hidden_dims: hidden widths of ``f_φ``.
    :param float steps_per_unit: Euler–Maruyama steps per unit of time.

    **References:**

    [1] Xuechen Li, Ting-Kam Leonard Wong, Ricky T. Q. Chen, David Duvenaud (2020), "Scalable
        Gradients for Stochastic Differential Equations", AISTATS.
    """

    def __init__(
        self,
        obs_times: torch.Tensor,
        obs_dim: int,
        *,
        latent_dim: int | None = None,
        hidden_dims=(32, 32),
        steps_per_unit: float = 4.0,
    ):
        super().__init__(obs_times, steps_per_unit)
        latent_dim = obs_dim + 1 if latent_dim is None else latent_dim
        if latent_dim < obs_dim:
            raise ValueError(f"latent_dim must be at least obs_dim={obs_dim}, but got {latent_dim}")
        self.obs_dim, self.state_dim = obs_dim, latent_dim
        widths = (latent_dim, *hidden_dims, latent_dim)
        layers = []
        for w_in, w_out in itertools.pairwise(widths):
            layers += [nn.Linear(w_in, w_out), nn.Tanh()]
        self.net = nn.Sequential(*layers[:-1]).to(obs_times)

    def sample_parameters(self, series: pyro.plate) -> dict:
        pyro.module("drift_net", self.net)
        scale = self.obs_times.new_tensor(math.log(0.3))
        with pyro.plate("coordinates", self.state_dim, dim=-1):
            sigma_process = pyro.sample("sigma_process", dist.LogNormal(scale, 1.0))
        with series:
            sigma_obs = pyro.sample("sigma_obs", dist.LogNormal(scale + math.log(1 / 3), 1.0))
        return {"sigma_process": sigma_process, "sigma_obs": sigma_obs}

    def drift(self, params: dict):
        net = self.net

        def neural_drift(t, x):
            return net(x)

        return neural_drift

    def init(self, params: dict) -> dist.Distribution:
        zeros = self.obs_times.new_zeros(self.state_dim)
        return dist.Normal(zeros, 1.0).to_event(1)

    def likelihood(self, states: torch.Tensor, params: dict) -> dist.Distribution:
        return dist.Normal(states[..., : self.obs_dim], params["sigma_obs"])


__all__ = [
    "LatentSDEModel",
    "LocalLinearTrend",
    "LotkaVolterra",
    "NeuralSDE",
    "OrnsteinUhlenbeck",
    "Seasonal",
    "observation_grid",
    "per_coordinate",
    "states_at",
]
