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
        A, b, G, m0, P0, times = (torch.as_tensor(v, dtype=torch_f64) for v in (A, b, G, m0, P0, times))
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
        O = torch.cat(rows) @ self.T  # y = O w + O_c + noise
        offset = torch.cat(rows) @ self.c
        noise = torch.block_diag(*[R] * len(obs_steps))
        mean_y = O @ self.mu_w + offset
        cov_y = O @ self.cov_w @ O.T + noise
        log_py = torch.distributions.MultivariateNormal(mean_y, cov_y).log_prob(y)
        gain = self.cov_w @ O.T @ torch.linalg.inv(cov_y)
        mu = self.mu_w + gain @ (y - mean_y)
        cov = self.cov_w - gain @ O @ self.cov_w
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
