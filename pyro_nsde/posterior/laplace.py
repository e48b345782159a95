r"""Laplace approximation of a path posterior: a Gauss–Markov chain fitted by Gauss–Newton.

For a path ``x = (x_0, ..., x_K)`` with the Euler–Maruyama prior ``p(x)`` of an
:class:`~pyro_nsde.EulerMaruyama` and a log-likelihood ``L(x) = log p(y | x)``, each iteration

1. linearizes the prior about the current path ``m``: ``f(t_k, x) ≈ f(t_k, m_k) + J_k (x - m_k)``
   (``J_k`` by automatic differentiation, one vectorized drift call), ``G(t_k, x) ≈ G(t_k, m_k)``,
   giving the :class:`~pyro_nsde.posterior.kalman.LinearChain` ``x_{k+1} = (I + h_k J_k) x_k +
   h_k (f_k - J_k m_k) + G_k ΔW_k``;
2. expands ``L`` to second order about ``m`` in each state: ``-½ xᵀ J x + jᵀ x`` with
   ``J_k = -∇²_{x_k} L`` (negative eigenvalues clipped to zero) and ``j_k = ∇_{x_k} L + J_k m_k``
   (:class:`~pyro_nsde.posterior.kalman.GaussianSites`);
3. smooths (:func:`~pyro_nsde.posterior.kalman.smooth`) and moves ``m`` towards the smoother's mean
path,
   halving the step until ``log p(m) + L(m)`` does not decrease.

At convergence ``m`` is the most probable path and the smoother's chain is the Laplace
approximation of ``p(x | y)`` in forward (Gauss–Markov) form: the control ``α_k + β_k x`` and
increment covariance ``P_k`` of a Girsanov guide. For a linear SDE observed with Gaussian noise
one iteration is exact.

The likelihood's curvature is taken per state: the Hessian blocks ``∇²_{x_k} L`` come from ``d``
Hessian-vector products that perturb one coordinate of every state at once, which is exact when
``L`` is a sum of terms that each depend on one state of one series (observations at grid
points); couplings between states (an observation of an average over time, say) are left out.
"""

import torch
from torch.distributions import Distribution, MultivariateNormal

from ..sde.euler_maruyama import EulerMaruyama, simulate
from ..sde.noise import as_matrix, matvec
from .kalman import GaussianSites, GaussMarkovPosterior, LinearChain, smooth
from .small import cholesky_or_nan, eigenvalue_range


def init_moments(init, state_dim: int, like: torch.Tensor):
    """Mean ``(..., d)`` and covariance ``(..., d, d)`` of the law of ``x_0`` (zero covariance
    for a known ``x_0``; for a non-Gaussian law its mean and variances)."""
    if not isinstance(init, Distribution):
        loc = init.to(like)
        return loc, loc.new_zeros(loc.shape + (state_dim,))
    if isinstance(init, MultivariateNormal):
        return init.loc, init.covariance_matrix
    try:  # independent coordinates (a Normal under to_event, or any law with a variance)
        return init.mean, torch.diag_embed(init.variance)
    except NotImplementedError:
        draws = init.sample((1000,))
        centred = draws - draws.mean(0)
        return draws.mean(0), torch.einsum("s...i,s...j->...ij", centred, centred) / 999


