"""Milliseconds per training iteration of pyro-nsde against a plain PyTorch loop, torchsde and
naive per-step Pyro, on one training problem, measured in one process and interleaved.

**The problem.** One series with state dimension ``d``, a known ``x_0 = 0`` and the prior

    ``x_{k+1} = x_k + h f(x_k) + σ ΔW_k``,  ``ΔW_k ~ N(0, h I_d)``,  ``k = 0, ..., K-1``,

with ``f`` an MLP ``d → 64 → 64 → d`` (SiLU) and ``σ = 0.5``; a Gaussian observation
``y_j ~ N(x_{10 j}, 0.25² I_d)`` every 10 steps. The guide moves each Wiener increment by a
control, ``ΔW_k ~ N(h u(t_k, x_k), h I_d)`` with ``u`` a :class:`~pyro_nsde.ControlNet` of
widths ``(64, 64)``, so every implementation maximises the same ELBO

    ``E_q[Σ_j log N(y_j; x_{10 j}, 0.25² I)] - E_q[Σ_k ½ h |u(t_k, x_k)|²]``

with ``B`` sample paths per iteration and one Adam step on the drift and control weights.
The step is dyadic, ``h = 2^-ceil(log2 K)`` (so ``t_K = K h ≤ 1``): float32 arithmetic on the
grid is then exact and torchsde's fixed-step loop lands on the grid points without extra steps.

**The implementations** (same initial weights, copied):

- ``plain-loop``: a hand-written Euler–Maruyama loop (drift and control per step, KL
  ``Σ ½ h |u|²``, Gaussian log-likelihood written out, ``torch.optim.Adam``): the floor.
- ``pyro-nsde``: :class:`~pyro_nsde.EulerMaruyama` in the model, :class:`~pyro_nsde.GirsanovGuide`
  with the control net, ``SVI`` with ``Trace_ELBO(num_particles=B, vectorize_particles=True)``.
- ``pyro-nsde-diagonal``, ``pyro-nsde-full``: the same with ``covariance="diagonal"|"full"``
  (a learned increment covariance; the extra head starts at ``S = I``, so the objective at the
  common initialization is the same).
- ``torchsde``: ``torchsde.sdeint(sde, x0, ts, bm, method="euler", dt=h, logqp=True)`` with
  ``f = drift + σ u`` (posterior), ``g = σ``, ``h = drift`` (prior), and a
  ``BrownianInterval(t0, t1, size=(B, d + 1), dt=h)`` (``d + 1``: ``logqp`` appends the KL
  as an extra state with zero diffusion); ``ts`` holds the observation times.
- ``naive-pyro``: one ``pyro.sample`` site per step in the model and in the guide, the same
  nets, ``Trace_ELBO(num_particles=B, vectorize_particles=True)``.

**Parallel in time** (issue 15; ``--parallel`` runs its grid, up to ``K = 10⁴``):

- ``pyro-nsde-linear``: the ``pyro-nsde`` model with
  ``GirsanovGuide(model, control="linear", covariance="full", init_path="prior")``: a
  Gauss–Markov posterior (:class:`~pyro_nsde.GaussMarkovEulerMaruyama`, posterior drift
  ``(a_k + B_k x) / sqrt(h)``, increment scale ``S_k``) sampled by the parallel scan
  :func:`~pyro_nsde.posterior.scan.affine_scan`, one set of coefficients for the series,
  shared
  by the ``B`` particles. Another variational family: its ELBO is not the plain loop's, so the
  sanity check prints it without comparing.
- ``pyro-nsde-linear-series``: the same guide on ``B`` series (``pyro.plate``, one particle
  each, every series observing the same data), each with its own coefficients.
- ``pyro-nsde-subsampled`` (issue 23): the ``B`` series with the cheap Gauss–Markov family
  (``gain="diagonal"``, ``covariance="diagonal"``), trained on ``subsample_steps(model, 100)``.
- ``drift-floor``: not a method, one batched call of the drift MLP on all ``K·B`` states and
  its backward: the floor of anything that evaluates the drift at every grid point in one call.
- ``drift-floor-blocked``: the same through :func:`~pyro_nsde.sde.euler_maruyama.at_all_steps`
  (blocks of consecutive steps, about 8192 states each), as the package evaluates it.

**What is reported.** Per configuration ``(K, B, d)``: the median (and interquartile range) of
the wall time of single iterations after warm-up, taken round-robin over the implementations
(the order alternates between rounds) so that load on the machine hits all of them alike; the
ratio of medians to ``plain-loop`` and its inverse (the speed-up); and the peak memory of
training, measured for each (implementation, configuration) in a fresh process (a forked child
of a server that has only imported the libraries): on CPU the growth of the peak resident set
(``VmHWM``) over the resident set before the first iteration, on CUDA
``torch.cuda.max_memory_allocated`` over the allocation before it. Before timing, a sanity
check estimates each implementation's loss at the common initialization from many particles
(no gradients) and compares the means with the plain loop's (rows of another variational
family are printed, not compared).

Run ``python benchmarks/bench.py --help`` for the flags; ``--quick`` is a smoke run,
``--parallel`` the grid of issue 15.
"""

