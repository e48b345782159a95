"""The three problems on which the variational posterior is compared with NUTS.

Each is built exactly as the command line builds it, so that NUTS samples the very model that
``python -m pyro_nsde demo`` and ``pyro-nsde fit`` fit:

- ``lv``: the demo, :class:`~pyro_nsde.zoo.models.LotkaVolterra` on the lynx–hare pelts 1900–1920,
  years since 1900, ``x_0`` centred on the log of the first row, 5 Euler–Maruyama steps a year
  (100 steps, 8 parameters and a ``(101, 2)`` path);
- ``ou``: ``pyro-nsde fit nile40.csv --time year --model ou``, the first 40 values of the Nile's
  annual flow (1871–1910) standardized as ``pyro_nsde.app.cli._standardize`` does (column to mean 0
  and scale 1, time in median gaps from the first row), :class:`~pyro_nsde.zoo.models.
  OrnsteinUhlenbeck` with 4 steps per gap (156 steps, 4 parameters, a ``(157, 1)`` path);
- ``lv_short``: the demo's model on the lynx–hare pelts 1900–1910 (11 years, 50 steps), small
  enough for a slow test.

For NUTS the same posteriors are also written in better-sampled forms (reference problems):
``ou_exact`` integrates the path out exactly (:class:`OrnsteinUhlenbeckMarginal`);
``lv_bridge`` and ``lv_short_bridge`` sample the path between observations as Brownian-bridge
deviations (:class:`BridgedPath`). :func:`provenance` records what was measured.
"""

import csv
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

import pyro_nsde
from pyro_nsde.app import cli
from pyro_nsde.zoo.datasets import TimeSeries, lynx_hare, read_csv
from pyro_nsde.zoo.models import LatentSDEModel, LotkaVolterra, OrnsteinUhlenbeck

DATA = Path(__file__).resolve().parents[1] / "data"

#: The Nile rows of the ``ou`` problem (1871–1910) and the lynx–hare rows of ``lv_short``.
NILE_ROWS = 40
SHORT_LV_ROWS = 11

PROBLEMS = ("lv", "ou", "lv_short")

#: Reference-only problems: the same posteriors, reparameterized or with the path integrated out.
REFERENCE_PROBLEMS = (*PROBLEMS, "ou_exact", "lv_bridge", "lv_short_bridge")


@dataclass
class Problem:
    """A model and its observations ``y`` (``(N, D)``), as the command line builds them.

    :param path_sites: the latent sites that make up the path (summarized by their worst ESS
        and R-hat only).
    :param init_values: initial values of some latent sites for NUTS (others: their median).
    """

    name: str
    description: str
    model: LatentSDEModel
    y: torch.Tensor
    path_sites: tuple[str, ...] = ("x",)
    init_values: dict | None = None


def lynx_hare_rows(rows: int | None = None, dtype: torch.dtype | None = None) -> TimeSeries:
    """The packaged lynx–hare series, its first ``rows`` rows (all if ``None``)."""
    data = lynx_hare(dtype=dtype)
    if rows is None:
        return data
    return TimeSeries(data.times[:rows], data.values[:rows], data.columns, data.time_name)


def write_nile_csv(path: Path, rows: int = NILE_ROWS) -> Path:
    """Write the first ``rows`` rows of ``benchmarks/data/nile.csv`` (header kept) to ``path``."""
    with open(DATA / "nile.csv", newline="") as source:
        lines = list(csv.reader(source))
    with open(path, "w", newline="") as target:
        csv.writer(target).writerows(lines[: rows + 1])
    return path