def _drift_jacobian(drift, t, x, differentiable=False):
    """``f(t, x)`` and ``∂f/∂x`` for states ``x`` ``(..., d)`` (each output row depends on its
    own state only): ``(..., d)``, ``(..., d, d)``. With ``differentiable`` both stay functions
    of whatever the drift captures (parameters drawn with a gradient), else they are detached."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        f = drift(t, leaf)
        f = f.expand(torch.broadcast_shapes(f.shape, leaf.shape))
        rows = []
        for i in range(f.shape[-1]):
            row = None
            if f.requires_grad:
                (row,) = torch.autograd.grad(
                    f[..., i].sum(),
                    leaf,
                    retain_graph=True,
                    create_graph=differentiable,
                    allow_unused=True,
                )
            rows.append(torch.zeros_like(leaf) if row is None else row)
    jac = torch.stack(rows, dim=-2).expand(f.shape + f.shape[-1:])
    if not differentiable:
        return f.detach(), jac.detach()
    return f, jac


def linearize(prior: EulerMaruyama, path: torch.Tensor, differentiable=False) -> LinearChain:
    """The prior's chain linearized about ``path`` ``(*batch, K+1, d)``, step-major. With
    ``differentiable`` the chain is a differentiable function of the prior's parameters (the
    path itself is held fixed)."""
    batch = torch.broadcast_shapes(path.shape[:-2], prior.batch_shape)
    path = path.detach().expand(batch + path.shape[-2:])
    x = path[..., :-1, :].movedim(-2, 0)
    t, h = prior.grid.stacked(x.dim())
    f, jac = _drift_jacobian(prior.drift, t, x, differentiable)
    g = prior.diffusion(t, x) if callable(prior.diffusion) else prior.diffusion
    G = as_matrix(prior.noise_type, g if differentiable else g.detach())
    d = x.shape[-1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    hh = h.unsqueeze(-1)
    transition = eye + hh * jac
    offset = h * (f - (jac @ x.unsqueeze(-1)).squeeze(-1))
    num_steps = x.shape[0]
    step = (num_steps, *batch)
    G = G.expand(torch.broadcast_shapes(G.shape[:-2], step) + G.shape[-2:])
    init_loc, init_cov = init_moments(prior.init, d, x)
    if not differentiable:
        init_loc, init_cov = init_loc.detach(), init_cov.detach()
    return LinearChain(
        transition.expand(step + (d, d)),
        offset.expand(step + (d,)),
        G,
        h.squeeze(-1).expand(step),
        init_loc.expand(batch + (d,)),
        init_cov.expand(batch + (d, d)),
    )


def quadratic_sites(log_likelihood, path: torch.Tensor, differentiable=False) -> GaussianSites:
    """Second-order expansion of ``log_likelihood`` about ``path`` ``(*batch, K+1, d)``, one
    site per state (see the module docstring), step-major ``(K+1, *batch, ...)``. With
    ``differentiable`` the sites stay functions of the parameters the likelihood depends on
    (where the likelihood's curvature has to be clipped to be positive, that part does not)."""
    with torch.enable_grad():
        x = path.detach().requires_grad_()
        total = torch.as_tensor(log_likelihood(x)).sum()
        grad = None
        if total.requires_grad:  # else nothing observed depends on the path
            (grad,) = torch.autograd.grad(total, x, create_graph=True, allow_unused=True)
        d = x.shape[-1]
        if grad is None:
            grad = torch.zeros_like(x)
        columns = []
        for i in range(d):
            column = None
            if grad.requires_grad:
                probe = torch.zeros_like(x)
                probe[..., i] = 1.0
                (column,) = torch.autograd.grad(
                    grad,
                    x,
                    grad_outputs=probe,
                    retain_graph=True,
                    create_graph=differentiable,
                    allow_unused=True,
                )
            columns.append(torch.zeros_like(x) if column is None else column)
    hessian = torch.stack(columns, dim=-1)  # (*batch, K+1, d, d)
    if not differentiable:
        hessian, grad = hessian.detach(), grad.detach()
    precision = -0.5 * (hessian + hessian.mT)
    smallest, largest = eigenvalue_range(precision.detach())
    if bool((smallest < -1e-8 * (1 + largest.abs().max())).any()):
        eigenvalues, vectors = torch.linalg.eigh(precision.detach())
        precision = (vectors * eigenvalues.clamp(min=0).unsqueeze(-2)) @ vectors.mT
    information = grad + (precision @ path.detach().unsqueeze(-1)).squeeze(-1)
    return GaussianSites(precision.movedim(-3, 0), information.movedim(-2, 0))


#: Relative difference below which two linearizations of a model count as the same
#: (:func:`is_linear_gaussian`).
LINEARITY_RTOL = 1e-4


def is_linear_gaussian(prior: EulerMaruyama, log_likelihood, path: torch.Tensor) -> bool:
    """Whether the model is linear-Gaussian in the path: the prior's chain (:func:`linearize`)
    and the likelihood's sites (:func:`quadratic_sites`) are the same about ``path`` and about
    a path moved by about a tenth of its size in every coordinate (a fixed random stream, the
    caller's untouched). Then the drift is affine and the diffusion free of the state, the
    likelihood Gaussian and linear in the path, and the Kalman smoother of the linearization
    is the exact posterior of the path, wherever it is taken.

    Each of ``h J``, the offsets, ``G``, the precisions and the informations must agree to
    :data:`LINEARITY_RTOL` relative to its largest entry: a nonlinearity that moves none of
    them by as much is one the smoother's law would not gain by correcting."""
    path = path.detach()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(path.shape, generator=generator, dtype=torch.float64)
    other = path + 0.1 * (1.0 + path.abs()) * noise.to(path)
    here, there = linearize(prior, path), linearize(prior, other)
    sites_here = quadratic_sites(log_likelihood, path)
    sites_there = quadratic_sites(log_likelihood, other)
    eye = torch.eye(path.shape[-1], dtype=path.dtype, device=path.device)
    pairs = (
        (here.transition - eye, there.transition - eye),
        (here.offset, there.offset),
        (here.diffusion, there.diffusion),
        (sites_here.precision, sites_there.precision),
        (sites_here.information, sites_there.information),
    )
    for a, b in pairs:
        a, b = torch.broadcast_tensors(a.detach(), b.detach())
        size = torch.maximum(a.abs().max(), b.abs().max())
        if not bool((a - b).abs().max() <= LINEARITY_RTOL * size):
            return False
    return True


def skeleton(prior: EulerMaruyama) -> torch.Tensor:
    """The noise-free path of the prior from the mean of ``x_0``: ``(*batch, K+1, d)``."""
    loc, _ = init_moments(prior.init, prior.state_dim, prior.times)
    loc = loc.expand(prior.batch_shape + (prior.state_dim,))
    eps = loc.new_zeros((prior.num_steps, *prior.batch_shape, prior.noise_dim))
    with torch.no_grad():
        path, _ = simulate(prior, loc, eps)
    return path


def _fit(prior, log_likelihood, x):
    """The smoother of the model linearized about ``x`` (in double precision: precise data
    make stiff sites)."""
    chain = linearize(prior, x).to(torch.float64)
    return smooth(chain, quadratic_sites(log_likelihood, x).to(torch.float64))


def posterior_mode(
    prior: EulerMaruyama,
    log_likelihood,
    path: torch.Tensor | None = None,
    *,
    max_iterations: int = 50,
    tolerance: float = 1e-6,
) -> torch.Tensor:
    """The most probable path of ``p(x | y) ∝ p(x) exp(L(x))`` by damped Gauss–Newton (see
    the module docstring), ``(*batch, K+1, d)``.

    :param EulerMaruyama prior: the path law.
    :param callable log_likelihood: ``L(x)`` for a path ``x`` ``(*batch, K+1, d)``, a tensor
        whose sum is the log-likelihood.
    :param path: where to start (default: the prior's noise-free path, :func:`skeleton`).
    :param int max_iterations: Gauss–Newton iterations at most.
    :param float tolerance: stop when no state moves by more than this (relative to its size).
    """

    def objective(x):
        with torch.no_grad():
            return float(prior.log_prob(x).sum() + torch.as_tensor(log_likelihood(x)).sum())

    current = skeleton(prior) if path is None else path.detach()
    batch = torch.broadcast_shapes(current.shape[:-2], prior.batch_shape)
    current = current.expand(batch + current.shape[-2:])
    value = objective(current)
    for _ in range(max_iterations):
        posterior = _fit(prior, log_likelihood, current)
        proposal = posterior.mean_path().movedim(0, -2).to(current.dtype)
        step = 1.0
        while True:
            candidate = current + step * (proposal - current)
            candidate_value = objective(candidate)
            if candidate_value >= value or step < 1e-3:
                break
            step *= 0.5
        moved = (candidate - current).abs().max() / (1.0 + current.abs().max())
        if not candidate_value >= value:
            break  # no ascent direction left: at the optimum up to rounding
        current, value = candidate, candidate_value
        if float(moved) < tolerance:
            break
    return current


def laplace(
    prior: EulerMaruyama,
    log_likelihood,
    path: torch.Tensor | None = None,
    **options,
) -> tuple[GaussMarkovPosterior, torch.Tensor]:
    """The Laplace approximation of ``p(x | y) ∝ p(x) exp(L(x))`` as a Gauss–Markov chain:
    :func:`posterior_mode` (``options``: ``max_iterations``, ``tolerance``) and the smoother
    of the model linearized there.

    :returns: ``(posterior, path)``: the smoother's
        :class:`~pyro_nsde.posterior.kalman.GaussMarkovPosterior` (in double precision)
        linearized about the mode, and the mode ``(*batch, K+1, d)``.
    """
    mode = posterior_mode(prior, log_likelihood, path, **options)
    return _fit(prior, log_likelihood, mode), mode


def coefficients_of(control, posterior: GaussMarkovPosterior) -> dict:
    """The coefficients of an :class:`~pyro_nsde.AffineControl` or a
    :class:`~pyro_nsde.LinearControl` that reproduce a Gauss–Markov posterior (e.g. from
    :func:`laplace`), laid out like the control's parameters (``(*batch, K, ...)``, the
    posterior's batch shape): ``{"loc", "gain"[, "scale"]}``.

    - affine: ``a_k = sqrt(h_k) α_k``, ``B_k = sqrt(h_k) β_k``;
    - linear: with the posterior transition ``x_{k+1} = A_k x_k + b_k + noise``,
      ``a_k = b_k / sqrt(h_k)``, ``B_k = (A_k - I) / sqrt(h_k)``;
    - ``S_k``: ``chol(P_k)`` (``"full"``); ``diag(P_k⁻¹)^{-1/2}`` (``"diagonal"``, the best
      diagonal factor in KL); with a state-space scale, ``G_k`` times these;
    - a linear control with diagonal gains keeps ``diag B_k`` and moves the rest into the
      offset at the posterior's mean path ``x̄_k``: ``a_k + (B_k - diag B_k) x̄_k``, so that
      its drift agrees with the fit's along ``x̄`` (and its mean path is ``x̄``).
    """
    from .controls import AffineControl
    from .gauss_markov import LinearControl

    root_h = posterior.chain.h.sqrt()
    if isinstance(control, AffineControl):
        loc = root_h.unsqueeze(-1) * posterior.control_loc
        gain = root_h[..., None, None] * posterior.control_gain
    elif isinstance(control, LinearControl):
        A, b, _ = posterior.transitions()
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        loc = b / root_h.unsqueeze(-1)
        gain = (A - eye) / root_h[..., None, None]
        if control.diagonal_gain:
            means = posterior.mean_path()[:-1]
            diagonal = gain.diagonal(dim1=-2, dim2=-1)
            loc = loc + matvec(gain, means) - diagonal * means
            gain = diagonal
    else:
        raise TypeError(f"cannot set the coefficients of a {type(control).__name__}")
    gain_dims = 3 if gain.dim() > loc.dim() else 2
    values = {"loc": loc.movedim(0, -2), "gain": gain.movedim(0, -gain_dims)}
    if control.covariance != "prior":
        P = posterior.step_cov
        state_scale = getattr(control, "state_scale", False)
        if control.covariance == "full":
            scale = cholesky_or_nan(P)
            if state_scale:
                scale = posterior.chain.diffusion @ scale
            values["scale"] = scale.movedim(0, -3)
        else:
            scale = torch.linalg.inv(P).diagonal(dim1=-2, dim2=-1).rsqrt()
            if state_scale:
                scale = posterior.chain.diffusion.diagonal(dim1=-2, dim2=-1) * scale
            values["scale"] = scale.movedim(0, -2)
    return values


def init_of(posterior: GaussMarkovPosterior, full: bool):
    """``(loc, scale)`` of ``q(x_0)`` from a Gauss–Markov posterior: the Cholesky factor of its
    covariance (``full``), or the best diagonal scales in KL, ``diag(Σ⁻¹)^{-1/2}``."""
    cov = posterior.init_cov
    cov = cov + 1e-12 * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    if full:
        return posterior.init_loc, cholesky_or_nan(cov)
    return posterior.init_loc, torch.linalg.inv(cov).diagonal(dim1=-2, dim2=-1).rsqrt()


__all__ = [
    "coefficients_of",
    "init_moments",
    "init_of",
    "laplace",
    "linearize",
    "posterior_mode",
    "quadratic_sites",
    "skeleton",
]
