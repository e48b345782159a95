"""Seconds per training step and forecast error of the Lorenz latent SDE: the tutorial's
pyro-nsde model against a torchsde latent SDE written after torchsde's example.

**The data.** ``lorenz_data`` of ``tutorials/lorenz.py`` (Li et al. 2020, section 7.2):
``--series`` series of the stochastic Lorenz system at 100 times on ``[0, 2]``, standardized,
observed with noise 0.01, simulated after ``pyro.set_rng_seed(--seed)`` exactly as the
tutorial does. Both implementations fit the first 75 times (``t ≤ 1.5``) and forecast the
last 25 (``t ∈ (1.5, 2]``).

**The implementations** (run one after the other, each from the random state the tutorial's
model is built from):

- ``pyro-nsde``: the tutorial's model (its ``make_model``: latent size 4, learned ``N(m, s²)``
  initial law, ``DriftNet``, per-coordinate ``DiffusionNet``, ``Linear(4, 3)`` map) and guide
  (``GirsanovGuide`` with a ``GRUEncoder`` and a ``PosteriorDriftControl``), built with the
  tutorial's calls in the tutorial's order, on its grid (steps of at most ``--max-step``,
  0.0102: 2 Euler–Maruyama steps per observation interval, 148 in all, against torchsde's
  150 fixed steps of 0.01), trained with its
  ``SVI`` (``ClippedAdam``, lr 0.01 decaying by 0.997 per step, KL annealed over 1000 steps).
  ``--covariance prior`` is the pure mean shift, what torchsde's ``logqp`` computes (use it to
  compare timings); ``diagonal`` is the tutorial's choice. With ``diagonal`` and the same
  steps this row replays the tutorial's training (same data, initial weights and noise).
- ``pyro-nsde-linear``: the same model with ``GirsanovGuide(control="linear",
  covariance="diagonal")`` and the same encoder, the Gauss–Markov family with full gains
  sampled by a parallel scan (the tutorial's default until 2026-12-07; ``--covariance`` does
  not apply).
- ``pyro-nsde-diagonal``: the same with diagonal gains (``gain="diagonal"``, the tutorial's
  default ``--guide linear`` now), and with ``--subsample R`` trained on ``R`` steps per path
  (``subsample_steps``).
- ``torchsde``: our own code mirroring torchsde's ``examples/latent_sde_lorenz.py``: a GRU
  run backward over the observations and a linear map give a context per observation time;
  ``q(z_0)`` is a Gaussian from the first context, ``p(z_0)`` a learned Gaussian; the
  posterior drift ``f(z, c)`` is an MLP of ``(z, c)`` with the context of the first
  observation time after ``t``, the prior drift ``h(z)`` an MLP, the diffusion a sigmoid MLP
  per coordinate (Softplus activations, width ``--hidden``), ``Linear(4, 3)`` maps to the
  data; ``torchsde.sdeint(..., method="euler", dt=0.01, logqp=True)`` (150 fixed steps on
  ``[0, 1.5]``, the states at the observation times interpolated linearly), loss
  ``mean_n(-log p(y | z) + β KL)`` with ``torch.optim.Adam`` (lr 0.01) and ``ExponentialLR``
  (0.997), ``β`` linear over 1000 steps (the printed loss is per series here, summed over
  them in pyro-nsde). Like the example it lets ``sdeint`` make its own ``BrownianInterval``
  (no ``dt`` hint); ``--torchsde-bm sized`` passes one sized with ``dt``.

**Same wall time.** ``--minutes M`` stops each implementation's training once its steps
took ``M`` minutes (``--steps`` is then the most), for comparisons at equal cost.

**What is reported.** The wall time of every training step (``time.perf_counter``), and the
median and interquartile range over the steps after ``--warmup``; the ELBO (``β = 1``,
summed over the series, mean of 2 draws: the tutorial's ``full_elbo`` for pyro-nsde) before
and after training; the forecast protocol of the tutorial: ``--draws`` posterior states at
``t = 1.5`` of each series, continued with the learned prior SDE by torchsde's SRK at
``dt = 0.005`` on ``times[74:]`` (pyro-nsde: the tutorial's ``forecast_paths``; torchsde: the
posterior SDE with the series' context on ``[0, 1.5]``, then ``sdeint(names={"drift": "h"},
method="srk")``),
mapped to the data; the RMSE of the mean forecast against the held-out observations, the
share of them inside the 5–95 % band of the draws (of a calibrated forecast's outcomes the
band of 256 draws holds 89 % on average, of 32 draws 85 %: the order statistics), and the RMSE
of carrying the last observation forward. Pyro validation is off, as for any timing. The table
is printed and the numbers written to ``--out``/``lorenz_latent_sde.json``.

Run (one implementation after the other, or one process per implementation with
``--impls``; at full size a training step takes a few seconds, so 100 steps take several
minutes each; results in ``docs/neural_sdes.md``)::

    OMP_NUM_THREADS=1 python benchmarks/lorenz_latent_sde.py --covariance prior --steps 100 \\
        --out benchmark_outputs
    python benchmarks/lorenz_latent_sde.py --quick --out /tmp/lorenz_bench   # a smoke run
"""

