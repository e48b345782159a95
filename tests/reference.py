"""Exact Gaussian references for linear SDEs, written independently of pyro_nsde.

For ``dX = (A X + b) dt + G dW`` the Euler–Maruyama chain ``x_{k+1} = (I + h_k A) x_k + h_k b
+ sqrt(h_k) G ξ_k`` is a linear function of the Gaussian vector ``w = (x_0, ξ_0, ..., ξ_{K-1})``.
Everything here is dense linear algebra in float64 on that vector: the prior path law, the
marginal likelihood of linear-Gaussian observations, the posterior (an RTS smoother in closed
form) and the best ELBO reachable by a guide with a fixed increment covariance.
"""

import math

import torch

torch_f64 = torch.float64


class LinearGaussianPath:
    """The Euler–Maruyama path of a linear SDE, as ``x = T w + c`` with ``w ~ N(μ_w, Σ_w)``.

    :param A: ``(d, d)``; :param b: ``(d,)``; :param G: ``(d, m)``;
    :param m0: ``(d,)``; :param P0: ``(d, d)`` (zeros for a known ``x_0``);
    :param times: ``(K+1,)``.
    """

    def __init__(self, A, b, G, m0, P0, times):
        A, b, G, m0, P0, times = (
            torch.as_tensor(v, dtype=torch_f64) for v in (A, b, G, m0, P0, times)
        )
        d, m = G.shape
        K = times.shape[0] - 1
        self.d, self.m, self.K = d, m, K
        n = d + K * m
        T = torch.zeros((K + 1) * d, n, dtype=torch_f64)
        c = torch.zeros((K + 1) * d, dtype=torch_f64)
        T[:d, :d] = torch.eye(d, dtype=torch_f64)
        eye = torch.eye(d, dtype=torch_f64)
        for k in range(K):
            h = times[k + 1] - times[k]
            F = eye + h * A
            rows, prev = slice((k + 1) * d, (k + 2) * d), slice(k * d, (k + 1) * d)
            T[rows] = F @ T[prev]
            T[rows, d + k * m : d + (k + 1) * m] = h.sqrt() * G
            c[rows] = F @ c[prev] + h * b
        self.T, self.c = T, c
        self.mu_w = torch.cat([m0, torch.zeros(K * m, dtype=torch_f64)])
        self.cov_w = torch.block_diag(P0, torch.eye(K * m, dtype=torch_f64))

    @property
    def mean(self):
        return (self.T @ self.mu_w + self.c).reshape(self.K + 1, self.d)

    @property
    def cov(self):
        return self.T @ self.cov_w @ self.T.T

    def observe(self, H, obs_steps, R, y):
        """Condition on ``y_j ~ N(H x_{obs_steps[j]}, R)``; returns a :class:`Posterior`."""
        H = torch.as_tensor(H, dtype=torch_f64)
        R = torch.as_tensor(R, dtype=torch_f64)
        y = torch.as_tensor(y, dtype=torch_f64).reshape(-1)
        d = self.d
        rows = []
        for k in obs_steps:
            row = torch.zeros(H.shape[0], (self.K + 1) * d, dtype=torch_f64)
            row[:, k * d : (k + 1) * d] = H
            rows.append(row)
        obs_map = torch.cat(rows) @ self.T  # y = obs_map w + offset + noise
        offset = torch.cat(rows) @ self.c
        noise = torch.block_diag(*[R] * len(obs_steps))
        mean_y = obs_map @ self.mu_w + offset
        cov_y = obs_map @ self.cov_w @ obs_map.T + noise
        log_py = torch.distributions.MultivariateNormal(mean_y, cov_y).log_prob(y)
        gain = self.cov_w @ obs_map.T @ torch.linalg.inv(cov_y)
        mu = self.mu_w + gain @ (y - mean_y)
        cov = self.cov_w - gain @ obs_map @ self.cov_w
        return Posterior(self, float(log_py), mu, (cov + cov.T) / 2)


