r"""A family for populations of series: hyperparameters full-rank, each series' parameter given
them with the moments of its exact conditional.

In a hierarchical SDE model the parameter ``θ_i`` of series ``i`` is drawn in the series' plate
from a population law with hyperparameters ``g`` (``log θ_i ~ N(m, s²)``), and each series'
path follows its own ``θ_i``. Mean field over ``g`` and the ``θ_i`` shrinks the population's
spread: the posterior couples every ``θ_i`` to ``g``. With ``η_i`` the unconstrained value of
``θ_i`` and ``p(η_i | g) = N(μ(g), σ(g)²)`` its population law (a ``Normal`` or ``LogNormal``
prior in the model), the exact conditional posterior is

    ``p(η_i | g, y) ∝ N(η_i; μ(g), σ(g)²) L_i(η_i)``,   ``L_i(η) = p(y_i | η_i = η)``,

and the series' likelihood ``L_i`` does not depend on ``g``. This family keeps ``log L_i`` on a
grid of nodes ``η_{i1} < ... < η_{iJ}`` per series (learned values ``λ_{ij}``), and takes for
``q(η_i | g)`` the normal law with the moments of that conditional, by quadrature:

    ``w_{ij}(g) ∝ exp(λ_{ij}) N(η_{ij}; μ(g), σ(g)²)``,
    ``q(η_i | g) = N(Σ_j w_{ij} η_{ij}, Σ_j w_{ij} (η_{ij} - M_i)² + Δ_i² / 12)``,

while ``q(g)`` is a full-rank normal (in unconstrained coordinates). So ``q(η_i | g)`` moves with
the drawn ``g`` as the posterior does, shrunk to the population when the series says little
and held at its own value when it says much, whatever the shape of ``L_i`` (a rate is often
weakly and skewedly identified by one series: a Gaussian pseudo-likelihood then biases the
population's mean and spread). The ``λ_{ij}`` start at 0 (``q(η_i | g)`` at the population
law) or at the series' log-likelihoods (:mod:`~pyro_nsde.guide.population_start`), and live in
the series' plates, so subsampled plates subsample them.

**References:**

[1] Håvard Rue, Sara Martino, Nicolas Chopin (2009), "Approximate Bayesian inference for latent
    Gaussian models by using integrated nested Laplace approximations", JRSS B.
[2] Matthew D. Hoffman, David M. Blei (2015), "Stochastic Structured Variational Inference",
    AISTATS.
"""

import math
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoGuide, AutoMultivariateNormal
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.nn import PyroModule, PyroParam
from pyro.ops.tensor_utils import periodic_repeat

from ..sde.sites import full_size, is_subsampled, run_to_sites
from . import sweep

#: Quadrature nodes per series.
NUM_NODES = 32
#: The nodes span the population law at the initial hyperparameters this many sds either way.
NODE_SPAN = 6.0
HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


def population_law(fn):
    """``(loc, scale)`` of a site's prior in unconstrained coordinates, for a ``Normal`` or
    ``LogNormal`` with one value per element (possibly masked); ``None`` for other laws."""
    while isinstance(fn, dist.MaskedDistribution):
        fn = fn.base_dist
    if isinstance(fn, (dist.Normal, dist.LogNormal)):
        return fn.loc, fn.scale
    return None


def local_sites(trace, path_sites, others):
    """The sites among ``others`` that share a vectorized plate with one of ``path_sites``:
    each series' own parameters."""
    frames = {
        frame.name
        for name in path_sites
        for frame in trace.nodes[name]["cond_indep_stack"]
        if frame.vectorized
    }
    return [
        name
        for name in others
        if any(frame.name in frames for frame in trace.nodes[name]["cond_indep_stack"])
    ]