import argparse
import contextlib
import copy
import cProfile
import math
import multiprocessing
import os
import platform
import pstats
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torchsde
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.util import zero_grads
from torch import nn

import pyro_nsde
from pyro_nsde import ControlNet, EulerMaruyama, GirsanovGuide, subsample_steps
from pyro_nsde.sde.euler_maruyama import at_all_steps

OBS_EVERY = 10
DIFFUSION = 0.5
OBS_SCALE = 0.25
LEARNING_RATE = 1e-3
WIDTH = 64
#: Steps per path of ``pyro-nsde-subsampled`` (``subsample_steps``).
SUBSAMPLE_STEPS = 100
FULL_GRID = "100x16x1,100x16x8,100x512x1,100x512x8,1000x16x1,1000x16x8,1000x512x1,1000x512x8"
QUICK_GRID = "20x8x2"
#: ``--parallel`` (issue 15): the parallel-in-time rows against the sequential ones, up to
#: K = 10⁴ (not at B = 512, where the sequential rows need ≈ 12 GB and ≈ 10 s an iteration).
PARALLEL_GRID = ",".join(
    f"{k}x{b}x{d}" for k in (100, 1000, 10000) for b in (16, 512) for d in (1, 8) if k * b < 5e6
)
PARALLEL_IMPLS = (
    "plain-loop,pyro-nsde,pyro-nsde-linear,pyro-nsde-linear-series,drift-floor,drift-floor-blocked"
)
FLOOR = "plain-loop"


@dataclass(frozen=True)
class Config:
    """One benchmark setting: ``K`` steps, ``B`` sample paths per iteration, state dim ``d``."""

    steps: int
    paths: int
    dim: int

    @classmethod
    def parse(cls, text: str) -> "Config":
        try:
            steps, paths, dim = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"a config must read KxBxd (e.g. 100x512x1), but got {text!r}"
            ) from None
        if steps < OBS_EVERY or min(paths, dim) < 1:
            raise ValueError(f"need K >= {OBS_EVERY} (one observation), B, d >= 1; got {text!r}")
        return cls(steps, paths, dim)

    def __str__(self) -> str:
        return f"{self.steps}x{self.paths}x{self.dim}"