import argparse
import importlib.util
import itertools
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from types import ModuleType

import pyro
import torch
import torchsde
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.distributions import Normal, kl_divergence

import pyro_nsde
from pyro_nsde import GirsanovGuide
from pyro_nsde.sde.sites import unwrap_path_distribution
from pyro_nsde.sde.subsample import SubsampledEulerMaruyama
from pyro_nsde.zoo.encoders import GRUEncoder
from pyro_nsde.zoo.nn import DiffusionNet, DriftNet, PosteriorDriftControl
from pyro_nsde.zoo.series import GriddedSeries

TUTORIAL = pathlib.Path(__file__).resolve().parents[1] / "tutorials" / "lorenz.py"
LEARNING_RATE, LR_DECAY = 0.01, 0.997
TORCHSDE_DT = 1e-2  # torchsde's example: sdeint(..., dt=1e-2)
FORECAST_DT = 0.005  # the tutorial's forecast: SRK at dt = 0.005
FORECAST_CHUNK = 32  # draws per guide call in a forecast (the tutorial's `draws`)
ELBO_DRAWS = 2  # the tutorial's full_elbo(num_particles=2)


def load_tutorial() -> ModuleType:
    """``tutorials/lorenz.py`` as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("lorenz_tutorial", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LORENZ = load_tutorial()
OBS_DIM = 3


@dataclass
class Problem:
    """The common data: ``times`` ``(100,)``, ``y`` ``(N, 100, 3)``, and the settings."""

    times: torch.Tensor
    y: torch.Tensor
    hidden: int
    context: int
    covariance: str
    max_step: float
    torchsde_bm: str
    subsample: int | None = None

    @property
    def fit_times(self) -> torch.Tensor:
        return self.times[: LORENZ.TRAIN_TIMES]

    @property
    def fit_y(self) -> torch.Tensor:
        return self.y[:, : LORENZ.TRAIN_TIMES]

    @property
    def future_times(self) -> torch.Tensor:
        """The forecast times, from the last fitted one (``t = 1.5``) on."""
        return self.times[LORENZ.TRAIN_TIMES - 1 :]


class PyroNSDE:
    """The tutorial's model, guide and SVI, built with its calls in its order."""

    def __init__(self, problem: Problem):
        series, hidden = problem.y.shape[0], problem.hidden
        self.data = GriddedSeries.from_series(
            [problem.fit_times] * series, list(problem.fit_y), max_step=problem.max_step
        )
        self.modules = {
            "drift": DriftNet(LORENZ.LATENT, (hidden, hidden), time_frequencies=()),
            "diffusion": DiffusionNet(LORENZ.LATENT, hidden_dims=(hidden,)),
            "projector": nn.Linear(LORENZ.LATENT, OBS_DIM),
        }
        self.model = LORENZ.make_model(self.modules, series)
        self.guide = self.make_guide(problem)
        optim = pyro.optim.ClippedAdam({"lr": LEARNING_RATE, "lrd": LR_DECAY})
        self.svi = SVI(self.training_model(problem), self.annealed_guide, optim, Trace_ELBO())
        self.solver_steps = self.data.num_steps

    def make_guide(self, problem: Problem) -> GirsanovGuide:
        """The tutorial's ``--guide sequential``: a ``PosteriorDriftControl``."""
        hidden, context = problem.hidden, problem.context
        control = PosteriorDriftControl(
            self.modules["drift"],
            self.modules["diffusion"],
            LORENZ.LATENT,
            context,
            (hidden, hidden),
            covariance=problem.covariance,
        )
        return GirsanovGuide(
            self.model, control=control, encoder=GRUEncoder(OBS_DIM, context, hidden)
        )

    def training_model(self, problem: Problem):
        """The model SVI trains against."""
        return self.model

    def annealed_guide(self, data: GriddedSeries, kl_scale: float = 1.0):
        with poutine.scale(scale=kl_scale):
            return self.guide(data, kl_scale)

    def step(self, kl_scale: float) -> float:
        return self.svi.step(self.data, kl_scale)

    def elbo(self) -> float:
        return LORENZ.full_elbo(self.model, self.guide, self.data, num_particles=ELBO_DRAWS)

    def forecast(self, times: torch.Tensor, draws: int) -> torch.Tensor:
        """``(draws, N, T, 3)`` forecasts on ``times``, as the tutorial makes them (in chunks
        of at most ``FORECAST_CHUNK`` draws)."""
        with torch.no_grad():
            z = LORENZ.forecast_paths(
                self.model, self.guide, self.data, times, draws, chunk=FORECAST_CHUNK
            )
            return self.modules["projector"](z)