def build(name: str, dtype: torch.dtype = torch.float64) -> Problem:
    """The problem ``name`` (one of :data:`REFERENCE_PROBLEMS`) in ``dtype``."""
    if name == "ou_exact":
        problem = build("ou", dtype)
        description = f"{problem.description}, path integrated out exactly"
        marginal = OrnsteinUhlenbeckMarginal(problem.model)
        return Problem(name, description, marginal, problem.y, path_sites=())
    if name in ("lv_bridge", "lv_short_bridge"):
        problem = build(name.removesuffix("_bridge"), dtype)
        description = f"{problem.description}, path between observations as bridges"
        bridged = BridgedPath(problem.model, problem.y)
        sites = (bridged.obs_site, bridged.bridge_site)
        # The observations' log: the states at the observation times start on the data.
        init = {bridged.obs_site: problem.y.log()}
        return Problem(name, description, bridged, problem.y, sites, init)
    if name in ("lv", "lv_short"):
        # As cli.run_demo: years since the first row, x_0 centred on the first log-counts.
        data = lynx_hare_rows(None if name == "lv" else SHORT_LV_ROWS, dtype)
        years = data.times - data.times[0]
        model = LotkaVolterra(years, data.values[0].log(), steps_per_unit=5.0)
        span = f"{data.times[0]:.0f}-{data.times[-1]:.0f}"
        description = f"LotkaVolterra on lynx-hare {span}, 5 steps/year"
        return Problem(name, description, model, data.values)
    if name == "ou":
        # As cli.run_fit: read in float64, standardize, 4 steps per median gap.
        series = read_csv(DATA / "nile.csv", time="year", dtype=torch.float64)
        series = TimeSeries(
            series.times[:NILE_ROWS], series.values[:NILE_ROWS], series.columns, series.time_name
        )
        scaled, _, _ = cli._standardize(series, dtype)
        model = OrnsteinUhlenbeck(scaled.times, 1, steps_per_unit=4.0)
        description = f"OrnsteinUhlenbeck on the Nile flow 1871-{1870 + NILE_ROWS}, standardized"
        return Problem(name, description, model, scaled.values)
    raise ValueError(f"problem must be one of {REFERENCE_PROBLEMS}, but got {name!r}")


class OrnsteinUhlenbeckMarginal:
    r"""A one-series :class:`~pyro_nsde.zoo.models.OrnsteinUhlenbeck` model with its Euler–Maruyama
    path integrated out: the same priors (``model.sample_parameters``), and the observations'
    exact Gaussian marginal ``y ~ N(m, C + τ² I)`` of the discretized model.

    On a uniform grid of step ``h`` the chain ``x_{k+1} = a x_k + h θ μ + σ sqrt(h) ξ_k``,
    ``a = 1 - h θ``, from ``x_0 ~ N(m_0, v_0)`` has ``E x_k = μ + a^k (m_0 - μ)``,
    ``Var x_k = a^{2k} v_0 + σ² h (1 - a^{2k}) / (1 - a²)`` and
    ``Cov(x_j, x_k) = a^{k-j} Var x_j`` for ``j <= k``; ``m`` and ``C`` are these at the
    observation steps. NUTS then samples the four parameters alone (no path, no funnel), the
    same posterior marginal as on all latents.
    """

    def __init__(self, model: OrnsteinUhlenbeck):
        steps = model.times.diff()
        if model.obs_dim != 1 or not torch.allclose(steps, steps[0]):
            raise ValueError("OrnsteinUhlenbeckMarginal needs one series on a uniform grid")
        self.model, self.times, self.step = model, model.times, steps[0]
        self.obs_steps = model.obs_index.to(model.times.dtype)
        init = model.init({}).base_dist  # x_0's law does not depend on the parameters
        self.init_loc, self.init_var = init.loc[0], init.scale[0] ** 2

    def moments(self, theta: torch.Tensor, sigma: torch.Tensor):
        """The law of the states at the observation steps given ``θ``, ``σ`` (any batch shape,
        broadcast together): ``(offset, slope, cov)``, the mean being ``offset + μ slope``
        ``(..., N)`` and the covariance ``cov`` ``(..., N, N)``."""
        h, k = self.step, self.obs_steps
        a = (1 - h * theta)[..., None]
        decay, decay2 = a**k, a ** (2 * k)
        var = decay2 * self.init_var + (sigma**2)[..., None] * h * (1 - decay2) / (1 - a**2)
        rows = torch.arange(k.shape[0])
        earlier = torch.minimum(rows[:, None], rows[None, :])
        lag = (k[:, None] - k[None, :]).abs()
        cov = a[..., None] ** lag * var[..., earlier]
        return decay * self.init_loc, 1 - decay, cov

    def __call__(self, y: torch.Tensor) -> None:
        params = self.model.sample_parameters(pyro.plate("series", 1, dim=-1))
        theta, mu, sigma, tau = (
            params[name][0] for name in ("theta", "mu", "sigma_process", "sigma_obs")
        )
        offset, slope, cov = self.moments(theta, sigma)
        noise = tau**2 * torch.eye(cov.shape[-1], dtype=cov.dtype)
        pyro.sample("y", dist.MultivariateNormal(offset + mu * slope, cov + noise), obs=y[:, 0])


