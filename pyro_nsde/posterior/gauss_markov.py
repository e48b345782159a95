r"""The Gauss–Markov Girsanov posterior: a posterior drift affine in the state, sampled by a
parallel scan.

The control

    ``u_k(x) = G_k⁺ (v_k(x) - f(t_k, x))``,   ``v_k(x) = (a_k + B_k x) / sqrt(h_k)``,

with increment covariance ``S_k`` turns the prior's chain into one whose drift is ``v_k`` in the
directions the noise reaches (``Π_k = G_k G_k⁺``, the projection onto ``range(G_k)``) and the
prior's own drift elsewhere:

    ``x_{k+1} = x_k + h_k [Π_k v_k(x_k) + (I - Π_k) f(t_k, x_k)] + sqrt(h_k) G_k S_k ξ_k``.

When ``G`` does not depend on the state and ``(I - Π) f`` is affine in it (always, when ``G``
has full row rank; for position–velocity systems the kinematic rows ``dq = p dt``), this is an
affine recurrence ``x_{k+1} = A_k x_k + b_k`` with ``A_k = I + h_k Ṽ_k``, so every state is a
composition of affine maps: :func:`affine_scan` computes all ``K`` of them in ``O(log K)``
sequential depth, with no loop over steps and no call of the prior's drift. The prior's drift is
needed only for ``log p(x)`` and the per-step KL, both evaluated on all steps in one batched
call. The law is a Gauss–Markov chain, so for a linear SDE observed with Gaussian noise the
exact posterior is in the family (with ``covariance="full"``): :mod:`pyro_nsde.posterior.kalman`
gives it.

It is a :class:`~pyro_nsde.posterior.girsanov.GirsanovEulerMaruyama` (same support, reference
measure,
densities and gradient estimators); only the sampler differs. For a state-dependent diagonal
diffusion the step noise is a learned state-space factor ``sqrt(h_k) L_k ξ_k`` instead
(``S_k(x) = G(t_k, x)⁻¹ L_k``), which keeps the recurrence affine.

**References:**

[1] Guy E. Blelloch (1990), "Prefix Sums and Their Applications", CMU-CS-90-190.
[2] Simo Särkkä, Ángel F. García-Fernández (2021), "Temporal Parallelization of Bayesian
    Smoothers", IEEE Transactions on Automatic Control.
[3] Cedric Archambeau, Dan Cornford, Manfred Opper, John Shawe-Taylor (2007), "Gaussian Process
    Approximations of Stochastic Differential Equations", JMLR W&CP 1.
"""

import torch

from ..sde import records
from ..sde.euler_maruyama import SimulatedSteps, at_all_steps
from ..sde.noise import DiffusionFactor, apply_scale, as_matrix, diffuse, matvec, noise_rank
from .controls import PerStepCoefficients, StepCoefficients
from .girsanov import GirsanovEulerMaruyama, path_gradient_surrogate
from .scan import affine_scan