class Drift(nn.Module):
    """The prior drift ``f(t, x) = MLP(x)``, ``d → width → width → d`` with SiLU.

    ``x`` is ``(..., d)`` (any leading dims, as :class:`~pyro_nsde.EulerMaruyama` requires);
    ``t`` is accepted and unused.
    """

    def __init__(self, dim: int, width: int = WIDTH):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, dim),
        )

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Problem:
    """The data and initial networks of one configuration, identical for every implementation.

    Attributes: ``times`` ``(K+1,)``, ``h`` (float), ``x0`` ``(d,)``, ``sigma`` ``(d,)``,
    ``obs_steps`` ``(n,)`` (long, the observed grid indices ``10, 20, ...``), ``y`` ``(n, d)``,
    and the initial ``drift`` and ``control`` modules (to be copied, never trained).
    """

    def __init__(self, config: Config, device: torch.device, seed: int = 0):
        self.config = config
        steps, dim = config.steps, config.dim
        if steps < OBS_EVERY:
            raise ValueError(f"K must be at least {OBS_EVERY} (one observation), but got {steps}")
        generator = torch.Generator().manual_seed(seed)
        self.h = 2.0 ** -math.ceil(math.log2(steps))
        self.times = (torch.arange(steps + 1) * self.h).to(device)
        self.x0 = torch.zeros(dim, device=device)
        self.sigma = torch.full((dim,), DIFFUSION, device=device)
        self.obs_steps = torch.arange(OBS_EVERY, steps + 1, OBS_EVERY, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.drift = Drift(dim)
            self.control = ControlNet(dim, hidden_dims=(WIDTH, WIDTH))
            # Leave the prior: a control of order one, so the KL term is far from zero.
            nn.init.normal_(self.control.head.weight, std=1.0 / math.sqrt(WIDTH))
            nn.init.constant_(self.control.head.bias, 1.0)
        self.drift.to(device)
        self.control.to(device)
        # Data: one path of the prior, observed with noise.
        noise = torch.randn(steps, dim, generator=generator).to(device)
        x, path = self.x0, [self.x0]
        with torch.no_grad():
            for k in range(steps):
                x = x + self.h * self.drift(None, x) + self.sigma * math.sqrt(self.h) * noise[k]
                path.append(x)
        obs_noise = torch.randn(self.obs_steps.numel(), dim, generator=generator).to(device)
        self.y = torch.stack(path)[self.obs_steps] + OBS_SCALE * obs_noise

    def log_likelihood(self, states: torch.Tensor) -> torch.Tensor:
        """``Σ_j log N(y_j; x_{10 j}, 0.25² I)`` for observed states ``(n, ..., d)``;
        returns shape ``(...)``."""
        y = self.y.reshape(self.y.shape[:1] + (1,) * (states.dim() - 2) + self.y.shape[1:])
        z = (states - y) / OBS_SCALE
        log_norm = math.log(OBS_SCALE) + 0.5 * math.log(2 * math.pi)
        return (-0.5 * z.pow(2) - log_norm).sum(-1).sum(0)


class Implementation:
    """One way to train on a :class:`Problem` with ``particles`` paths per iteration.

    ``step()`` takes one optimizer step and returns the loss (the negative ELBO estimate);
    ``estimate(n)`` returns the loss from ``n`` particles without gradients or updates;
    ``active()`` is the context that every call runs in. ``objective`` says what the sanity
    check does with it: ``"same"`` (the plain loop's ELBO, compared), ``"other"`` (the ELBO of
    another variational family, printed only) or ``None`` (no objective, left out).
    """

    objective = "same"

    def __init__(self, problem: Problem, particles: int):
        self.problem = problem
        self.particles = particles
        self.drift = copy.deepcopy(problem.drift)
        self.control = self.make_control()

    def make_control(self) -> nn.Module:
        return copy.deepcopy(self.problem.control)

    def active(self):
        return contextlib.nullcontext()


class _TorchImplementation(Implementation):
    """An implementation with a ``loss(particles)`` tensor and a ``torch.optim`` optimizer."""

    def step(self) -> float:
        loss = self.loss(self.particles)
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        return loss.item()

    @torch.no_grad()
    def estimate(self, particles: int) -> float:
        return self.loss(particles).item()

    def phases(self) -> tuple:
        """One iteration as ``(forward, backward, optimizer)`` wall times in seconds."""
        start = time.perf_counter()
        loss = self.loss(self.particles)
        forward = time.perf_counter()
        self.optim.zero_grad()
        loss.backward()
        backward = time.perf_counter()
        self.optim.step()
        return forward - start, backward - forward, time.perf_counter() - backward


class PlainLoop(_TorchImplementation):
    """The floor: a hand-written Euler–Maruyama loop and ``torch.optim.Adam``."""

    def __init__(self, problem, particles):
        super().__init__(problem, particles)
        params = list(self.drift.parameters()) + list(self.control.parameters())
        self.optim = torch.optim.Adam(params, lr=LEARNING_RATE)
        self.t_steps = problem.times[:-1].unsqueeze(-1)  # (K, 1)
        self.observed = set(problem.obs_steps.tolist())

    def loss(self, particles: int) -> torch.Tensor:
        p = self.problem
        h, sqrt_h = p.h, math.sqrt(p.h)
        eps = torch.randn((p.config.steps, particles, p.config.dim), device=p.x0.device)
        x = p.x0.expand(particles, -1)
        us, observed = [], []
        for k in range(p.config.steps):
            t = self.t_steps[k]
            u = self.control(t, x)
            x = x + h * (self.drift(t, x) + p.sigma * u) + (sqrt_h * p.sigma) * eps[k]
            us.append(u)
            if k + 1 in self.observed:
                observed.append(x)
        kl = (0.5 * h) * torch.stack(us).pow(2).sum((0, -1))
        return (kl - p.log_likelihood(torch.stack(observed))).mean()


class _PyroImplementation(Implementation):
    """A model/guide pair (subclasses define ``model`` and ``make_guide``) trained by ``SVI``
    in its own parameter-store scope, so that the implementations' names never collide."""

    def __init__(self, problem, particles):
        super().__init__(problem, particles)
        self._scope = None
        with self.active():
            optim = pyro.optim.Adam({"lr": LEARNING_RATE})
            self.svi = SVI(self.trained_model(), self.make_guide(), optim, self.elbo(particles))

    def trained_model(self):
        """The model ``SVI`` steps on (``model`` itself but where subsampled)."""
        return self.model

    def elbo(self, particles: int) -> Trace_ELBO:
        return Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)

    @contextlib.contextmanager
    def active(self):
        with pyro.get_param_store().scope(self._scope) as scope:
            self._scope = scope
            yield

    def step(self) -> float:
        return self.svi.step()

    def estimate(self, particles: int) -> float:
        return self.elbo(particles).loss(self.model, self.svi.guide)

    def phases(self) -> tuple:
        """One iteration as ``(forward, backward, optimizer)`` wall times in seconds: what
        ``SVI.step`` does, timed in its three parts (the forward includes Pyro's tracing)."""
        start = time.perf_counter()
        with poutine.trace(param_only=True) as capture:
            loss = self.elbo(self.particles).differentiable_loss(self.model, self.svi.guide)
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        self.svi.optim(params)
        zero_grads(params)
        return forward - start, backward - forward, time.perf_counter() - backward


