"""The prior over paths: the Euler–Maruyama discretization of an Itô SDE as a Pyro distribution."""

from typing import NamedTuple

import torch
import torch.utils.checkpoint
from pyro.distributions import TorchDistribution, constraints
from pyro.poutine.indep_messenger import IndepMessenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from torch.distributions import Distribution

from . import records
from .checks import broadcastable, check_expand
from .compile import maybe_compiled
from .grid import TimeGrid, time_first
from .noise import (
    DiffusionFactor,
    add_diffused,
    apply_scale,
    check_diffusion_shape,
    check_noise_type,
    diffuse,
    diffusion_event_dim,
    noise_dim,
    scale_log_det,
    standard_log_density,
    step_kl,
    step_log_density,
)

#: States per call when a drift or diffusion is evaluated on all steps of a path at once
#: (:func:`at_all_steps`).
STATES_PER_CALL = 8192


def at_all_steps(fn, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``fn(t, x)`` for the states of all steps, ``x`` ``(K, ..., d)`` and ``t`` ``(K, ...)``
    step-major, evaluated in blocks of consecutive steps of about :data:`STATES_PER_CALL`
    states each and concatenated. One call on ``K · B`` states streams every layer's
    activations through memory; blocks that stay in cache are faster, forward and backward
    (a width-64 MLP on ``1000 × 512`` states of dimension 8: 1.9× on one core). Functions
    whose output has no step axis (a constant, say) are called once on everything."""
    num = x.shape[0]
    per_step = x[0].numel() // max(x.shape[-1], 1)
    block = max(1, STATES_PER_CALL // max(per_step, 1))
    if block >= num or t.shape[0] != num:
        return fn(t, x)
    pieces = []
    for start in range(0, num, block):
        piece = fn(t[start : start + block], x[start : start + block])
        if piece.dim() < x.dim() or piece.shape[0] != min(block, num - start):
            return fn(t, x)  # not one output per step
        pieces.append(piece)
    return torch.cat(pieces)


class SimulatedSteps:
    r"""Per-step quantities of one simulated path, stacked step-major (``(K, ..., ·)``).

    A path simulated from standard normal ``ξ_k`` under a noise-space law
    ``ΔW_k = h_k u_k + sqrt(h_k) S_k ξ_k`` (``u = 0``, ``S = I`` for the prior) has whitened
    increments ``z_k = W_k(x_{k+1} - x_k - h_k f_k)`` equal to ``ΔW_k`` (``Q_k ΔW_k`` when
    ``m > d``), so both transition densities follow from the recorded ``ξ``, ``u``, ``S`` and
    ``G`` without evaluating the drift again. When ``G`` has full column rank, with the
    standardized increments ``w_k = ΔW_k / sqrt(h_k) = sqrt(h_k) u_k + S_k ξ_k``,

        ``log p(x_{k+1} | x_k) = -½ |w_k|² - ½ m log(2π h_k) - log vol(G_k)``,
        ``log q(x_{k+1} | x_k) = -½ |ξ_k|² - log det S_k - ½ m log(2π h_k) - log vol(G_k)``:

    the second is the change of variables ``ξ ↦ x``, the same function of every parameter as
    the density evaluated at the path, without the terms that cancel. Results are cached.
    """

    def __init__(self, xi, h, factor, shift=None, scale=None, covariance="prior"):
        self.xi = xi
        self.h = h
        self.factor = factor
        self._shift = shift
        self.scale = scale
        self.covariance = covariance
        self._cache = {}

    @property
    def shift(self):
        """``u_k`` ``(K, ..., m)`` (``None`` for the prior); a callable given for it is
        evaluated on first use (a sampler that never needed the drift defers it until a
        density or the KL asks for it)."""
        if callable(self._shift):
            self._shift = self._shift()
        return self._shift

    def _standardized(self):
        """``w_k = sqrt(h_k) u_k + S_k ξ_k``."""
        if self.shift is None:
            return self.xi
        noise = apply_scale(self.scale, self.xi, self.covariance)
        return self.h.sqrt().unsqueeze(-1) * self.shift + noise

    def _whitened(self):
        """``z`` and the whitened step law ``(shift, scale, covariance)``, for ``m > d``."""
        if "whitened" not in self._cache:
            factor = self.factor
            dw = self.h.sqrt().unsqueeze(-1) * self._standardized()
            z = (factor.rows @ dw.unsqueeze(-1)).squeeze(-1)
            law = (None, None, "prior")
            if self.shift is not None:
                law = factor.to_whitened(self.shift, self.scale, self.covariance)
            self._cache["whitened"] = z, law
        return self._cache["whitened"]

    def prior_log_prob(self) -> torch.Tensor:
        """``Σ_k log p(x_{k+1} | x_k)``, shape ``sample + batch``."""
        if "prior" not in self._cache:
            if self.factor.rows is None:
                lp = standard_log_density(self._standardized(), self.h)
            else:
                lp = step_log_density(self._whitened()[0], self.h)
            self._cache["prior"] = (lp - self.factor.log_volume).sum(0)
        return self._cache["prior"]

    def posterior_log_prob(self) -> torch.Tensor:
        """``Σ_k log q(x_{k+1} | x_k)`` under the recorded control, shape ``sample + batch``."""
        if "posterior" not in self._cache:
            if self.factor.rows is None:
                log_det = scale_log_det(self.scale, self.covariance)
                lq = standard_log_density(self.xi, self.h) - log_det
            else:
                z, (shift, scale, covariance) = self._whitened()
                lq = step_log_density(z, self.h, shift, scale, covariance)
            self._cache["posterior"] = (lq - self.factor.log_volume).sum(0)
        return self._cache["posterior"]

    def kl(self) -> torch.Tensor:
        """``Σ_k KL(q(· | x_k) ‖ p(· | x_k))`` at the visited states (the Girsanov energy)."""
        if self.factor.rows is None:
            shift, scale, covariance = self.shift, self.scale, self.covariance
        else:
            _, (shift, scale, covariance) = self._whitened()
        return step_kl(self.h, shift, scale, covariance).sum(0)


class Residuals(NamedTuple):
    """The drift and diffusion of a law evaluated on all steps of a path, step axis leftmost.

    ``x`` ``(K, ..., d)``: the state at the start of each step; ``t`` ``(K, ..., 1)``;
    ``h`` ``(K, ...)``; ``f`` ``(K, ..., d)``: ``f(t_k, x_k)``; ``z`` ``(K, ..., r)``: the
    whitened residuals ``W_k(x_{k+1} - x_k - h_k f(t_k, x_k))``; ``factor``: the
    :class:`~pyro_nsde.sde.noise.DiffusionFactor` of ``G(t_k, x_k)``.
    """

    x: torch.Tensor
    t: torch.Tensor
    h: torch.Tensor
    f: torch.Tensor
    z: torch.Tensor
    factor: DiffusionFactor


def simulate(law, x0, eps, control=None, checkpoint_every=None, compile_step=False):
    """Simulate ``x_{k+1} = x_k + h_k f(t_k, x_k) + G(t_k, x_k) ΔW_k`` from ``x0``.

    :param EulerMaruyama law: drift, diffusion, noise type and grid.
    :param torch.Tensor x0: initial states ``(..., d)``.
    :param torch.Tensor eps: standard normal noise ``(K, ..., m)``.
    :param control: ``None`` for the prior (``ΔW_k = sqrt(h_k) ξ_k``), else an object with
        ``covariance``, ``step_inputs(k)`` and ``shift(t, h, x, prior, *inputs) -> (u, S)``:
        ``ΔW_k = h_k u_k + sqrt(h_k) S_k ξ_k``; ``prior`` is ``(f(t_k, x_k), G(t_k, x_k))``,
        evaluated once for the step and shared with controls that use them (see
        :mod:`pyro_nsde.posterior.controls`).
    :param int checkpoint_every: if set (and gradients are on), run the loop in blocks of this
        many steps under :func:`torch.utils.checkpoint.checkpoint`: the activations inside the
        drift, diffusion and control are recomputed in the backward pass instead of stored.
    :param bool compile_step: run :func:`euler_step` compiled by :func:`torch.compile`
        (falls back to eager execution where compilation fails; see
        :mod:`pyro_nsde.sde.compile`).
    :returns: ``(path, steps)``: the path ``(..., K+1, d)`` and its :class:`SimulatedSteps`.
    """
    num_steps = law.grid.num_steps
    if checkpoint_every and torch.is_grad_enabled():
        # Non-reentrant checkpointing: activations inside a block are recomputed in the
        # backward pass. (The reentrant variant stores even less, but breaks when the drift
        # captures tensors with a gradient history, e.g. parameters sampled in the model.)
        x, parts = x0, []
        for k0 in range(0, num_steps, checkpoint_every):
            k1 = min(k0 + checkpoint_every, num_steps)
            part = torch.utils.checkpoint.checkpoint(
                _run_steps,
                law,
                control,
                eps,
                k0,
                k1,
                x,
                compile_step,
                use_reentrant=False,
                preserve_rng_state=False,
            )
            parts.append(part)
            x = part[0][-1]
        xs, gs, us, scales = (
            None if chunks[0] is None else torch.cat(chunks) for chunks in zip(*parts, strict=True)
        )
    else:
        xs, gs, us, scales = _run_steps(law, control, eps, 0, num_steps, x0, compile_step)
    path = torch.cat([x0.unsqueeze(0), xs]).movedim(0, -2)
    if law._validate_args:
        _check_finite(path, law.grid)
    if gs is not None:  # a callable G may return fewer batch dims than the state
        gs = time_first(gs, eps.dim() + diffusion_event_dim(law.noise_type) - 1)
    factor = DiffusionFactor(law.noise_type, law.diffusion if gs is None else gs)
    _, h = law.grid.stacked(eps.dim())
    h = h.squeeze(-1)
    if control is None:
        return path, SimulatedSteps(eps, h, factor)
    # Controls may return fewer batch dims than the state; align them step-major.
    covariance = control.covariance
    shift = time_first(us, eps.dim())
    if getattr(control, "drift_free", False):  # the steps' posterior drifts v_k, not u_k
        shift = _deferred_shift(law, factor, shift, x0, xs, eps.dim())
    if scales is not None:
        scales = time_first(scales, eps.dim() + (covariance == "full"))
    return path, SimulatedSteps(eps, h, factor, shift, scales, covariance)


def _deferred_shift(law, factor, drifts, x0, xs, n):
    """``u_k = G_k⁻¹ (v_k - f(t_k, x_k))`` of a drift-free simulation, as a callable that
    evaluates the prior's drift on all steps in one call when first asked (only the Girsanov
    terms of the record need it)."""

    def shift():
        t, _ = law.grid.stacked(n)
        starts = torch.cat([x0.expand(xs.shape[1:]).unsqueeze(0), xs[:-1]])
        return factor.solve(drifts - at_all_steps(law.drift, t, starts))

    return shift


def euler_step(drift, diffusion, noise_type, shift, covariance, diffused, t, h, x, noise, inputs):
    """One Euler–Maruyama step ``x' = x + h (f + G u) + G S sqrt(h) ξ``, i.e.
    ``x' = x + h f + G ΔW`` with ``ΔW = h u + sqrt(h) S ξ``.

    ``f = f(t, x)``, ``G = G(t, x)``; ``(u, S) = shift(t, h, x, (f, G), *inputs)``, or
    ``u = 0``, ``S = I`` when ``shift`` is ``None`` (the prior).

    :param bool diffused: whether ``noise`` is already the state-space noise
        ``G sqrt(h) ξ`` ``(..., d)`` (possible for a constant diffusion with ``S = I``, and
        computed by the caller for all steps at once), rather than ``sqrt(h) ξ`` ``(..., m)``.
    :returns: ``(x', G, u, S)``.
    """
    f = drift(t, x)
    g = diffusion(t, x) if callable(diffusion) else diffusion
    u = scale = None
    if shift is not None:
        u, scale = shift(t, h, x, (f, g), *inputs)
        f = add_diffused(noise_type, f, g, u)
    if diffused:
        x = x + noise
    else:
        x = add_diffused(noise_type, x, g, apply_scale(scale, noise, covariance))
    return torch.addcmul(x, h, f), g, u, scale


def drift_free_step(
    drift, diffusion, noise_type, shift, covariance, diffused, t, h, x, noise, inputs
):
    """One step ``x' = x + h v + G S sqrt(h) ξ`` of a control that gives the posterior drift
    ``v`` itself (``control.posterior_drift``, see :class:`~pyro_nsde.posterior.controls.
    CallableControl`): the same step as :func:`euler_step` with ``u = G⁻¹ (v - f)``, and its
    signature, but ``drift`` and ``shift`` are not called. Returns ``(x', G, v, S)``."""
    control, _, _, context = inputs
    g = diffusion(t, x) if callable(diffusion) else diffusion
    v, scale = control.posterior_drift(t, x, context)
    if diffused:
        x = x + noise
    else:
        x = add_diffused(noise_type, x, g, apply_scale(scale, noise, covariance))
    return torch.addcmul(x, h, v), g, v, scale


def _run_steps(law, control, eps, k0, k1, x, compile_step=False):
    """Steps ``k0 <= k < k1`` from state ``x``; returns step-major stacks ``(xs, G, u, S)``
    (``None`` for what does not vary per step)."""
    grid, drift, diffusion, noise_type = law.grid, law.drift, law.diffusion, law.noise_type
    step = maybe_compiled(euler_step, compile_step)
    if getattr(control, "drift_free", False):
        step = drift_free_step
    shift = None if control is None else control.shift

    covariance = "prior" if control is None else control.covariance
    _, h = grid.stacked(eps.dim())
    noise = h[k0:k1].sqrt() * eps[k0:k1]  # sqrt(h_k) ξ_k, all steps in one call
    diffused = not callable(diffusion) and covariance == "prior"
    if diffused:
        noise = diffuse(noise_type, diffusion, noise)
    xs, gs, us, scales = [], [], [], []
    for k, noise_k in zip(range(k0, k1), noise.unbind(0), strict=True):
        t, h_k, _ = grid.step(k)
        inputs = () if control is None else control.step_inputs(k)
        x, g, u, scale = step(
            drift, diffusion, noise_type, shift, covariance, diffused, t, h_k, x, noise_k, inputs
        )
        xs.append(x)
        gs.append(g)
        us.append(u)
        scales.append(scale)
    return (
        torch.stack(xs),
        torch.stack(gs) if callable(diffusion) else None,
        None if control is None else torch.stack(us),
        torch.stack(scales) if covariance != "prior" else None,
    )


def _check_finite(path, grid):
    finite = torch.isfinite(path).all(-1)  # (..., K+1)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()  # rows (*batch index, k)
    first = bad[bad[:, -1].argmin()].tolist()
    k = first[-1]
    t = grid.times.expand(finite.shape)[tuple(first)].item()
    raise ValueError(
        f"the simulated path became non-finite at step {k} (t = {t:.6g}) in batch element "
        f"{tuple(first[:-1])}; the drift or diffusion is unstable for this step size, or the "
        f"parameters are out of range"
    )


class EulerMaruyama(TorchDistribution):
    r"""The law of the Euler–Maruyama discretization of the Itô SDE
    ``dX = f(t, X) dt + G(t, X) dW`` on a grid ``t_0 < ... < t_K``:

        ``x_0 ~ init``,
        ``x_{k+1} = x_k + h_k f(t_k, x_k) + G(t_k, x_k) ΔW_k``,  ``ΔW_k ~ N(0, h_k I_m)``,

    with ``h_k = t_{k+1} - t_k``. This is Tzen & Raginsky's deep latent Gaussian model with
    ``K`` layers; as ``K → ∞`` it converges to the SDE.

    ``event_shape = (K + 1, d)``: a value is a whole path, ``value[..., k, :]`` the state at
    ``times[..., k]``. ``batch_shape`` broadcasts the batch shapes of ``init``, ``times`` and
    the drift/diffusion outputs (parameters sampled inside plates carry plate dims).

    :param callable drift: ``f(t, x) -> (..., d)``; ``x`` is ``(..., d)`` and ``t`` broadcasts
        against ``x[..., :1]``. In :meth:`log_prob` all ``K`` steps are evaluated in one call,
        with the step axis leftmost: ``x`` is ``(K, ..., d)``, ``t`` is ``(K, 1, ..., 1)``.
        Must be a pure tensor function.
    :param diffusion: a tensor, or a callable ``G(t, x)``, shaped as ``noise_type`` requires
        (see :mod:`pyro_nsde.sde.noise`): ``"diagonal"`` ``(..., d)``; ``"scalar"`` ``(..., d, 1)``;
        ``"general"``/``"additive"`` ``(..., d, m)``.
    :param init: the law of ``x_0``: a distribution with ``event_shape == (d,)``, or a tensor
        ``(..., d)`` for a known initial state (then ``value[..., 0, :]`` is taken to equal it).
    :param torch.Tensor times: ``(K+1,)`` or ``(..., K+1)``, strictly increasing; its dtype and
        device are those of the path.
    :param str noise_type: ``"diagonal"``, ``"scalar"``, ``"general"`` or ``"additive"``.

    :meth:`log_prob` is the exact density of the discretized path with respect to Lebesgue
    measure on ``x_0`` (none when ``init`` is a tensor) times, for each step, the
    ``rank(G)``-dimensional Lebesgue measure on ``x_k + h_k f + range(G)`` (Lebesgue measure
    on ``R^d`` for invertible ``G``); see :mod:`pyro_nsde.sde.noise`.

    **References:**

    [1] Belinda Tzen, Maxim Raginsky (2019), "Neural Stochastic Differential Equations: Deep
        Latent Gaussian Models in the Diffusion Limit", arXiv:1905.09883.
    [2] Peter E. Kloeden, Eckhard Platen (1992), "Numerical Solution of Stochastic
        Differential Equations", Springer.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        drift,
        diffusion,
        init,
        times,
        *,
        noise_type: str = "diagonal",
        validate_args=None,
    ):
        validate = Distribution._validate_args if validate_args is None else validate_args
        self.noise_type = check_noise_type(noise_type)
        if not callable(drift):
            raise TypeError(f"drift must be callable f(t, x), but got {type(drift).__name__}")
        if not (callable(diffusion) or isinstance(diffusion, torch.Tensor)):
            raise TypeError(
                f"diffusion must be a tensor or a callable G(t, x), "
                f"but got {type(diffusion).__name__}"
            )
        self.grid = TimeGrid.of(times, validate=validate)
        self.init = init
        if isinstance(init, Distribution):
            if len(init.event_shape) != 1:
                raise ValueError(
                    f"init must have event_shape (d,), but got {tuple(init.event_shape)}"
                )
            state_dim, init_batch = init.event_shape[0], init.batch_shape
        elif isinstance(init, torch.Tensor):
            if init.dim() < 1:
                raise ValueError("init must be a tensor of shape (..., d), but got a scalar")
            state_dim, init_batch = init.shape[-1], init.shape[:-1]
        else:
            raise TypeError(
                f"init must be a pyro Distribution or a tensor, but got {type(init).__name__}"
            )
        self.drift = drift
        self.diffusion = diffusion
        batch_shape, self.noise_dim = self._probe(init_batch, state_dim, validate)
        event_shape = torch.Size((self.grid.num_steps + 1, state_dim))
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def _probe(self, init_batch, state_dim, validate):
        """Evaluate drift and diffusion once at ``t_0`` to learn shapes (and check them).

        The probe state ``x`` is ``broadcast(init batch, times batch) + (d,)``. Every error
        names the arguments involved and their shapes. With ``validate``, inside a traced
        Pyro run, a callable whose output has a leading size-1 batch dim that neither ``x``
        nor the model's plates so far explain is rejected (see :func:`_check_added_dims`).
        """
        times = self.grid.times
        origin = _state_origin(self.init, state_dim)
        batches = [
            ("init", init_batch, _init_shape(self.init)),
            ("times", self.grid.batch_shape, f"times shape {tuple(times.shape)}"),
        ]
        batch = _broadcast_batches(batches)
        x = times.new_zeros(batch + (state_dim,))
        t = self.grid.step(0)[0]
        x_text = (
            f"x of shape {tuple(x.shape)} (batch shape {tuple(batch)} broadcast from init "
            f"{tuple(init_batch)} and times {tuple(self.grid.batch_shape)}; {origin})"
        )
        name = f"drift {_name(self.drift)}"
        f = _call(self.drift, name, t, x, x_text)
        if f.dim() < 1 or f.shape[-1] != state_dim:
            raise ValueError(
                f"{name} returned shape {tuple(f.shape)} for x of shape {tuple(x.shape)}, but "
                f"{origin}; the drift must return shape (..., {state_dim})"
            )
        if f.dtype != times.dtype:
            raise TypeError(
                f"{name} returned dtype {f.dtype}, but times has dtype {times.dtype}; use one "
                f"floating point dtype throughout"
            )
        if validate:
            _check_added_dims(name, f.shape, f.shape[:-1], x)
        output = f"output shape {tuple(f.shape)} for x of shape {tuple(x.shape)}"
        batches.append((name, f.shape[:-1], output))
        if callable(self.diffusion):
            name = f"diffusion {_name(self.diffusion)}"
            g = _call(self.diffusion, name, t, x, x_text)
        else:
            name, g = "diffusion", self.diffusion
        if g.dtype != times.dtype:
            raise TypeError(
                f"{name} has dtype {g.dtype}, but times has dtype {times.dtype}; use one "
                f"floating point dtype throughout"
            )
        check_diffusion_shape(self.noise_type, g, state_dim, name, origin)
        g_batch = g.shape[: g.dim() - diffusion_event_dim(self.noise_type)]
        if callable(self.diffusion):
            if validate:
                _check_added_dims(name, g.shape, g_batch, x)
            output = f"output shape {tuple(g.shape)} for x of shape {tuple(x.shape)}"
        else:
            output = f"diffusion shape {tuple(g.shape)}"
            if validate:
                _check_diffusion_values(self.noise_type, g)
        batches.append((name, g_batch, output))
        return _broadcast_batches(batches), noise_dim(self.noise_type, g.shape, state_dim)

    @property
    def times(self) -> torch.Tensor:
        return self.grid.times

    @property
    def num_steps(self) -> int:
        return self.grid.num_steps

    @property
    def state_dim(self) -> int:
        return self.event_shape[-1]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(EulerMaruyama, _instance)
        batch_shape = torch.Size(batch_shape)
        check_expand(self.batch_shape, batch_shape)
        new.__dict__.update(self.__dict__)
        super(EulerMaruyama, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def diffusion_depends_on_state(self) -> bool:
        """Whether the diffusion ``G(t, x)`` depends on the state, checked by differentiation
        at a random state at ``t_0`` (a constant diffusion does not)."""
        if not callable(self.diffusion):
            return False
        x = torch.randn(
            self.batch_shape + (self.state_dim,), dtype=self.times.dtype, device=self.times.device
        )
        with torch.enable_grad():
            leaf = x.requires_grad_()
            g = self.diffusion(self.grid.step(0)[0], leaf)
            (grad,) = torch.autograd.grad(g.sum(), leaf, allow_unused=True)
        return grad is not None and bool((grad != 0).any())

    def law_key(self):
        """A key equal for two instances that define the same transition law."""
        return records.law_key((self.drift, self.diffusion, self.noise_type, self.times))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)[:-2]
        x0 = draw_init(self.init, shape, self.state_dim)
        eps = x0.new_empty((self.num_steps,) + shape + (self.noise_dim,)).normal_()
        path, steps = simulate(self, x0, eps)
        records.attach(path, records.PathRecord(path, self.law_key(), steps, self))
        return path

    def _validate_sample(self, value):
        """Check the shape of ``value`` with a message stating the expected one, then (by
        :class:`~torch.distributions.Distribution`) its support."""
        if isinstance(value, torch.Tensor):
            _check_value_shape(value, self.batch_shape, self.event_shape)
        super()._validate_sample(value)

    def init_log_prob(self, value: torch.Tensor):
        """``log p(x_0)``: ``init.log_prob(value[..., 0, :])``, or ``0.`` for a known ``x_0``."""
        if isinstance(self.init, Distribution):
            return self.init.log_prob(value[..., 0, :])
        return 0.0

    def residuals(self, value: torch.Tensor, batch_shape=None, drift=None) -> Residuals:
        """Evaluate drift and diffusion on all steps of ``value`` in one call.

        ``value`` is first expanded to ``batch_shape`` (default: this law's), so that the
        leftmost step axis cannot pair with a batch dim the value lacks. ``drift``: another
        drift to evaluate in place of this law's (default: its own).
        """
        batch_shape = self.batch_shape if batch_shape is None else batch_shape
        value = value.expand(
            torch.broadcast_shapes(value.shape[:-2], batch_shape) + value.shape[-2:]
        )
        start = value[..., :-1, :]
        if not isinstance(self.init, Distribution):
            x0 = self.init.expand(start.shape[:-2] + self.init.shape[-1:])
            start = torch.cat([x0.unsqueeze(-2), start[..., 1:, :]], dim=-2)
        x = start.movedim(-2, 0)
        x_next = value[..., 1:, :].movedim(-2, 0)
        t, h = self.grid.stacked(x.dim())
        f = at_all_steps(self.drift if drift is None else drift, t, x)
        g = at_all_steps(self.diffusion, t, x) if callable(self.diffusion) else self.diffusion
        factor = DiffusionFactor(self.noise_type, g)
        z = factor.whiten(x_next - x - h * f)
        return Residuals(x, t, h.squeeze(-1), f, z, factor)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape[:-2], self.batch_shape)
        record = records.find(value)
        if record is not None and record.key == self.law_key():
            transitions = record.steps.prior_log_prob()
        else:
            res = self.residuals(value)
            transitions = (step_log_density(res.z, res.h) - res.factor.log_volume).sum(0)
        return (self.init_log_prob(value) + transitions).expand(shape)

    def girsanov(self, control, *, init=None, context=None, **kwargs):
        """The Girsanov (mean-shift) posterior path law with drift ``f + G u``.

        See :class:`~pyro_nsde.posterior.girsanov.GirsanovEulerMaruyama` for the arguments.
        """
        from ..posterior.girsanov import GirsanovEulerMaruyama

        return GirsanovEulerMaruyama(self, control, init=init, context=context, **kwargs)


def _check_value_shape(value, batch_shape, event_shape) -> None:
    """Raise ``ValueError`` unless ``value`` is ``sample_shape + batch + (K+1, d)`` with a
    batch part that broadcasts with ``batch_shape``."""
    if value.shape[-2:] != event_shape:
        steps, dim = event_shape
        raise ValueError(
            f"value must have shape sample_shape + batch_shape + (K+1, d) = (..., {steps}, "
            f"{dim}), but got shape {tuple(value.shape)}; a value is a whole path, "
            f"value[..., k, :] the state at times[..., k]"
        )
    if not broadcastable(value.shape[:-2], batch_shape):
        expected = ", ".join(map(str, batch_shape + event_shape))
        raise ValueError(
            f"value has shape {tuple(value.shape)}, whose batch part {tuple(value.shape[:-2])} "
            f"does not broadcast with the path's batch_shape {tuple(batch_shape)}; value must "
            f"have shape sample_shape + batch_shape + (K+1, d) = (..., {expected}) (or "
            f"broadcast to it)"
        )


def draw_init(init, shape, state_dim):
    """Initial states ``shape + (d,)``: drawn (reparameterized) from ``init`` if it is a
    distribution, else the known ``x_0`` expanded."""
    if isinstance(init, Distribution):
        return init.expand(shape).rsample()
    return init.expand(shape + (state_dim,))


def _name(fn):
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _init_shape(init):
    if isinstance(init, Distribution):
        return f"init batch_shape {tuple(init.batch_shape)}, event_shape {tuple(init.event_shape)}"
    return f"init shape {tuple(init.shape)}"


def _state_origin(init, state_dim):
    """Where ``d`` comes from, for messages: ``init has state dimension d = 3 (...)``."""
    return f"init has state dimension d = {state_dim} ({_init_shape(init)})"


def _call(fn, name, t, x, x_text):
    """``fn(t, x)`` for the probe, which must return a tensor; a failure names ``fn`` and ``x``."""
    try:
        out = fn(t, x)
    except (RuntimeError, IndexError) as error:
        raise ValueError(f"{name} failed on {x_text}: {error}") from error
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a tensor, but returned {type(out).__name__}")
    return out


def _check_diffusion_values(noise_type, g):
    if not torch.isfinite(g).all():
        raise ValueError("diffusion must be finite, but has non-finite entries")
    if noise_type == "diagonal" and not (g > 0).all():
        raise ValueError(
            f"diffusion entries must be > 0 for noise_type='diagonal', but got "
            f"{float(g[g <= 0][0]):g}; for noise on a subset of coordinates pass a "
            f"(d, m) matrix with noise_type='general'"
        )


def _broadcast_batches(batches):
    """The broadcast of named batch shapes ``[(name, batch_shape, shape description)]``.

    Computed here rather than by :func:`torch.broadcast_shapes` (slower on these few small
    shapes, and its error names no argument).

    :raises ValueError: naming two of them that do not broadcast, with their shapes.
    """
    ndim = max(len(batch) for _, batch, _ in batches)
    out = [1] * ndim
    for _, batch, _ in batches:
        for i, size in enumerate(batch, ndim - len(batch)):
            if size != 1 and out[i] != size:
                if out[i] != 1:
                    _raise_unbroadcastable(batches)
                out[i] = size
    return torch.Size(out)


def _raise_unbroadcastable(batches):
    """Name two of ``batches`` that do not broadcast (shapes that broadcast pairwise
    broadcast together, so there are two)."""
    for i, (name, batch, shape) in enumerate(batches):
        for other, other_batch, other_shape in batches[i + 1 :]:
            if not broadcastable(batch, other_batch):
                raise ValueError(
                    f"{name} has batch shape {tuple(batch)} ({shape}) and {other} has batch "
                    f"shape {tuple(other_batch)} ({other_shape}), which do not broadcast; the "
                    f"path's batch shape broadcasts those of init, times and the outputs of "
                    f"drift and diffusion"
                )


def _explained_rank() -> int | None:
    """How many rightmost batch dims the running Pyro model has shown to use so far, or
    ``None`` outside a traced Pyro run.

    Read from the whole handler stack: the dims of the active vectorized plates, and the
    batch dims of the values of the sample sites already recorded by an active trace. The
    second covers parameters that carry singleton dims up to the model's ``max_plate_nesting``
    without a plate being active (samples that ``Predictive`` conditions the model on, one by
    one, are shaped ``(1, ..., 1) + site shape``), and parameters sampled in plates that have
    been exited. The whole stack is read, not :func:`pyro.poutine.runtime.get_plates`, from
    which a ``poutine.block`` hides outer plates: the guide runs the model blocked inside
    Pyro's particle and sample plates.
    """
    traces = [handler.trace for handler in _PYRO_STACK if isinstance(handler, TraceMessenger)]
    if not traces:
        return None
    plates = [h.dim for h in _PYRO_STACK if isinstance(h, IndepMessenger) and h.dim is not None]
    rank = -min(plates, default=0)
    for trace in traces:
        for site in trace.nodes.values():
            value = site.get("value")
            if site["type"] == "sample" and isinstance(value, torch.Tensor):
                rank = max(rank, value.dim() - len(getattr(site["fn"], "event_shape", ())))
    return rank


def _check_added_dims(name, shape, out_batch, x):
    """Inside a traced Pyro run, reject an output whose batch has a leading size-1 dim that
    nothing explains.

    Output batch dims may exceed the probe ``x``'s (``x`` is built from ``init`` and ``times``
    only): parameters sampled in plates, or under Pyro's particle and sample plates, carry
    their plate dims (``theta`` ``(S, 1, 1)`` under ``Predictive(parallel=True)``; ``(N, 1)``
    in a plate of ``N`` series). Those dims have a plate's size, or lie within the dims that
    the active plates and the model's sample sites so far use (:func:`_explained_rank`). A
    leading dim of size 1 beyond both is no plate's: broadcasting never needs it, and it gives
    the path a spurious batch dim left of the model's plates, where Pyro puts its particle and
    sample dims (a ``num_samples x num_samples`` broadcast under
    ``Predictive(parallel=True)``). The usual cause is a scalar parameter given a dim
    (``beta[..., None]``) and combined with a state component ``x[..., i]``, which has none.

    Outside a traced run (plain torch code, a model called without handlers) nothing tells
    such a dim from a batch of one (parameters for a single series), and it does no harm
    there: it is batch.
    """
    if len(out_batch) < x.dim() or out_batch[0] != 1:
        return  # no leading size-1 dim beyond x's batch: nothing to explain
    rank = _explained_rank()
    if rank is None:
        return
    explained = max(x.dim() - 1, rank)
    added = len(out_batch) - explained
    if added <= 0:
        return
    ones = next((i for i, size in enumerate(out_batch[:added]) if size != 1), added)
    raise ValueError(
        f"{name} returned shape {tuple(shape)} for x of shape {tuple(x.shape)}: it added "
        f"{ones} leading batch dim(s) of size 1 beyond the {explained} batch dim(s) that x, "
        f"the active plates and the model's sample sites so far explain. Such a dim gives the "
        f"path a spurious batch dim, left of every plate, that breaks vectorized sampling "
        f"(Predictive(parallel=True), vectorize_particles=True). It typically comes from a "
        f"scalar parameter given a dim and multiplied by a component of x: for a scalar beta "
        f"write beta * x[..., i] (or keep x's dim with x[..., i:i + 1]); use beta[..., None] "
        f"only when beta has batch dims (plates, samples). validate_args=False skips this check"
    )


__all__ = [
    "EulerMaruyama",
    "Residuals",
    "SimulatedSteps",
    "at_all_steps",
    "draw_init",
    "euler_step",
    "simulate",
]