class Posterior:
    """The exact posterior of ``w`` (hence of the path) given observations."""

    def __init__(self, path, log_py, mu_w, cov_w):
        self.path, self.log_py, self.mu_w, self.cov_w = path, log_py, mu_w, cov_w

    def marginals(self):
        """Posterior means and standard deviations of ``x_k``, each ``(K+1, d)``."""
        T, c = self.path.T, self.path.c
        mean = (T @ self.mu_w + c).reshape(-1, self.path.d)
        var = torch.einsum("ij,jk,ik->i", T, self.cov_w, T).clamp(min=0)
        return mean, var.sqrt().reshape(-1, self.path.d)

    def step_noise_covariances(self):
        """``P_k = Cov(ξ_k | x_k, y)`` for each step, ``(K, m, m)`` (prior: ``I``)."""
        d, m, K = self.path.d, self.path.m, self.path.K
        T = self.path.T
        out = []
        for k in range(K):
            xk = T[k * d : (k + 1) * d]  # x_k = xk @ w + c
            xi = torch.zeros(m, T.shape[1], dtype=torch_f64)
            xi[:, d + k * m : d + (k + 1) * m] = torch.eye(m, dtype=torch_f64)
            c_xx = xk @ self.cov_w @ xk.T
            c_ix = xi @ self.cov_w @ xk.T
            c_ii = xi @ self.cov_w @ xi.T
            out.append(c_ii - c_ix @ torch.linalg.pinv(c_xx, hermitian=True) @ c_ix.T)
        return torch.stack(out)

    def mean_shift_gap(self):
        """``log p(y) - max ELBO`` over guides with ``ΔW_k ~ N(h u_k(x_k), h I)`` and an exact
        Gaussian ``q(x_0)``: ``Σ_k ½[tr(P_k⁻¹) - m + log det P_k]``."""
        P = self.step_noise_covariances()
        m = P.shape[-1]
        gap = 0.5 * (torch.linalg.inv(P).diagonal(dim1=-2, dim2=-1).sum(-1) - m + torch.logdet(P))
        return float(gap.sum())


def gaussian_log_density(x, mean, cov):
    """Dense multivariate normal log density (for hand-written density checks)."""
    k = mean.shape[-1]
    diff = x - mean
    sol = torch.linalg.solve(cov, diff.unsqueeze(-1)).squeeze(-1)
    return -0.5 * (diff * sol).sum(-1) - 0.5 * torch.logdet(cov) - 0.5 * k * math.log(2 * math.pi)


def step_noise_regressions(posterior):
    """The posterior law of each standardized increment given the state it starts from:

        ``ξ_k | x_k, y ~ N(α_k + β_k x_k, P_k)``.

    Posteriors of linear SDEs are Gauss–Markov, so this conditional is also the one given the
    whole past. ``α_k + β_k x_k`` is the control of the best mean-shift guide (in the units of
    ``AffineControl``: ``u_k = (α_k + β_k x) / sqrt(h_k)``), and ``chol(P_k)`` its increment
    scale when the guide learns one.

    :returns: ``α`` ``(K, m)``, ``β`` ``(K, m, d)``, ``P`` ``(K, m, m)``.
    """
    path = posterior.path
    d, m, K = path.d, path.m, path.K
    T, c = path.T, path.c
    mean_w, cov_w = posterior.mu_w, posterior.cov_w
    alphas, betas = [], []
    for k in range(K):
        xk = T[k * d : (k + 1) * d]
        cols = slice(d + k * m, d + (k + 1) * m)
        beta = cov_w[cols] @ xk.T @ torch.linalg.pinv(xk @ cov_w @ xk.T, hermitian=True)
        alphas.append(mean_w[cols] - beta @ (xk @ mean_w + c[k * d : (k + 1) * d]))
        betas.append(beta)
    return torch.stack(alphas), torch.stack(betas), posterior.step_noise_covariances()


def init_posterior(posterior):
    """Mean ``(d,)`` and covariance ``(d, d)`` of the exact posterior of ``x_0``."""
    d = posterior.path.d
    T0, c0 = posterior.path.T[:d], posterior.path.c[:d]
    return T0 @ posterior.mu_w + c0, T0 @ posterior.cov_w @ T0.T


def mean_field_init_gap(posterior):
    """``min KL(q ‖ p(x_0 | y))`` over Gaussians ``q`` with diagonal covariance.

    The minimizer has the posterior mean and variances ``1 / Λ_ii`` (``Λ`` the posterior
    precision); the KL is ``½[Σ_i log Λ_ii - log det Λ]`` (zero for ``d = 1``). A guide with a
    mean-field ``q(x_0)`` stays this far below its family's best ELBO with an exact ``q(x_0)``.
    """
    _, cov = init_posterior(posterior)
    precision = torch.linalg.inv(cov)
    return float(0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)))