class PyroNSDE(_PyroImplementation):
    """``EulerMaruyama`` model, ``GirsanovGuide`` with the control net."""

    covariance = "prior"

    compile_step = False

    def __init__(self, problem, particles, checkpoint_every=None):
        self.checkpoint_every = checkpoint_every
        super().__init__(problem, particles)

    def make_control(self) -> nn.Module:
        if self.covariance == "prior":
            return super().make_control()
        # The common control plus a zero-initialised covariance head (S = I): same start.
        common = self.problem.control
        control = ControlNet(
            self.problem.config.dim, hidden_dims=(WIDTH, WIDTH), covariance=self.covariance
        ).to(self.problem.x0.device)
        state = {k: v for k, v in common.state_dict().items() if not k.startswith("head.")}
        control.load_state_dict(state, strict=False)
        with torch.no_grad():
            m = common.noise_dim
            control.head.weight[:m] = common.head.weight
            control.head.bias[:m] = common.head.bias
        return control

    def make_guide(self) -> GirsanovGuide:
        return GirsanovGuide(
            self.model,
            control=self.control,
            covariance=self.covariance,
            checkpoint_every=self.checkpoint_every,
            compile_step=self.compile_step,
        )

    def model(self):
        p = self.problem
        pyro.module("drift", self.drift)
        x = pyro.sample("x", EulerMaruyama(self.drift, p.sigma, p.x0, p.times))
        pyro.sample("y", dist.Normal(x[..., p.obs_steps, :], OBS_SCALE).to_event(2), obs=p.y)


class PyroNSDECompiled(PyroNSDE):
    """The same with ``GirsanovGuide(..., compile_step=True)``: the step under
    ``torch.compile`` (compiled during the warm-up iterations)."""

    compile_step = True


class PyroNSDEDiagonal(PyroNSDE):
    covariance = "diagonal"


class PyroNSDEFull(PyroNSDE):
    covariance = "full"


class NaivePyro(_PyroImplementation):
    """One ``pyro.sample`` site per Euler–Maruyama step in the model and in the guide."""

    def __init__(self, problem, particles):
        self.t_steps = problem.times[:-1].unsqueeze(-1)
        self.observed = {int(k): j for j, k in enumerate(problem.obs_steps.tolist())}
        super().__init__(problem, particles)

    def model(self):
        p = self.problem
        pyro.module("drift", self.drift)
        scale = p.sigma * math.sqrt(p.h)
        x = p.x0
        for k in range(p.config.steps):
            loc = x + p.h * self.drift(self.t_steps[k], x)
            x = pyro.sample(f"x_{k + 1}", dist.Normal(loc, scale).to_event(1))
            j = self.observed.get(k + 1)
            if j is not None:
                pyro.sample(f"y_{j}", dist.Normal(x, OBS_SCALE).to_event(1), obs=p.y[j])

    def make_guide(self):
        return self.guide

    def guide(self):
        p = self.problem
        pyro.module("control", self.control)
        scale = p.sigma * math.sqrt(p.h)
        x = p.x0
        for k in range(p.config.steps):
            t = self.t_steps[k]
            loc = x + p.h * (self.drift(t, x) + p.sigma * self.control(t, x))
            x = pyro.sample(f"x_{k + 1}", dist.Normal(loc, scale).to_event(1))