class AutoHierarchicalNormal(AutoGuide):
    """The family of the module docstring over the latent sites of ``model`` (its path sites
    hidden): ``local`` sites given the others, the others (the hyperparameters) full-rank.

    :param callable model: the model with its path sites hidden.
    :param local: the names of the series' own sites (each a scalar per plate element with a
        ``Normal`` or ``LogNormal`` prior).
    :param callable init_loc_fn: initialization of the sites' values.
    :param float init_scale: initial scale of the hyperparameters' family.
    """

    def __init__(self, model, local, *, init_loc_fn, init_scale: float = 0.1):
        self.local = tuple(local)
        self.init_loc_fn = init_loc_fn
        self._init_scale = init_scale
        self._raw_model = (model,)
        super().__init__(InitMessenger(init_loc_fn)(model))

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        nodes = self.prototype_trace.nodes
        for name in self.local:
            law = population_law(nodes[name]["fn"])
            if law is None or nodes[name]["fn"].event_dim:
                raise ValueError(
                    f"latents='hierarchical' needs a Normal or LogNormal prior with one value per "
                    f"series for site {name!r} (a parameter in the plate of a path), but it is "
                    f"{type(nodes[name]['fn']).__name__} with event_dim "
                    f"{nodes[name]['fn'].event_dim}; use latents='normal'"
                )
        hidden = poutine.block(self._raw_model[0], hide=list(self.local))
        others = [n for n, _ in self.prototype_trace.iter_stochastic_nodes() if n not in self.local]
        self.global_guide = None
        if others:
            self.global_guide = AutoMultivariateNormal(
                hidden, init_loc_fn=self.init_loc_fn, init_scale=self._init_scale
            )
        self.log_likelihoods = PyroModule()
        for name in self.local:
            node = nodes[name]
            loc, scale = (t.detach() for t in population_law(node["fn"]))
            loc, scale = torch.broadcast_tensors(loc, scale, node["value"])[:2]
            for frame in node["cond_indep_stack"]:
                if is_subsampled(frame):
                    loc = periodic_repeat(loc, full_size(frame), frame.dim)
                    scale = periodic_repeat(scale, full_size(frame), frame.dim)
            self.set_nodes(name, loc - NODE_SPAN * scale, loc + NODE_SPAN * scale)

    def set_nodes(self, name, lower, upper, log_likelihoods=None, num_nodes=NUM_NODES):
        """Put the nodes of local site ``name`` at ``num_nodes`` equal steps from ``lower`` to
        ``upper`` (each shaped like the site at full plate sizes), with the log-likelihood
        values ``(*site shape, num_nodes)`` (default 0)."""
        fractions = torch.linspace(0.0, 1.0, num_nodes, dtype=lower.dtype, device=lower.device)
        grid = lower.unsqueeze(-1) + (upper - lower).unsqueeze(-1) * fractions
        self.register_buffer(_buffer(name), grid.contiguous())
        values = torch.zeros_like(grid) if log_likelihoods is None else log_likelihoods
        setattr(self.log_likelihoods, name, PyroParam(values.detach().clone(), event_dim=1))

    @property
    def raw_model(self):
        """The model as given (``model`` is the base class's: wrapped in its initialization)."""
        return self._raw_model[0]

    def local_laws(self, values, plates, args, kwargs) -> dict:
        """The population law of each local site given the hyperparameters in ``values``:
        ``{name: (loc, scale)}`` in unconstrained coordinates, laid out like the site."""
        data = {**values, **sweep.indices(plates)}
        nodes = run_to_sites(self._raw_model[0], self.local, data, args, kwargs)
        return {name: population_law(nodes[name]["fn"]) for name in self.local}

    def node_grid(self, name):
        """The nodes of local site ``name`` ``(*site shape at full plate sizes, NUM_NODES)``."""
        return getattr(self, _buffer(name))

    def site_nodes(self, name, plates):
        """The nodes of ``name`` and their values ``λ`` for the plates' current subsample of
        series."""
        stack = self.prototype_trace.nodes[name]["cond_indep_stack"]
        grid = sweep.take(self.node_grid(name), stack, plates, event_dims=1)
        values = sweep.take(getattr(self.log_likelihoods, name), stack, plates, event_dims=1)
        return grid, values

    def conditional(self, name, law, plates) -> "PiecewiseUniform":
        """``q(η_i | g)`` given the population law ``(μ(g), σ(g))``: uniform on each cell
        around a node, with the cell's share of the conditional (its ``normalizer`` is
        ``log Σ_j exp(λ_{ij}) N(η_{ij}; μ(g), σ(g)²) Δ_i``)."""
        grid, log_likelihoods = self.site_nodes(name, plates)
        loc, scale = (t.unsqueeze(-1) for t in law)
        step = grid[..., 1:2] - grid[..., 0:1]
        population = -0.5 * ((grid - loc) / scale).square() - scale.log() - HALF_LOG_TWO_PI
        return PiecewiseUniform(
            grid[..., :1] - 0.5 * step, step, log_likelihoods + population + step.log()
        )

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        values = {} if self.global_guide is None else dict(self.global_guide(*args, **kwargs))
        laws = self.local_laws(values, plates, args, kwargs)
        for name in self.local:
            node = self.prototype_trace.nodes[name]
            transform = biject_to(node["fn"].support)
            with ExitStack() as stack:
                for frame in node["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                free = pyro.sample(
                    f"{name}_unconstrained",
                    self.conditional(name, laws[name], plates),
                    infer={"is_auxiliary": True},
                )
                value = transform(free)
                log_density = transform.inv.log_abs_det_jacobian(value, free)
                values[name] = pyro.sample(name, dist.Delta(value, log_density=log_density))
        return values

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """The hyperparameters' medians, and each local site's median given them."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        values = {}
        if self.global_guide is not None:
            if self.global_guide.prototype_trace is None:
                self.global_guide._setup_prototype(*args, **kwargs)
            values = dict(self.global_guide.median(*args, **kwargs))
        laws = self.local_laws(values, plates, args, kwargs)
        for name in self.local:
            transform = biject_to(self.prototype_trace.nodes[name]["fn"].support)
            values[name] = transform(self.conditional(name, laws[name], plates).median())
        return values


class PiecewiseUniform(dist.TorchDistribution):
    """A density constant on each of ``J`` equal cells ``[a + j Δ, a + (j + 1) Δ)``, with cell
    probabilities ``softmax(log_weights)``; reparameterized by the inverse of its piecewise
    linear distribution function.

    :param torch.Tensor start: ``a`` ``(..., 1)``.
    :param torch.Tensor step: ``Δ`` ``(..., 1)``, positive.
    :param torch.Tensor log_weights: ``(..., J)``.
    """

    arg_constraints = {}
    support = dist.constraints.real
    has_rsample = True

    def __init__(self, start, step, log_weights, validate_args=None):
        self.start, self.step = start, step
        #: ``log Σ_j exp(log_weights_j)``.
        self.normalizer = log_weights.logsumexp(-1)
        self.log_probs = log_weights - self.normalizer.unsqueeze(-1)
        batch = torch.broadcast_shapes(start.shape, step.shape, log_weights.shape)[:-1]
        super().__init__(batch, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(PiecewiseUniform, _instance)
        shape = torch.Size(batch_shape)
        new.start = self.start.expand(shape + (1,))
        new.step = self.step.expand(shape + (1,))
        new.log_probs = self.log_probs.expand(shape + self.log_probs.shape[-1:])
        new.normalizer = self.normalizer.expand(shape)
        super(PiecewiseUniform, new).__init__(shape, validate_args=False)
        return new

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        probs = self.log_probs.exp().expand(shape + self.log_probs.shape[-1:])
        uniform = torch.rand(shape, dtype=probs.dtype, device=probs.device)
        cumulative = probs.cumsum(-1)
        cell = torch.searchsorted(cumulative.detach(), uniform.unsqueeze(-1))
        cell = cell.clamp(max=probs.shape[-1] - 1)
        upper = cumulative.gather(-1, cell)
        mass = probs.gather(-1, cell)
        within = ((uniform.unsqueeze(-1) - upper + mass) / mass).clamp(0.0, 1.0)
        return (self.start + self.step * (cell + within)).squeeze(-1)

    def log_prob(self, value):
        """The log density at ``value``; its gradient is that of ``E_q[log q] = Σ_j p_j log
        p_j - log Δ`` (the density is constant on each cell, so a pathwise gradient of the
        log density itself would miss the mass moving across the cell edges)."""
        cell = ((value.unsqueeze(-1) - self.start) / self.step).floor()
        inside = (cell >= 0) & (cell < self.log_probs.shape[-1])
        index = cell.clamp(0, self.log_probs.shape[-1] - 1).long()
        log_probs = self.log_probs.expand(index.shape[:-1] + self.log_probs.shape[-1:])
        density = log_probs.gather(-1, index) - self.step.log()
        density = torch.where(inside, density, -torch.inf).squeeze(-1)
        expected = (self.log_probs.exp() * self.log_probs).sum(-1) - self.step.squeeze(-1).log()
        return density.detach() + (expected - expected.detach())

    def median(self):
        """The point where the distribution function is ½."""
        probs = self.log_probs.exp()
        cumulative = probs.cumsum(-1)
        half = torch.full_like(cumulative[..., :1], 0.5)
        cell = torch.searchsorted(cumulative, half).clamp(max=probs.shape[-1] - 1)
        within = (half - cumulative.gather(-1, cell) + probs.gather(-1, cell)) / probs.gather(
            -1, cell
        )
        return (self.start + self.step * (cell + within)).squeeze(-1)


def _buffer(name: str) -> str:
    return "nodes_" + name.replace(".", "__")


__all__ = [
    "NUM_NODES",
    "AutoHierarchicalNormal",
    "PiecewiseUniform",
    "local_sites",
    "population_law",
]