class AffineGaussianChain:
    """The path law of an affine Girsanov guide for the linear SDE of ``path``:

        ``x_0 ~ N(m_0, C_0)``,  ``ξ_k = a_k + B_k x_k + S_k ε_k``,  ``ε_k ~ N(0, I_m)``,
        ``x_{k+1} = (I + h_k A) x_k + h_k b + sqrt(h_k) G ξ_k``,

    i.e. ``ΔW_k ~ N(h_k u_k, h_k S_k S_kᵀ)`` with ``u_k = (a_k + B_k x_k) / sqrt(h_k)``. In the
    prior's coordinates ``w = (x_0, ξ_0, ..., ξ_{K-1})`` of :class:`LinearGaussianPath` this is
    ``w = v + M ε`` with ``M`` block lower-triangular (diagonal blocks ``chol(C_0), S_0, ...``).
    Everything is differentiable in the coefficients. ``G`` must have full column rank
    (``m ≤ d``), so that ``w ↦ x`` is one-to-one and densities of paths are densities of ``w``.

    :param LinearGaussianPath path: the prior.
    :param loc: ``a`` ``(K, m)``; :param gain: ``B`` ``(K, m, d)``;
    :param scale: ``S`` ``(K, m, m)`` lower-triangular, or ``None`` for ``I`` (mean shift);
    :param init_loc: ``m_0`` ``(d,)``; :param init_cov: ``C_0`` ``(d, d)`` positive definite.
    """

    def __init__(self, path, loc, gain, scale, init_loc, init_cov):
        d, m, K = path.d, path.m, path.K
        n = d + K * m
        T, c = path.T, path.c
        if scale is None:
            scale = torch.eye(m, dtype=torch_f64).expand(K, m, m)
        init_chol = torch.linalg.cholesky(torch.as_tensor(init_cov, dtype=torch_f64))
        v = [torch.as_tensor(init_loc, dtype=torch_f64)]
        M = [torch.cat([init_chol, torch.zeros(d, n - d, dtype=torch_f64)], dim=1)]
        for k in range(K):
            cols = d + k * m
            xk = T[k * d : (k + 1) * d, :cols]  # x_k depends on w_{<k} only
            mean_x = xk @ torch.cat(v) + c[k * d : (k + 1) * d]
            noise = torch.zeros(m, n, dtype=torch_f64)
            noise[:, cols : cols + m] = torch.eye(m, dtype=torch_f64)
            v.append(loc[k] + gain[k] @ mean_x)
            M.append(gain[k] @ xk @ torch.cat(M) + scale[k] @ noise)
        self.path = path
        self.mean_w, self.chol_w = torch.cat(v), torch.cat(M)
        self.log_det = init_chol.diagonal().log().sum() + sum(
            scale[k].diagonal().abs().log().sum() for k in range(K)
        )

    def marginals(self):
        """Means and standard deviations of ``x_k``, each ``(K+1, d)``."""
        T, c, d = self.path.T, self.path.c, self.path.d
        mean = (T @ self.mean_w + c).reshape(-1, d)
        sd = (T @ self.chol_w).pow(2).sum(-1).sqrt().reshape(-1, d)
        return mean, sd

    def elbo(self, H, obs_steps, R, y):
        """``E_q[log p(y | x) + log p(x) - log q(x)]`` for ``y_j ~ N(H x_{obs_steps[j]}, R)``.

        ``p(x)/q(x)`` is the ratio of the laws of ``w`` (the map ``w → x`` is shared):
        ``E log p(w) = log N(v; μ_w, Σ_w) - ½ tr(Σ_w⁻¹ M Mᵀ)`` and
        ``E log q(w) = -½ n (1 + log 2π) - log |det M|``.
        """
        path, d = self.path, self.path.d
        H = torch.as_tensor(H, dtype=torch_f64)
        R = torch.as_tensor(R, dtype=torch_f64)
        y = torch.as_tensor(y, dtype=torch_f64).reshape(len(obs_steps), -1)
        n = self.mean_w.shape[0]
        prior = torch.distributions.MultivariateNormal(path.mu_w, path.cov_w)
        cov = self.chol_w @ self.chol_w.T
        log_p = prior.log_prob(self.mean_w) - 0.5 * torch.trace(prior.precision_matrix @ cov)
        log_q = -0.5 * n * (1 + math.log(2 * math.pi)) - self.log_det
        log_lik = 0.0
        for j, k in enumerate(obs_steps):
            rows = slice(k * d, (k + 1) * d)
            Hx = H @ path.T[rows]
            mean_y = Hx @ self.mean_w + H @ path.c[rows]
            spread = Hx @ self.chol_w
            log_lik = log_lik + gaussian_log_density(y[j], mean_y, R)
            log_lik = log_lik - 0.5 * torch.trace(torch.linalg.solve(R, spread @ spread.T))
        return log_lik + log_p - log_q