class BridgedPath:
    r"""A :class:`~pyro_nsde.zoo.models.LatentSDEModel` with its path reparameterized for NUTS.

    The states at the ``N`` observation times, ``x_obs`` ``(N, d)``, are latent sites of their
    own; the ``M`` states between two consecutive observation times ``t_{k_n} < t_k <
    t_{k_{n+1}}`` are a straight line between them plus a scaled Brownian bridge,

        ``x_k = (1 - w_k) x_{k_n} + w_k x_{k_{n+1}} + σ ⊙ (L_n b_n)_k``,
        ``w_k = (t_k - t_{k_n}) / (t_{k_{n+1}} - t_{k_n})``,

    with ``L_n`` the Cholesky factor of the bridge covariance ``min(s_i, s_j) - s_i s_j / T`` of
    the gap's interior times ``s`` (from ``t_{k_n}``, gap ``T``) and ``b`` ``(M, d)`` the site
    ``"x_bridge"``. The map from ``(x_obs, b)`` to the path is one-to-one with Jacobian
    determinant ``∏_i σ_i^M · const``, so the density of ``(x_obs, b)`` is the model's path density
    times ``∏_i σ_i^M``: the same posterior. Given ``x_obs``, ``b`` is a priori near ``N(0, I)``
    whatever ``σ``, which removes most of the funnel between ``σ`` and the states of the centred
    path (``x_obs`` stays centred, where the observations pin it).

    Both sites are drawn from a standard normal whose density is divided out again (a
    ``pyro.factor`` holds the rest): this only gives NUTS a proper prototype and initial values.

    :param model: the model (diagonal diffusion ``model.diffusion``).
    :param torch.Tensor y: ``(N, D)`` observations, all present.
    """

    obs_site, bridge_site = "x_obs", "x_bridge"

    def __init__(self, model: LatentSDEModel, y: torch.Tensor):
        if torch.isnan(y).any():
            raise ValueError("BridgedPath needs every observation present")
        times, obs = model.times, model.obs_index
        interior = torch.ones(times.shape[0], dtype=torch.bool)
        interior[obs] = False
        inside = interior.nonzero().squeeze(-1)
        left = torch.searchsorted(obs, inside) - 1
        start, stop = times[obs[left]], times[obs[left + 1]]
        blocks = []
        for n in range(obs.shape[0] - 1):
            s = times[obs[n] + 1 : obs[n + 1]] - times[obs[n]]
            gap = times[obs[n + 1]] - times[obs[n]]
            blocks.append(torch.minimum(s[:, None], s[None, :]) - s[:, None] * s[None, :] / gap)
        self.model, self.times = model, times
        self.left, self.weight = left, ((times[inside] - start) / (stop - start))[:, None]
        self.bridge = torch.linalg.cholesky(torch.block_diag(*blocks))
        self.order = torch.argsort(torch.cat([obs, inside]))
        self.shapes = {
            self.obs_site: (obs.shape[0], model.state_dim),
            self.bridge_site: (inside.shape[0], model.state_dim),
        }

    def __call__(self, y: torch.Tensor) -> None:
        model = self.model
        series = pyro.plate("series", model.obs_dim, dim=-1)
        params = model.sample_parameters(series)
        sigma = model.diffusion(params)
        base = {
            name: dist.Normal(self.times.new_zeros(shape), 1.0).to_event(2)
            for name, shape in self.shapes.items()
        }
        x_obs = pyro.sample(self.obs_site, base[self.obs_site])
        b = pyro.sample(self.bridge_site, base[self.bridge_site])
        w, left = self.weight, self.left
        inside = (1 - w) * x_obs[left] + w * x_obs[left + 1] + sigma * (self.bridge @ b)
        path = torch.cat([x_obs, inside])[self.order]
        log_jacobian = b.shape[0] * sigma.log().sum()
        base_log_prob = sum(
            base[name].log_prob(v) for name, v in ((self.obs_site, x_obs), (self.bridge_site, b))
        )
        pyro.factor("x", model.path_law(params).log_prob(path) + log_jacobian - base_log_prob)
        with pyro.plate("obs_time", x_obs.shape[0], dim=-2), series:
            pyro.sample("y", model.likelihood(x_obs, params), obs=y)


def parse_problems(text: str, choices: tuple[str, ...] = PROBLEMS) -> list[str]:
    """``"lv,ou"`` → ``["lv", "ou"]``, checked against ``choices``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise ValueError(f"--problems must be a comma-separated subset of {choices}: {text!r}")
    return names


def provenance() -> dict:
    """What was measured: the git commit, whether ``pyro_nsde/`` had uncommitted changes (and
    which files), and the versions of Python, torch, Pyro and pyro-nsde."""
    root = Path(__file__).resolve().parents[2]

    def git(*args):
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return result.stdout.rstrip() if result.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "pyro_nsde")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "pyro_nsde_dirty": bool(changed),
        "pyro_nsde_changes": changed.splitlines() if changed else [],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "pyro_nsde": pyro_nsde.__version__,
    }