class LinearCoefficients(StepCoefficients):
    """The coefficients of a :class:`LinearControl` for one call, step-major: the posterior
    drift ``v_k(x) = (a_k + B_k x) / sqrt(h_k)`` (``a`` ``(K, *batch, d)``, ``B`` ``(K, *batch,
    d, d)``, or its diagonals ``(K, *batch, d)`` with ``diagonal_gain``) and the step scale,
    ``S_k`` in noise space or, with ``state_scale``, the state-space factor ``L_k`` of a
    diagonal diffusion (``S_k(x) = G(t_k, x)⁻¹ L_k``).

    As a control (for sequential simulation and for densities of arbitrary paths) it is
    ``u_k(x) = G⁺ (v_k(x) - f(t_k, x))``; it uses the prior's ``(f, G)``.
    """

    uses_prior = True

    def __init__(self, loc, gain, scale, covariance, state_scale=False, diagonal_gain=False):
        super().__init__(loc, gain, scale, covariance, diagonal_gain)
        self.state_scale = state_scale
        self.noise_type = None

    def bind(self, prior) -> "LinearCoefficients":
        super().bind(prior)
        if not self.diagonal_gain and self.gain.shape[-2] != prior.state_dim:
            raise ValueError(
                f"LinearControl must have state_dim={prior.state_dim} rows, but has "
                f"{self.gain.shape[-2]}"
            )
        if self.state_scale and prior.noise_type != "diagonal":
            raise ValueError("state_scale=True needs a diffusion with noise_type='diagonal'")
        self.noise_type = prior.noise_type
        return self

    def noise_space(self, scale, g):
        """``S = G⁻¹ L`` for a state-space factor ``L`` of a diagonal diffusion ``g``."""
        if scale is None or not self.state_scale:
            return scale
        return scale / g if self.covariance == "diagonal" else scale / g.unsqueeze(-1)

    def drift(self, h, x):
        """``v_k(x)`` for states ``x`` ``(K, ..., d)`` and steps ``h`` ``(K, ..., 1)``."""
        loc, gain, _ = self.aligned(x.dim())
        return (loc + _times(gain, x, self.diagonal_gain)) / h.sqrt()

    def at_all_steps(self, t, h, x, prior=None):
        f, g = prior
        _, _, scale = self.aligned(x.dim())
        u = DiffusionFactor(self.noise_type, g).solve(self.drift(h, x) - f)
        return u, self.noise_space(scale, g)

    def step_inputs(self, k: int) -> tuple:
        scale = None if self._scales is None else self._scales[k]
        return self._locs[k], self._gains[k], scale, self

    @staticmethod
    def shift(t, h, x, prior, loc, gain, scale, coefficients):
        """``(u_k, S_k)`` of one step (sequential simulation)."""
        f, g = prior
        v = (loc + _times(gain, x, coefficients.diagonal_gain)) / h.sqrt()
        u = DiffusionFactor(coefficients.noise_type, g).solve(v - f)
        return u, coefficients.noise_space(scale, g)


def _times(gain, x, diagonal: bool):
    """``B x`` for gains ``B`` held whole or as their diagonals."""
    return gain * x if diagonal else matvec(gain, x)


class LinearControl(PerStepCoefficients):
    r"""The learned coefficients of a Gauss–Markov posterior: per step ``k``, the posterior
    drift and step scale

        ``v_k(x) = (a_k + B_k x) / sqrt(h_k)``,   ``S_k``,

    optionally affine in a context and in the model's parameters (see
    :class:`~pyro_nsde.posterior.controls.PerStepCoefficients`). The ``1 / sqrt(h)`` puts ``a + B
    x`` on
    the scale of a standardized increment, as in :class:`~pyro_nsde.AffineControl`; unlike
    there, the coefficients live in state space, so the posterior's mean path does not move when
    the prior's drift or diffusion changes. Calling the module returns its
    :class:`LinearCoefficients`.

    :param int num_steps: ``K``.
    :param int state_dim: ``d``.
    :param int noise_dim: ``m`` (defaults to ``d``).
    :param bool state_scale: learn the step noise as a state-space factor ``L_k``
        (``d × d``) rather than relative to ``G`` (diagonal noise only; needed for diffusions
        that depend on the state).
    :param str gain: ``"full"`` or ``"diagonal"``: ``B_k`` diagonal, each coordinate's
        posterior drift feeding back on itself only (``d`` numbers a step and series instead
        of ``d²``, and a scan of scalars: the cheap family for many long series, e.g. under
        :func:`~pyro_nsde.subsample_steps`). Couplings between coordinates then live in the
        prior's drift where the noise does not reach, and in ``a_k`` (which follows the
        data); a coefficient fit (Laplace, Kalman) is projected onto the family by keeping
        ``diag B_k`` and moving ``(B_k - diag B_k) x̄_k`` into ``a_k`` at its mean path
        ``x̄``.
    :param options: ``batch_shape``, ``covariance`` (``"prior"``: ``S = I``, ``"diagonal"``
        or ``"full"``), ``context_dim``, ``param_dim`` and ``step_scale``, as for
        :class:`~pyro_nsde.posterior.controls.PerStepCoefficients`.
    """

    def __init__(
        self,
        num_steps: int,
        state_dim: int,
        noise_dim=None,
        *,
        state_scale=False,
        gain: str = "full",
        **options,
    ):
        m = state_dim if noise_dim is None else noise_dim
        if state_scale and options.get("covariance", "prior") == "prior":
            raise ValueError("state_scale=True needs covariance='diagonal' or 'full'")
        scale_dim = state_dim if state_scale else m
        super().__init__(
            num_steps, state_dim, m, rows=state_dim, scale_dim=scale_dim, gain=gain, **options
        )
        self.state_scale = state_scale

    def forward(
        self, context=None, params=None, base=None, per_step=None, corrected=True
    ) -> LinearCoefficients:
        return LinearCoefficients(
            *self.conditioned(context, params, base, per_step, corrected),
            self.covariance,
            self.state_scale,
            self.diagonal_gain,
        )