class _PosteriorSDE(nn.Module):
    """torchsde's protocol: posterior drift ``f = drift + σ u``, diffusion ``g = σ``, prior
    drift ``h = drift``; states ``(B, d)``, ``t`` a scalar tensor."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, drift, control, sigma):
        super().__init__()
        self.drift, self.control = drift, control
        self.sigma = sigma

    def f(self, t, y):
        t = t.reshape(1)
        return self.drift(t, y) + self.sigma * self.control(t, y)

    def g(self, t, y):
        return self.sigma.expand_as(y)

    def h(self, t, y):
        return self.drift(t.reshape(1), y)


class TorchSDE(_TorchImplementation):
    """``torchsde.sdeint(..., method="euler", logqp=True)`` with a sized Brownian interval."""

    def __init__(self, problem, particles):
        super().__init__(problem, particles)
        self.sde = _PosteriorSDE(self.drift, self.control, problem.sigma)
        self.optim = torch.optim.Adam(self.sde.parameters(), lr=LEARNING_RATE)
        steps = torch.cat([problem.times.new_zeros(1, dtype=torch.long), problem.obs_steps])
        if steps[-1] != problem.config.steps:
            steps = torch.cat([steps, steps.new_full((1,), problem.config.steps)])
        self.ts = problem.times[steps]
        self.obs_rows = torch.isin(steps, problem.obs_steps).nonzero().squeeze(-1)

    def loss(self, particles: int) -> torch.Tensor:
        p = self.problem
        bm = torchsde.BrownianInterval(
            t0=float(self.ts[0]),
            t1=float(self.ts[-1]),
            size=(particles, p.config.dim + 1),
            dtype=p.x0.dtype,
            device=p.x0.device,
            dt=p.h,
            entropy=int(torch.randint(2**31 - 1, ())),
        )
        x0 = p.x0.expand(particles, -1)
        ys, log_ratio = torchsde.sdeint(
            self.sde, x0, self.ts, bm=bm, method="euler", dt=p.h, logqp=True
        )
        kl = log_ratio.sum(0)
        return (kl - p.log_likelihood(ys[self.obs_rows])).mean()


class PyroNSDELinear(PyroNSDE):
    """Parallel in time (issue 15): the same model, ``GirsanovGuide(model, control="linear",
    covariance="full", init_path="prior")``, a :class:`~pyro_nsde.GaussMarkovEulerMaruyama`
    path sampled by :func:`~pyro_nsde.posterior.scan.affine_scan` (no loop over steps; the
    drift is evaluated once, on all ``K·B`` states, for ``log p`` and the KL). One set of
    coefficients ``(a_k, B_k, S_k)`` for the one series, shared by the ``B`` particles.
    ``init_path="prior"`` skips the Laplace fit at setup: the timed step is the SVI step."""

    objective = "other"  # another variational family: its ELBO at the start differs

    def make_control(self) -> nn.Module:
        return nn.Identity()  # unused: the guide owns its LinearControl

    def make_guide(self) -> GirsanovGuide:
        return GirsanovGuide(self.model, control="linear", covariance="full", init_path="prior")


class PyroNSDELinearSeries(PyroNSDELinear):
    """The same guide on ``B`` *series* instead of ``B`` particles of one: the path under
    ``pyro.plate("series", B)``, each series with its own coefficients ``(K, B, ...)`` (the
    guide's parameters grow with ``B``), one particle per series,
    ``Trace_ELBO(max_plate_nesting=1)``. Every series sees the observations of the problem,
    so the data and the drift calls are those of the other rows; the reported loss is per
    series."""

    def __init__(self, problem, particles):
        self.series = particles
        self.x0 = problem.x0.expand(particles, -1)
        self.y = problem.y.expand(particles, -1, -1)
        super().__init__(problem, particles)

    def elbo(self, particles: int) -> Trace_ELBO:
        draws = max(1, particles // self.series)
        return Trace_ELBO(num_particles=draws, vectorize_particles=True, max_plate_nesting=1)

    def step(self) -> float:
        return self.svi.step() / self.series

    def estimate(self, particles: int) -> float:
        return super().estimate(particles) / self.series

    def model(self):
        p = self.problem
        pyro.module("drift", self.drift)
        with pyro.plate("series", self.series, dim=-1):
            x = pyro.sample("x", EulerMaruyama(self.drift, p.sigma, self.x0, p.times))
            obs = x[..., p.obs_steps, :]
            pyro.sample("y", dist.Normal(obs, OBS_SCALE).to_event(2), obs=self.y)


class PyroNSDESubsampled(PyroNSDELinearSeries):
    """Issue 23: the ``B`` series of ``pyro-nsde-linear-series`` with the cheap Gauss–Markov
    family (``gain="diagonal"``, ``covariance="diagonal"``) trained on
    :func:`~pyro_nsde.subsample_steps` of :data:`SUBSAMPLE_STEPS` steps per path (all of
    them on shorter grids): the drift runs on ``R`` steps per series, not ``K``."""

    def make_guide(self) -> GirsanovGuide:
        return GirsanovGuide(
            self.model,
            control="linear",
            gain="diagonal",
            covariance="diagonal",
            init_path="prior",
            subsample_steps=self.num_steps,
        )

    @property
    def num_steps(self) -> int:
        return min(SUBSAMPLE_STEPS, self.problem.config.steps)

    def trained_model(self):
        return subsample_steps(self.model, self.num_steps)


class DriftFloor(Implementation):
    """Not a method: ONE batched call of the drift MLP on all ``K·B`` states ``(K, B, d)``
    and its backward (to the weights and to the states), no optimizer step. The floor of any
    method that evaluates the drift at every grid point (``log p`` of the path), so the
    ceiling of a parallel-in-time speed-up."""

    objective = None  # no ELBO

    def __init__(self, problem, particles):
        super().__init__(problem, particles)
        config, device = problem.config, problem.x0.device
        shape = (config.steps, particles, config.dim)
        generator = torch.Generator().manual_seed(1)
        self.states = torch.randn(shape, generator=generator).to(device).requires_grad_()
        self.grad = torch.randn(shape, generator=generator).to(device)
        self.t = problem.times[:-1].reshape(-1, 1, 1)

    def make_control(self) -> nn.Module:
        return nn.Identity()

    def _zero(self) -> None:
        self.states.grad = None
        self.drift.zero_grad(set_to_none=True)

    def _evaluate(self):
        return self.drift(self.t, self.states)

    def step(self) -> float:
        self._zero()
        self._evaluate().backward(self.grad)
        return 0.0

    def phases(self) -> tuple:
        """``(forward, backward, 0)``: there is no optimizer step."""
        self._zero()
        start = time.perf_counter()
        out = self._evaluate()
        forward = time.perf_counter()
        out.backward(self.grad)
        return forward - start, time.perf_counter() - forward, 0.0


class DriftFloorBlocked(DriftFloor):
    """The same drift evaluation and backward through
    :func:`~pyro_nsde.sde.euler_maruyama.at_all_steps` (blocks of consecutive steps of about
    8192 states, as the package's vectorized log-densities evaluate the drift): the floor of
    the parallel-in-time guide as it runs."""

    def _evaluate(self):
        return at_all_steps(self.drift, self.t, self.states)


IMPLEMENTATIONS = {
    "plain-loop": PlainLoop,
    "pyro-nsde": PyroNSDE,
    "pyro-nsde-compiled": PyroNSDECompiled,
    "pyro-nsde-diagonal": PyroNSDEDiagonal,
    "pyro-nsde-full": PyroNSDEFull,
    "torchsde": TorchSDE,
    "naive-pyro": NaivePyro,
    "pyro-nsde-linear": PyroNSDELinear,
    "pyro-nsde-linear-series": PyroNSDELinearSeries,
    "pyro-nsde-subsampled": PyroNSDESubsampled,
    "drift-floor": DriftFloor,
    "drift-floor-blocked": DriftFloorBlocked,
}


def build(name: str, config: Config, device: str, seed: int, **kwargs) -> Implementation:
    problem = Problem(config, torch.device(device), seed)
    return IMPLEMENTATIONS[name](problem, config.paths, **kwargs)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_step(impl: Implementation, device: str) -> float:
    """Wall time of one iteration in milliseconds."""
    _sync(device)
    start = time.perf_counter()
    impl.step()
    _sync(device)
    return 1000 * (time.perf_counter() - start)


def time_interleaved(impls: dict, device: str, warmup: int, steps: int, repeats: int) -> dict:
    """Round-robin timing: ``repeats`` rounds of ``steps`` iterations of each implementation,
    the order reversed every other round. Returns ``{name: [ms, ...]}``."""
    for impl in impls.values():
        with impl.active():
            for _ in range(warmup):
                impl.step()
    samples = {name: [] for name in impls}
    names = list(impls)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            impl = impls[name]
            with impl.active():
                samples[name] += [timed_step(impl, device) for _ in range(steps)]
    return samples


def sanity_check(impls: dict, particles: int, repeats: int) -> list:
    """Mean and standard error of each implementation's loss at the common initialization,
    from ``repeats`` independent estimates of ``particles`` particles each.

    :returns: lines to print; the last says whether every mean is within 4 standard errors of
        the plain loop's.
    """
    stats = {}
    for name, impl in impls.items():
        if impl.objective is None:
            continue
        with impl.active():
            values = [impl.estimate(particles) for _ in range(repeats)]
        stats[name] = statistics.fmean(values), statistics.stdev(values) / math.sqrt(repeats)
    ref_mean, ref_se = stats[FLOOR]
    lines, bad = [], []
    for name, (mean, se) in stats.items():
        line = f"  {name:<24} loss {mean:10.4f} ± {se:.4f}"
        if impls[name].objective != "same":
            lines.append(f"{line}   (another variational family: not compared)")
            if not math.isfinite(mean):
                bad.append(name)
            continue
        z = (mean - ref_mean) / math.hypot(se, ref_se) if name != FLOOR else 0.0
        lines.append(f"{line}   z vs {FLOOR} {z:+.2f}")
        if abs(z) > 4 or not math.isfinite(z):
            bad.append(name)
    total = particles * repeats
    if bad:
        lines.append(f"sanity: DISAGREE with {FLOOR} (|z| > 4, {total} particles): {bad}")
    else:
        lines.append(f"sanity: all objectives agree with {FLOOR} within 4 s.e. ({total} particles)")
    return lines


def _load() -> str:
    """The 1, 5 and 15 minute load averages (a benchmark wants them well below the threads)."""
    try:
        return ", ".join(f"{load:.2f}" for load in os.getloadavg())
    except OSError:
        return "unavailable"


def _read_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux ≥ 4.0); ``False`` if unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _maxrss() -> int:
    """``ru_maxrss`` in bytes (kilobytes on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def measure_memory(name, config, device, seed, threads, validate, iterations, kwargs):
    """Peak memory of ``iterations`` training iterations; meant to run in a fresh process.

    :returns: ``(MB, ms)``: the peak over the memory in use before the first iteration (CUDA:
        allocated bytes; CPU: resident set, ``VmHWM`` reset to ``VmRSS`` where Linux allows,
        else ``ru_maxrss``), and the wall time of the last iteration.
    """
    torch.set_num_threads(threads)
    pyro.enable_validation(validate)
    impl = build(name, config, device, seed, **kwargs)
    cuda = device.startswith("cuda")
    with impl.active():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        elif resettable := _reset_peak_rss():
            before = _read_status("VmRSS")
        else:
            before = _maxrss()
        for _ in range(iterations):
            ms = timed_step(impl, device)
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _read_status("VmHWM") if resettable else _maxrss()
    return (peak - before) / 2**20, ms


def memory_context():
    """A forkserver that has imported the libraries once: each measurement forks a fresh
    child from it, cheaply and without inheriting any allocation of this process."""
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo: imported lazily by the first torch.optim optimizer (~80 MB).
    context.set_forkserver_preload(["torch", "torch._dynamo", "pyro", "torchsde", "pyro_nsde"])
    return context


def run_memory(context, name, config, device, seed, threads, validate, iterations=2, **kwargs):
    with context.Pool(1, maxtasksperchild=1) as pool:
        args = (name, config, device, seed, threads, validate, iterations, kwargs)
        return pool.apply(measure_memory, args)


def profile_step(impl: Implementation, warmup: int, steps: int, top: int) -> None:
    """Print the ``top`` entries of a cProfile of ``steps`` iterations (after ``warmup``), by
    own time and by cumulative time."""
    profiler = cProfile.Profile()
    with impl.active():
        for _ in range(warmup):
            impl.step()
        profiler.enable()
        for _ in range(steps):
            impl.step()
        profiler.disable()
    for key in ("tottime", "cumulative"):
        print(f"\ncProfile of {steps} iterations of {type(impl).__name__}, sorted by {key}:")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats(key).print_stats(top)


def breakdown(impls: dict, warmup: int, steps: int) -> list:
    """Lines of a table: median milliseconds of each phase of an iteration, per
    implementation (after ``warmup`` iterations, over ``steps``)."""
    lines = [
        "| implementation | forward ms | backward ms | optimizer ms | total ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, impl in impls.items():
        with impl.active():
            for _ in range(warmup):
                impl.step()
            medians = [
                1000 * statistics.median(p)
                for p in zip(*(impl.phases() for _ in range(steps)), strict=True)
            ]
        cells = " | ".join(f"{value:.1f}" for value in medians)
        lines.append(f"| {name} | {cells} | {sum(medians):.1f} |")
    return lines


def _speed_up(ratio: float) -> str:
    """``1 / ratio`` as ``12.3×`` (or ``0.87×`` below 10)."""
    return f"{1 / ratio:.2f}×" if 1 / ratio < 10 else f"{1 / ratio:.1f}×"


def format_table(rows: list) -> str:
    """The results as a Markdown table; ``speed-up`` is the plain loop's median over the row's
    (``× plain loop`` its inverse)."""
    header = (
        "| K | B | d | implementation | median ms/iter | IQR ms | × plain loop | speed-up "
        "| peak MB |\n"
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        memory = "–" if row["memory"] is None else f"{row['memory']:.1f}"
        lines.append(
            f"| {row['K']} | {row['B']} | {row['d']} | {row['name']} | {row['median']:.1f} "
            f"| {row['iqr']:.1f} | {row['ratio']:.2f} | {_speed_up(row['ratio'])} | {memory} |"
        )
    return "\n".join(lines)


QUICK = dict(
    configs=QUICK_GRID,
    steps=2,
    repeats=2,
    warmup=1,
    memory_iterations=1,
    sanity_particles=256,
    sanity_repeats=4,
    threads=1,
)
PARALLEL = dict(configs=PARALLEL_GRID, impls=PARALLEL_IMPLS, steps=1, repeats=5, warmup=1)
DEFAULTS = dict(
    impls=",".join(IMPLEMENTATIONS),
    configs=FULL_GRID,
    steps=5,
    repeats=5,
    warmup=3,
    memory_iterations=2,
    sanity_particles=1024,
    sanity_repeats=8,
    threads=2,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", help=f"comma-separated KxBxd (default {FULL_GRID})")
    parser.add_argument("--impls", help="comma-separated (default: all)")
    parser.add_argument("--steps", type=int, help="timed iterations per round (default 5)")
    parser.add_argument("--repeats", type=int, help="rounds over implementations (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default 3)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validate", action="store_true", help="keep Pyro validation on")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument("--memory-iterations", type=int, help="iterations measured (default 2)")
    parser.add_argument("--sanity-particles", type=int, help="per estimate (default 1024)")
    parser.add_argument("--sanity-repeats", type=int, help="estimates; 0 skips (default 8)")
    parser.add_argument("--profile", help="cProfile this implementation on the first config")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="time forward, backward and optimizer of each implementation on the first config",
    )
    parser.add_argument(
        "--parallel",
        action="store_true",
        help=f"issue 15's grid, parallel-in-time rows against the sequential ones: defaults "
        f"become {PARALLEL} (with --quick, only the implementations)",
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke run: defaults become {QUICK}")
    args = parser.parse_args(argv)
    presets = DEFAULTS | (PARALLEL if args.parallel else {}) | (QUICK if args.quick else {})
    for key, value in presets.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps * args.repeats < 2:
        parser.error("--steps times --repeats must be at least 2")
    try:
        args.configs = [Config.parse(text) for text in args.configs.split(",")]
    except ValueError as error:
        parser.error(f"--configs: {error}")
    args.impls = args.impls.split(",")
    unknown = [name for name in args.impls if name not in IMPLEMENTATIONS]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; choose from {list(IMPLEMENTATIONS)}")
    if args.profile is not None and args.profile not in args.impls:
        parser.error(f"--profile must be one of --impls {args.impls}, but got {args.profile!r}")
    if FLOOR not in args.impls:
        args.impls.insert(0, FLOOR)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)
    pyro.set_rng_seed(args.seed)
    command = shlex.join(["python", "benchmarks/bench.py", *argv])
    print(f"command: {command}")
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, torchsde {torchsde.__version__}, "
        f"pyro_nsde {pyro_nsde.__version__}, python {platform.python_version()}; "
        f"device {args.device}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"float32, Pyro validation {'on' if args.validate else 'off'}"
    )
    print(f"load average at start: {_load()}")
    context = None if args.no_memory else memory_context()
    rows = []
    for index, config in enumerate(args.configs):
        impls = {name: build(name, config, args.device, args.seed) for name in args.impls}
        if index == 0 and args.sanity_repeats > 0:
            print(f"sanity check at config {config} (loss = -ELBO at the common initialization):")
            print("\n".join(sanity_check(impls, args.sanity_particles, args.sanity_repeats)))
        if index == 0 and args.profile:
            profile_step(impls[args.profile], args.warmup, args.steps, top=25)
        if index == 0 and args.breakdown:
            print(f"where the time of one iteration goes at config {config} (medians):")
            print("\n".join(breakdown(impls, args.warmup, args.steps * args.repeats)))
        samples = time_interleaved(impls, args.device, args.warmup, args.steps, args.repeats)
        floor = statistics.median(samples[FLOOR])
        for name in args.impls:
            q1, median, q3 = statistics.quantiles(samples[name], n=4, method="inclusive")
            memory = None
            if context is not None:
                memory, _ = run_memory(
                    context,
                    name,
                    config,
                    args.device,
                    args.seed,
                    args.threads,
                    args.validate,
                    args.memory_iterations,
                )
            row = dict(K=config.steps, B=config.paths, d=config.dim, name=name)
            row.update(median=median, iqr=q3 - q1, ratio=median / floor, memory=memory)
            rows.append(row)
            print(
                f"  {config}  {name:<24} {median:9.1f} ms  ×{median / floor:.2f}  "
                f"speed-up {_speed_up(median / floor)}  "
                f"peak {'–' if memory is None else f'{memory:.1f} MB'}",
                flush=True,
            )
    print(f"load average at end: {_load()}")
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