def observation_law(path, H, obs_steps, R):
    """The prior predictive law of ``y = (y_j)``, ``y_j ~ N(H x_{obs_steps[j]}, R)``, as a
    :class:`torch.distributions.MultivariateNormal` over the stacked ``y`` (``J·p``,); its
    ``log_prob`` of a batch ``(N, J·p)`` gives ``log p(y_n)`` for ``N`` independent series."""
    H = torch.as_tensor(H, dtype=torch_f64)
    R = torch.as_tensor(R, dtype=torch_f64)
    d = path.d
    rows = torch.cat([H @ path.T[k * d : (k + 1) * d] for k in obs_steps])
    offset = torch.cat([H @ path.c[k * d : (k + 1) * d] for k in obs_steps])
    cov = rows @ path.cov_w @ rows.T + torch.block_diag(*[R] * len(obs_steps))
    return torch.distributions.MultivariateNormal(rows @ path.mu_w + offset, (cov + cov.T) / 2)


def ou_series_log_likelihoods(y, obs_steps, h, num_steps, sigma, tau, log_theta, init_var=1.0):
    """``log p(y_i | θ)`` of independent Ornstein–Uhlenbeck series ``dx = -θ x dt + σ dW`` on a
    uniform Euler–Maruyama grid (``x_{k+1} = (1 - h θ) x_k + σ sqrt(h) ξ_k``, ``x_0 ~ N(0,
    init_var)``), observed at ``obs_steps`` with noise ``τ``: a scalar Kalman filter for each
    series (rows of ``y`` ``(N, n_obs)``) and each ``θ = exp(log_theta)`` ``(G,)``.

    :returns: ``(N, G)`` float64.
    """
    y = torch.as_tensor(y, dtype=torch_f64)
    theta = torch.as_tensor(log_theta, dtype=torch_f64).exp()
    a = 1.0 - h * theta
    mean = torch.zeros(y.shape[0], theta.shape[0], dtype=torch_f64)
    var = torch.full_like(mean, init_var)
    log_lik = torch.zeros_like(mean)
    columns = {int(step): j for j, step in enumerate(obs_steps)}
    for k in range(num_steps + 1):
        if k in columns:
            total = var + tau**2
            residual = y[:, columns[k], None] - mean
            log_lik = log_lik - 0.5 * (torch.log(2 * math.pi * total) + residual**2 / total)
            gain = var / total
            mean = mean + gain * residual
            var = (1 - gain) * var
        if k < num_steps:
            mean = a * mean
            var = a**2 * var + sigma**2 * h
    return log_lik


def hierarchical_posterior(log_lik, log_theta, m_grid, log_s_grid, log_prior):
    """The posterior of the population ``(m, s)`` of ``log θ_i ~ N(m, s²)``, each series with
    its likelihood ``log_lik[i]`` on the grid ``log_theta`` ``(G,)`` (uniform), by quadrature
    over ``log θ_i`` and over the grid ``m_grid × log_s_grid``; ``log_prior(m, log_s)`` is the
    prior density of ``(m, log s)``.

    :returns: ``{"m": (mean, sd), "s": (mean, sd)}``.
    """
    log_theta = torch.as_tensor(log_theta, dtype=torch_f64)
    step = float(log_theta[1] - log_theta[0])
    m = torch.as_tensor(m_grid, dtype=torch_f64)
    log_s = torch.as_tensor(log_s_grid, dtype=torch_f64)
    log_post = torch.empty(len(m), len(log_s), dtype=torch_f64)
    for j, ls in enumerate(log_s):
        s = ls.exp()
        population = -0.5 * ((log_theta - m[:, None]) / s) ** 2 - ls - 0.5 * math.log(2 * math.pi)
        per_series = torch.logsumexp(log_lik[:, None, :] + population + math.log(step), dim=-1)
        log_post[:, j] = per_series.sum(0) + log_prior(m, ls)
    weights = (log_post - log_post.max()).exp()
    weights = weights / weights.sum()
    s = log_s.exp()
    moments = {}
    for name, values in (("m", m[:, None]), ("s", s[None, :])):
        mean = float((weights * values).sum())
        sd = float((weights * (values - mean) ** 2).sum().sqrt())
        moments[name] = (mean, sd)
    return moments