class PyroNSDELinear(PyroNSDE):
    """The Gauss–Markov family with full gains (``control="linear"``, diagonal step scale),
    its coefficients from the same encoder: the tutorial's default until 2026-12-07."""

    def make_guide(self, problem: Problem) -> GirsanovGuide:
        encoder = GRUEncoder(OBS_DIM, problem.context, problem.hidden)
        return GirsanovGuide(self.model, control="linear", covariance="diagonal", encoder=encoder)


class PyroNSDEDiagonal(PyroNSDE):
    """The Gauss–Markov family with diagonal gains (``gain="diagonal"``): ``3 × latent``
    coefficients a step from the encoder instead of ``latent² + 2 latent`` (the tutorial's
    default ``--guide linear``)."""

    def make_guide(self, problem: Problem) -> GirsanovGuide:
        encoder = GRUEncoder(OBS_DIM, problem.context, problem.hidden)
        return GirsanovGuide(
            self.model,
            control="linear",
            gain="diagonal",
            covariance="diagonal",
            encoder=encoder,
            subsample_steps=problem.subsample,
        )

    def training_model(self, problem: Problem):
        """The model with its paths' steps subsampled (``--subsample``)."""
        if problem.subsample is None:
            return self.model
        return pyro_nsde.subsample_steps(self.model, problem.subsample)


def mlp(sizes: tuple, last: type[nn.Module] | None = None) -> nn.Sequential:
    """Linear layers of the given sizes with Softplus between them (and ``last()`` after)."""
    layers = []
    for k, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if k > 0:
            layers.append(nn.Softplus())
        layers.append(nn.Linear(fan_in, fan_out))
    if last is not None:
        layers.append(last())
    return nn.Sequential(*layers)


