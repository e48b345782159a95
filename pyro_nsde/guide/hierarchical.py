r"""A family for populations of series: hyperparameters full-rank, each series' parameter given
them with the moments of its exact conditional.

In a hierarchical SDE model the parameter ``θ_i`` of series ``i`` is drawn in the series' plate
from a population law with hyperparameters ``g`` (``log θ_i ~ N(m, s²)``), and each series'
path follows its own ``θ_i``. Mean field over ``g`` and the ``θ_i`` shrinks the population's
spread: the posterior couples every ``θ_i`` to ``g``. With ``η_i`` the unconstrained value of
``θ_i`` and ``p(η_i | g)`` its population law there (the site's prior, any univariate law, with
the Jacobian of the constraint), the exact conditional posterior is

    ``p(η_i | g, y) ∝ p(η_i | g) L_i(η_i)``,   ``L_i(η) = p(y_i | η_i = η)``,

and the series' likelihood ``L_i`` does not depend on ``g``. This family keeps ``log L_i`` on a
grid of ``J`` equal cells of width ``Δ_i`` centred on nodes ``η_{i1} < ... < η_{iJ}`` per series
(learned values ``λ_{ij}``), and takes for ``q(η_i | g)`` that conditional by quadrature:
uniform within each cell, with the cell probabilities

    ``w_{ij}(g) ∝ exp(λ_{ij}) p(η_{ij} | g)``,

while ``q(g)`` is a full-rank normal (in unconstrained coordinates). So ``q(η_i | g)`` moves with
the drawn ``g`` as the posterior does, shrunk to the population when the series says little
and held at its own value when it says much, whatever the shape of ``L_i`` (a rate is often
weakly and skewedly identified by one series: a Gaussian pseudo-likelihood then biases the
population's mean and spread). Several parameters per series each get such a law given ``g``
and the series' parameters drawn before them. The ``λ_{ij}`` start at 0 (``q(η_i | g)`` at the
population law) or at the series' log-likelihoods (:mod:`~pyro_nsde.guide.population_start`),
and live in the series' plates, so subsampled plates subsample them.

**References:**

[1] Håvard Rue, Sara Martino, Nicolas Chopin (2009), "Approximate Bayesian inference for latent
    Gaussian models by using integrated nested Laplace approximations", JRSS B.
[2] Matthew D. Hoffman, David M. Blei (2015), "Stochastic Structured Variational Inference",
    AISTATS.
"""

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


def univariate(fn) -> bool:
    """Whether a site's law is a continuous law of one value per element (a population law the
    family takes)."""
    return fn.event_dim == 0 and not fn.support.is_discrete


def population_span(fn, shape) -> tuple:
    """``(loc, scale)`` of a site's law in unconstrained coordinates, laid out ``shape``: those
    of a (masked) ``Normal`` or ``LogNormal``, else the moments of 256 draws."""
    base = fn
    while isinstance(base, dist.MaskedDistribution):
        base = base.base_dist
    if isinstance(base, (dist.Normal, dist.LogNormal)):
        loc, scale = base.loc, base.scale
    else:
        free = biject_to(fn.support).inv(fn.sample((256,)))
        loc, scale = free.mean(0), free.std(0)
    loc, scale = torch.broadcast_tensors(loc.detach(), scale.detach(), torch.zeros(shape))[:2]
    return loc, scale


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
            if not univariate(nodes[name]["fn"]):
                raise ValueError(
                    f"latents='hierarchical' needs a continuous law of one value per series "
                    f"for site {name!r} (a parameter in the plate of a path), but it is "
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
            loc, scale = population_span(node["fn"], node["value"].shape)
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

    def local_law(self, name, values, plates, args, kwargs):
        """The population law of local site ``name`` (its distribution in the model) given
        the hyperparameters (and any series' parameters drawn before it) in ``values``."""
        data = {**values, **sweep.indices(plates)}
        return run_to_sites(self._raw_model[0], [name], data, args, kwargs)[name]["fn"]

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

    def conditional(self, name, law, plates, temper: float = 1.0) -> "PiecewiseUniform":
        """``q(η_i | g)`` given the population law of the site: uniform on each cell around a
        node, with the cell's share of the conditional (its ``normalizer`` is
        ``log Σ_j exp(λ_{ij}) p(η_{ij} | g) Δ_i``). ``temper`` raises the population law to
        that power (``1 / W²`` widens a normal law ``W`` times)."""
        grid, log_likelihoods = self.site_nodes(name, plates)
        transform = biject_to(self.prototype_trace.nodes[name]["fn"].support)
        value = transform(grid)
        log_jacobian = transform.log_abs_det_jacobian(grid, value)
        points = value.movedim(-1, 0)  # the nodes left of the law's batch dims
        pad = (1,) * max(0, len(law.batch_shape) - (points.dim() - 1))
        points = points.reshape(points.shape[:1] + pad + points.shape[1:])
        population = law.log_prob(points).movedim(0, -1) + log_jacobian
        step = grid[..., 1:2] - grid[..., 0:1]
        log_weights = log_likelihoods + temper * population + step.log()
        return PiecewiseUniform(grid[..., :1] - 0.5 * step, step, log_weights)

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        values = {} if self.global_guide is None else dict(self.global_guide(*args, **kwargs))
        for name in self.local:
            node = self.prototype_trace.nodes[name]
            transform = biject_to(node["fn"].support)
            law = self.local_law(name, values, plates, args, kwargs)
            with ExitStack() as stack:
                for frame in node["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                free = pyro.sample(
                    f"{name}_unconstrained",
                    self.conditional(name, law, plates),
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
        for name in self.local:
            transform = biject_to(self.prototype_trace.nodes[name]["fn"].support)
            law = self.local_law(name, values, plates, args, kwargs)
            values[name] = transform(self.conditional(name, law, plates).median())
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
    "population_span",
    "univariate",
]