def _zero_drift(t, x):
    return torch.zeros_like(x)


def _noise_free_projection(factor, d: int):
    """``I - G G⁺`` ``(..., d, d)`` when ``G`` does not reach every direction, else ``None``."""
    if factor.rank >= d:
        return None
    eye = torch.eye(d, dtype=factor.g.dtype, device=factor.g.device)
    G = as_matrix(factor.noise_type, factor.g)
    return eye - G @ factor.solve(eye.expand(G.shape[:-2] + (d, d)).mT).mT


def _affine_drift(drift, t, x):
    """``(J, e)`` with ``f(t, x) = J x + e`` for a drift affine in ``x``: read off at ``x = 0``
    and the unit vectors (one batched call). ``x`` ``(K, ..., d)`` gives the shapes."""
    d = x.shape[-1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    points = torch.cat(
        [
            x.new_zeros((1,) + x.shape),
            eye.reshape((d,) + (1,) * (x.dim() - 1) + (d,)).expand((d,) + x.shape),
        ]
    )
    values = drift(t, points)
    offset = values[0]
    jac = (values[1:] - offset).movedim(0, -1)  # (K, ..., d, d): column i = f(e_i) - f(0)
    return jac, offset


class GaussMarkovEulerMaruyama(GirsanovEulerMaruyama):
    r"""The Girsanov posterior with the coefficients of a :class:`LinearControl`, sampled by
    :func:`affine_scan` (see the module docstring):

        ``x_{k+1} = x_k + h_k [Π_k v_k(x_k) + (I - Π_k) f(t_k, x_k)] + sqrt(h_k) G_k S_k ξ_k``.

    The diffusion must not depend on the state (except with ``state_scale``), and where it is
    rank-deficient the prior's drift must be affine in the state in the directions the noise
    does not reach (:func:`check_linear_family` says so with a clear error).

    :param EulerMaruyama prior: the prior path law.
    :param control: a :class:`LinearControl` (called with ``context`` and ``params``) or its
        :class:`LinearCoefficients`.
    :param init: the law of ``x_0`` under the posterior (default: the prior's ``init``).
    :param context: a context for the control's coefficients.
    :param params: centred parameters for the control's coefficients.
    :param str estimator: as for :class:`~pyro_nsde.posterior.girsanov.GirsanovEulerMaruyama`.
    """

    def __init__(
        self,
        prior,
        control,
        *,
        init=None,
        context=None,
        params=None,
        estimator: str = "plain",
        validate_args=None,
    ):
        if isinstance(control, LinearControl):
            control = control(context, params)
        if not isinstance(control, LinearCoefficients):
            raise TypeError(
                f"control must be a LinearControl or LinearCoefficients, but got "
                f"{type(control).__name__}"
            )
        super().__init__(
            prior, control, init=init, estimator=estimator, validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GaussMarkovEulerMaruyama, _instance)
        return super().expand(batch_shape, _instance=new)

    def chain_log_density(self, value: torch.Tensor) -> torch.Tensor:
        """The exact log density of any path ``value``; where the noise reaches every
        direction the prior's drift cancels from it (each step is ``x_{k+1} - x_k - h_k
        v_k(x_k) = sqrt(h_k) G_k S_k ξ_k``) and is not evaluated."""
        prior = self.prior
        rank = noise_rank(prior.noise_type, prior.state_dim, prior.noise_dim)
        return self._exact_log_prob(value, _zero_drift if rank >= prior.state_dim else None)

    def _path_gradient_surrogate(self, value):
        """As the base class's, from :meth:`chain_log_density`: "sticking the landing" then
        costs no call of the prior's drift, as :func:`~pyro_nsde.subsample_steps` needs."""
        return path_gradient_surrogate(self.chain_log_density, value)

    def _simulate(self, x0, eps):
        prior, coefficients = self.prior, self.control
        n = eps.dim()
        t, h = prior.grid.stacked(n)  # (K, 1, ..., 1)
        num_steps, d = prior.num_steps, prior.state_dim
        root_h = h.sqrt()
        loc, gain, scale = coefficients.aligned(n)
        diagonal = coefficients.diagonal_gain
        drift_loc = loc / root_h
        drift_gain = gain / (root_h if diagonal else root_h.unsqueeze(-1))
        if coefficients.state_scale:
            noise = root_h * apply_scale(scale, eps, self.covariance)
            factor = None  # G is evaluated at the sampled states, below
        else:
            probe = x0.expand((num_steps,) + x0.shape)  # G must not depend on the state
            g = prior.diffusion
            if callable(g):
                g = at_all_steps(g, t, probe)
            factor = DiffusionFactor(prior.noise_type, g)
            dw = root_h * apply_scale(scale, eps, self.covariance)
            noise = diffuse(prior.noise_type, g, dw)
            projection = _noise_free_projection(factor, d)
            if projection is not None:
                if diagonal:  # the prior's drift couples the coordinates
                    drift_gain, diagonal = torch.diag_embed(drift_gain), False
                jac, offset = _affine_drift(prior.drift, t, probe)
                drift_gain = drift_gain + projection @ (jac - drift_gain)
                drift_loc = drift_loc + (projection @ (offset - drift_loc).unsqueeze(-1)).squeeze(
                    -1
                )
        if diagonal:
            transition = 1 + h * drift_gain
        else:
            eye = torch.eye(d, dtype=x0.dtype, device=x0.device)
            transition = eye + h.unsqueeze(-1) * drift_gain
        states = affine_scan(transition, h * drift_loc + noise, x0)
        first = x0.expand(states.shape[1:]).unsqueeze(0)
        path = torch.cat([first, states]).movedim(0, -2)
        starts = torch.cat([first, states[:-1]])
        if factor is None:
            g = prior.diffusion
            if callable(g):
                g = at_all_steps(g, t, starts)
            factor = DiffusionFactor(prior.noise_type, g)
            scale = coefficients.noise_space(scale, g)

        def shift():
            return factor.solve(
                coefficients.drift(h, starts) - at_all_steps(prior.drift, t, starts)
            )

        steps = SimulatedSteps(eps, h.squeeze(-1), factor, shift, scale, self.covariance)
        records.attach(path, records.PathRecord(path, prior.law_key(), steps, self))
        return path


def check_linear_family(prior, state_scale: bool = False, state_dependent=None) -> None:
    """Raise ``ValueError`` unless ``prior`` admits the Gauss–Markov family: a diffusion that
    does not depend on the state (or, with ``state_scale``, a diagonal one), and, where the
    noise does not reach every direction, a drift affine in the state in the others.

    :param bool state_dependent: whether the diffusion depends on the state, if already known
        (default: :meth:`~pyro_nsde.EulerMaruyama.diffusion_depends_on_state`)."""
    if state_dependent is None:
        state_dependent = prior.diffusion_depends_on_state()
    if state_dependent:
        if not (state_scale and prior.noise_type == "diagonal"):
            raise ValueError(
                "control='linear' needs a diffusion that does not depend on the state, or a "
                "diagonal one (noise_type='diagonal') with covariance='diagonal' or 'full' "
                "(the step noise is then a learned factor of its own); this diffusion depends "
                "on x: use control='affine' or 'mlp'"
            )
        return
    d = prior.state_dim
    t = prior.grid.step(0)[0]
    x = torch.randn(prior.batch_shape + (d,), dtype=prior.times.dtype, device=prior.times.device)
    g = prior.diffusion(t, x) if callable(prior.diffusion) else prior.diffusion
    factor = DiffusionFactor(prior.noise_type, g.detach())
    projection = _noise_free_projection(factor, d)
    if projection is None:
        return
    probe = torch.stack([x, 2 * x - 1, x.new_zeros(x.shape)])
    jac, offset = _affine_drift(prior.drift, t, probe[:1])
    values = prior.drift(t, probe)
    affine = (jac @ probe.unsqueeze(-1)).squeeze(-1) + offset
    error = (projection @ (values - affine).unsqueeze(-1)).squeeze(-1).abs().max()
    if float(error) > 1e-4 * (1.0 + float(values.abs().max())):
        raise ValueError(
            "control='linear' needs a drift that is affine in the state in the directions the "
            "noise does not reach (e.g. dq = p dt for a position-velocity system), but this "
            "drift is nonlinear there: use control='affine' or 'mlp'"
        )


__all__ = [
    "GaussMarkovEulerMaruyama",
    "LinearCoefficients",
    "LinearControl",
    "check_linear_family",
]