class LatentSDE(nn.Module):
    """The latent SDE of torchsde's Lorenz example, for ``torchsde.sdeint``.

    ``f`` (posterior drift) reads the context set by :meth:`encode`; ``h`` is the prior drift
    and ``g`` the diagonal diffusion shared by both. States are ``(N, latent)``.
    """

    sde_type = "ito"
    noise_type = "diagonal"

    def __init__(self, latent: int, context: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(OBS_DIM, hidden)
        self.context_out = nn.Linear(hidden, context)
        self.qz0_net = nn.Linear(context, 2 * latent)
        self.f_net = mlp((latent + context, hidden, hidden, latent))
        self.h_net = mlp((latent, hidden, hidden, latent))
        self.g_nets = nn.ModuleList(mlp((1, hidden, 1), nn.Sigmoid) for _ in range(latent))
        self.projector = nn.Linear(latent, OBS_DIM)
        self.pz0_loc = nn.Parameter(torch.zeros(latent))
        self.pz0_log_scale = nn.Parameter(torch.zeros(latent))
        self._times = self._context = None

    def encode(self, ys: torch.Tensor, times: torch.Tensor) -> Normal:
        """Set the context of ``ys`` ``(T, N, 3)`` at ``times`` and return ``q(z_0)``."""
        states, _ = self.gru(ys.flip(0))
        self._times, self._context = times, self.context_out(states).flip(0)
        loc, log_scale = self.qz0_net(self._context[0]).chunk(2, dim=-1)
        return Normal(loc, log_scale.exp())

    def f(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # As the example: search the times at every call and index the context there.
        index = torch.searchsorted(self._times, t, right=True).clamp(max=len(self._times) - 1)
        return self.f_net(torch.cat([z, self._context[index]], dim=-1))

    def h(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.h_net(z)

    def g(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        columns = z.split(1, dim=-1)
        return torch.cat([net(z_i) for net, z_i in zip(self.g_nets, columns, strict=True)], -1)


def brownian(times: torch.Tensor, size: tuple, dt: float, levy: str) -> torchsde.BrownianInterval:
    """A ``BrownianInterval`` over ``times`` sized with the step ``dt``, seeded from torch."""
    return torchsde.BrownianInterval(
        t0=float(times[0]),
        t1=float(times[-1]),
        size=size,
        dtype=times.dtype,
        dt=dt,
        levy_area_approximation=levy,
        entropy=int(torch.randint(2**31 - 1, ())),
    )


def fixed_steps(times: torch.Tensor, dt: float) -> int:
    """The number of steps torchsde's fixed-step solvers take from ``times[0]`` to
    ``times[-1]`` (``t ← min(t + dt, times[-1])`` in the times' dtype)."""
    t, end, count = times[0], times[-1], 0
    while t < end:
        t, count = torch.minimum(t + dt, end), count + 1
    return count


class TorchSDE:
    """Our torchsde latent SDE, trained as torchsde's example trains it, on the same split."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.sde = LatentSDE(LORENZ.LATENT, problem.context, problem.hidden)
        self.ys = problem.fit_y.transpose(0, 1)  # time-major (T, N, 3), as torchsde's
        self.optim = torch.optim.Adam(self.sde.parameters(), lr=LEARNING_RATE)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optim, gamma=LR_DECAY)
        self.solver_steps = fixed_steps(problem.fit_times, TORCHSDE_DT)

    def log_likelihood_and_kl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per series ``(N,)``: ``log p(y | z)`` and ``KL(q(z_0) | p(z_0)) + KL(path)``."""
        times = self.problem.fit_times
        qz0 = self.sde.encode(self.ys, times)
        z0 = qz0.rsample()
        # The example passes no bm, so sdeint makes a BrownianInterval without the dt hint;
        # at full size one sized with dt is faster (2.3 against 2.7 s per step here), so it
        # does not mirror the example's speed and is an option only. Its size has one more
        # column: logqp adds the KL as a state of zero diffusion.
        bm = None
        if self.problem.torchsde_bm == "sized":
            bm = brownian(times, (z0.shape[0], z0.shape[1] + 1), TORCHSDE_DT, "none")
        zs, log_ratio = torchsde.sdeint(
            self.sde, z0, times, bm=bm, method="euler", dt=TORCHSDE_DT, logqp=True
        )
        log_px = Normal(self.sde.projector(zs), LORENZ.NOISE).log_prob(self.ys).sum((0, 2))
        pz0 = Normal(self.sde.pz0_loc, self.sde.pz0_log_scale.exp())
        return log_px, kl_divergence(qz0, pz0).sum(-1) + log_ratio.sum(0)

    def step(self, kl_scale: float) -> float:
        self.optim.zero_grad()
        log_px, kl = self.log_likelihood_and_kl()
        loss = (kl_scale * kl - log_px).mean()
        loss.backward()
        self.optim.step()
        self.scheduler.step()
        return loss.item()

    def elbo(self) -> float:
        """The ELBO summed over the series (as Pyro's), mean of ``ELBO_DRAWS`` draws."""
        totals = []
        with torch.no_grad():
            for _ in range(ELBO_DRAWS):
                log_px, kl = self.log_likelihood_and_kl()
                totals.append((log_px - kl).sum().item())
        return statistics.fmean(totals)

    def forecast(self, times: torch.Tensor, draws: int) -> torch.Tensor:
        """``(draws, N, T, 3)``: posterior states at ``times[0]`` (Euler, as in training),
        continued with the prior SDE ``(h, g)`` by SRK on ``times``."""
        fit_times = self.problem.fit_times
        paths = []
        with torch.no_grad():
            qz0 = self.sde.encode(self.ys, fit_times)
            for _ in range(draws):
                z0 = qz0.sample()
                bm = brownian(fit_times, tuple(z0.shape), TORCHSDE_DT, "none")
                posterior = torchsde.sdeint(
                    self.sde, z0, fit_times, bm=bm, method="euler", dt=TORCHSDE_DT
                )
                bm = brownian(times, tuple(z0.shape), FORECAST_DT, "space-time")
                future = torchsde.sdeint(
                    self.sde,
                    posterior[-1],
                    times,
                    bm=bm,
                    method="srk",
                    dt=FORECAST_DT,
                    names={"drift": "h"},
                )
                paths.append(self.sde.projector(future).transpose(0, 1))
        return torch.stack(paths)


IMPLEMENTATIONS = {
    "pyro-nsde": PyroNSDE,
    "pyro-nsde-linear": PyroNSDELinear,
    "pyro-nsde-diagonal": PyroNSDEDiagonal,
    "torchsde": TorchSDE,
}


def forecast_scores(future: torch.Tensor, y: torch.Tensor) -> dict:
    """The tutorial's scores (``forecast_scores``) of forecast latent paths mapped to the data
    ``(S, N, T, 3)`` on ``times[74:]`` against the held-out ``y[:, 75:]``, with the
    observation noise added (a band for a future data point); ``coverage_latent`` is the
    share inside the band of the noise-free paths (what this table reported until
    2026-12-08)."""
    held_out, ahead = y[:, LORENZ.TRAIN_TIMES :], future[:, :, 1:]
    scores = LORENZ.forecast_scores(LORENZ.observe(ahead), held_out)
    scores["coverage_latent"] = LORENZ.forecast_scores(ahead, held_out)["coverage"]
    return scores


def run(name: str, problem: Problem, args: argparse.Namespace, rng: torch.Tensor) -> dict:
    """Build, train and score one implementation from the torch random state ``rng``."""
    pyro.clear_param_store()
    torch.set_rng_state(rng)
    impl = IMPLEMENTATIONS[name](problem)
    elbo_start = impl.elbo()
    seconds, losses = [], []
    every = max(1, args.steps // 10)
    for step in range(args.steps):
        kl_scale = min(1.0, (step + 1) / args.anneal)
        start = time.perf_counter()
        losses.append(impl.step(kl_scale))
        seconds.append(time.perf_counter() - start)
        out_of_time = args.minutes is not None and sum(seconds) > 60 * args.minutes
        if step % every == 0 or step == args.steps - 1 or out_of_time:
            print(
                f"  {name} step {step:4d}  annealed loss {losses[-1]:12.1f}  "
                f"KL weight {kl_scale:.3f}  {seconds[-1]:.2f} s",
                flush=True,
            )
        if out_of_time:
            break
    elbo_end = impl.elbo()
    estimator_sd = None
    if args.estimator_sd and isinstance(impl, PyroNSDE):
        estimator_sd = subsampled_sd(impl, args.estimator_sd)
        print(f"  {name}: sd of log p(paths) estimates {estimator_sd}", flush=True)
    scores = forecast_scores(impl.forecast(problem.future_times, args.draws), problem.y)
    rmse, coverage = scores["rmse"], scores["coverage"]
    timed = seconds[args.warmup :] or seconds  # a budget may stop within the warm-up
    quartiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    q1, median, q3 = torch.tensor(timed, dtype=torch.float64).quantile(quartiles).tolist()
    result = dict(
        training_steps=len(seconds),
        training_seconds=sum(seconds),
        solver_steps=impl.solver_steps,
        seconds_per_step=median,
        seconds_iqr=q3 - q1,
        step_seconds=seconds,
        annealed_losses=losses,
        elbo_start=elbo_start,
        elbo_end=elbo_end,
        forecast_rmse=rmse,
        forecast_90_coverage=coverage,
        forecast_90_coverage_latent=scores["coverage_latent"],
        forecast_90_coverage_by_time=scores["coverage_by_time"],
        estimator_sd=estimator_sd,
    )
    print(
        f"  {name}: {median:.3f} s/step (median of {len(timed)}), ELBO {elbo_start:.4g} -> "
        f"{elbo_end:.4g}, forecast RMSE {rmse:.3f}, 90 % coverage {coverage:.2f} "
        f"(of the noise-free paths' band {scores['coverage_latent']:.2f})",
        flush=True,
    )
    return result


def subsampled_sd(impl, draws, repeats: int = 100, guide_draws: int = 10) -> dict:
    """At the trained model: the sd of ``subsample_steps``' estimate of ``log p(paths)``
    (summed over the series) of one draw of the guide, per ``R``, against the sd over
    ``guide_draws`` draws of the exact ``log p(paths) - log q(paths)`` (the noise the ELBO
    of one draw has anyway)."""
    result = {}
    with torch.no_grad():
        ratios = []
        for _ in range(guide_draws):
            guide_trace = poutine.trace(impl.guide).get_trace(impl.data)
            replayed = poutine.replay(impl.model, trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(impl.data)
            path = guide_trace.nodes["z"]["value"]
            law, _ = unwrap_path_distribution(model_trace.nodes["z"]["fn"])
            lq = guide_trace.nodes["z"]["fn"].log_prob(path).sum()
            ratios.append(float(law.log_prob(path).sum() - lq))
        result["log p - log q, over guide draws"] = statistics.stdev(ratios)
        for num in draws:
            sub = SubsampledEulerMaruyama(law, num)
            values = [float(sub.log_prob(path).sum()) for _ in range(repeats)]
            result[f"R = {num}"] = statistics.stdev(values)
    return result


def label(name: str, args: argparse.Namespace) -> str:
    if name == "pyro-nsde":
        return f"pyro-nsde (covariance={args.covariance}, max_step={args.max_step:g})"
    if name == "pyro-nsde-linear":
        return f"pyro-nsde control='linear' (covariance=diagonal, max_step={args.max_step:g})"
    if name == "pyro-nsde-diagonal":
        steps = "" if args.subsample is None else f", subsample_steps={args.subsample}"
        return (
            f"pyro-nsde control='linear', gain='diagonal' (covariance=diagonal{steps}, "
            f"max_step={args.max_step:g})"
        )
    return f"torchsde ({args.torchsde_bm} BrownianInterval, dt={TORCHSDE_DT:g})"


def format_table(results: dict, args: argparse.Namespace, persistence: float) -> str:
    lines = [
        "| implementation | solver steps | training steps (s) | s / step (median) | IQR s "
        "| ELBO start | ELBO end | forecast RMSE | 90 % coverage |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {label(name, args)} | {r['solver_steps']} | {r['training_steps']} "
            f"({r['training_seconds']:.0f}) | {r['seconds_per_step']:.3f} "
            f"| {r['seconds_iqr']:.3f} | {r['elbo_start']:.4g} | {r['elbo_end']:.4g} "
            f"| {r['forecast_rmse']:.3f} | {r['forecast_90_coverage']:.2f} |"
        )
    lines.append(
        f"| last observation carried forward | – | – | – | – | – | – | {persistence:.3f} | – |"
    )
    return "\n".join(lines)


def load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where unavailable)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


QUICK = dict(
    series=32,
    hidden=16,
    context=8,
    steps=3,
    warmup=1,
    draws=4,
    anneal=LORENZ.SETTINGS[True]["anneal"],
    max_step=LORENZ.SETTINGS[True]["max_step"],
    data_dt=LORENZ.SETTINGS[True]["data_dt"],
)
DEFAULTS = dict(
    series=LORENZ.SETTINGS[False]["series"],
    hidden=LORENZ.SETTINGS[False]["hidden"],
    context=LORENZ.SETTINGS[False]["context"],
    steps=100,
    warmup=2,
    draws=LORENZ.SETTINGS[False]["forecast_draws"],
    anneal=LORENZ.SETTINGS[False]["anneal"],
    max_step=LORENZ.SETTINGS[False]["max_step"],
    data_dt=LORENZ.SETTINGS[False]["data_dt"],
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="comma-separated")
    parser.add_argument("--steps", type=int, help="training steps per implementation (100)")
    parser.add_argument(
        "--minutes",
        type=float,
        help="stop training an implementation once its steps took this long (same wall time "
        "for all; --steps is then the most)",
    )
    parser.add_argument("--warmup", type=int, help="steps left out of the median (2)")
    parser.add_argument("--series", type=int, help="number of series (1024)")
    parser.add_argument("--hidden", type=int, help="hidden width (128)")
    parser.add_argument("--context", type=int, help="context size (64)")
    parser.add_argument("--draws", type=int, help="forecast draws per series (256)")
    parser.add_argument("--anneal", type=int, help="steps of the linear KL annealing (1000)")
    parser.add_argument("--max-step", type=float, help="pyro-nsde grid step bound (0.0102)")
    parser.add_argument("--data-dt", type=float, help="SRK step of the data simulation (1e-3)")
    parser.add_argument(
        "--covariance", default="prior", choices=("prior", "diagonal"), help="pyro-nsde guide"
    )
    parser.add_argument(
        "--torchsde-bm",
        default="default",
        choices=("default", "sized"),
        help="sdeint's own BrownianInterval, as the example (default), or one sized with dt",
    )
    parser.add_argument(
        "--subsample",
        type=int,
        help="train pyro-nsde-diagonal on this many steps per path (subsample_steps)",
    )
    parser.add_argument(
        "--estimator-sd",
        type=int,
        nargs="+",
        metavar="R",
        help="after training, the sd of subsample_steps' estimate of log p(paths) per R",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmark_outputs"))
    parser.add_argument("--quick", action="store_true", help=f"smoke run: defaults {QUICK}")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.impls = args.impls.split(",")
    unknown = [name for name in args.impls if name not in IMPLEMENTATIONS]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; choose from {list(IMPLEMENTATIONS)}")
    if not 0 <= args.warmup < args.steps:
        parser.error("need 0 <= --warmup < --steps")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    print(f"command: {shlex.join(['python', 'benchmarks/lorenz_latent_sde.py', *argv])}")
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, torchsde {torchsde.__version__}, "
        f"pyro_nsde {pyro_nsde.__version__}, python {platform.python_version()}; "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, float32"
    )
    load_start = load()
    print(f"load average at start: {load_start}", flush=True)
    pyro.set_rng_seed(args.seed)
    times, y = LORENZ.lorenz_data(args.series, args.data_dt)
    rng = torch.get_rng_state()  # where the tutorial builds its model
    problem = Problem(
        times,
        y,
        args.hidden,
        args.context,
        args.covariance,
        args.max_step,
        args.torchsde_bm,
        args.subsample,
    )
    results = {name: run(name, problem, args, rng) for name in args.impls}
    persistence = LORENZ.persistence_rmse(y)
    load_end = load()
    print(f"load average at end: {load_end}")
    print()
    budget = "" if args.minutes is None else f" or {args.minutes:g} minutes"
    print(
        f"{args.series} series, latent {LORENZ.LATENT}, hidden {args.hidden}, context "
        f"{args.context}, fitted on t <= 1.5 ({LORENZ.TRAIN_TIMES} times), at most "
        f"{args.steps} steps{budget} (median after {args.warmup}), forecast of (1.5, 2] from "
        f"{args.draws} draws"
    )
    print(format_table(results, args, persistence))
    summary = dict(
        command=argv,
        versions=dict(
            torch=torch.__version__,
            pyro=pyro.__version__,
            torchsde=torchsde.__version__,
            pyro_nsde=pyro_nsde.__version__,
        ),
        threads=torch.get_num_threads(),
        load_start=load_start,
        load_end=load_end,
        settings={k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        persistence_rmse=persistence,
        results=results,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "lorenz_latent_sde.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
