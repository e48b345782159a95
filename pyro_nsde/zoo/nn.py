r"""Neural drift and diffusion networks over ``(t, x)``, for :class:`~pyro_nsde.EulerMaruyama`.

Both follow the calling convention of the path law: ``x`` is ``(..., d)`` and ``t`` broadcasts
against ``x[..., :1]`` (a 0-dim ``t``, as :mod:`torchsde` passes, is also accepted). The same
module therefore serves the sequential simulation (``x`` ``(*batch, d)``, ``t`` ``(1,)``), the
vectorized :meth:`~pyro_nsde.EulerMaruyama.log_prob` (``x`` ``(K, *batch, d)``, ``t``
``(K, 1, ..., 1)``) and :func:`pyro_nsde.analysis.predict.solve_sde`.

They are plain :class:`torch.nn.Module` s. Register them with Pyro in the model, as for any
network, so that SVI optimizes them::

    drift, diffusion = DriftNet(4), DiffusionNet(4)

    def model(data):
        pyro.module("drift", drift)
        pyro.module("diffusion", diffusion)
        with pyro.plate("series", data.num_series):
            x = pyro.sample("x", EulerMaruyama(drift, diffusion, init, data.times))
            ...

(``PyroModule[DriftNet](...)`` also works; it issues the ``pyro.param`` statements on every
call, i.e. on every step of a simulation, which costs time on long grids.)

**Keeping the diffusion away from zero.** :class:`DiffusionNet` returns ``floor + softplus(·)``,
so every diagonal entry (every singular value, for the general head) is at least ``floor`` and
the Euler–Maruyama density never degenerates. The floor only guards the numerics. The pull
towards small diffusions in variational EM comes from the guide: at a finite step the best
mean-shift guide cannot shrink the increment covariance as the exact posterior does, and the
KL it cannot remove grows with the diffusion. Remove it with a learned increment covariance
(``GirsanovGuide(..., covariance="diagonal")``) or a step small against
``observation variance / diffusion variance``, and fit the guide for a while before the
diffusion (a poor early guide drags it down too); see ``docs/neural_sdes.md`` for the
measurements.
"""

import itertools
import math

import torch
from torch import nn

from ..posterior.controls import ControlNet, inverse_softplus
from ..sde.noise import DiffusionFactor, check_noise_type


def _as_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor with a trailing singleton dim, broadcastable against ``x[..., :1]``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(1) if t.dim() == 0 else t


class TimeFeatures(nn.Module):
    r"""Fixed features of time:

        ``φ(t) = (t, sin(ω_1 t), ..., sin(ω_J t), cos(ω_1 t), ..., cos(ω_J t))``

    (the leading ``t`` only with ``linear=True``). Bounded features (the default: no ``t``)
    keep a network's input in range when it is evaluated past the training window, e.g. in a
    forecast.

    :param tuple frequencies: the angular frequencies ``ω_j``.
    :param bool linear: include ``t`` itself.

    ``forward(t)`` maps ``t`` ``(..., 1)`` to ``(..., F)`` with ``F = linear + 2 J``.
    """

    def __init__(self, frequencies=(1.0,), linear: bool = False):
        super().__init__()
        frequencies = torch.as_tensor(frequencies, dtype=torch.get_default_dtype())
        if frequencies.dim() != 1 or (frequencies.numel() == 0 and not linear):
            raise ValueError(
                f"frequencies must be a non-empty 1-D sequence (or linear=True), "
                f"but got {frequencies.tolist()}"
            )
        self.register_buffer("frequencies", frequencies)
        self.linear = bool(linear)
        self.num_features = int(self.linear) + 2 * frequencies.numel()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angle = t * self.frequencies.to(t.dtype)
        parts = [t] if self.linear else []
        return torch.cat(parts + [angle.sin(), angle.cos()], dim=-1)


def _time_features(frequencies, linear_time):
    """:class:`TimeFeatures`, or ``None`` when the network does not depend on ``t``."""
    if len(tuple(frequencies)) == 0 and not linear_time:
        return None
    return TimeFeatures(frequencies, linear_time)


class _TimeStateInput(nn.Module):
    """``σ(... σ(W_x x + W_t φ(t) + b))``: the hidden layers of a network over ``(t, x)``."""

    def __init__(self, state_dim, hidden_dims, time_features, activation):
        super().__init__()
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one hidden layer")
        self.time_features = time_features
        self.input_x = nn.Linear(state_dim, hidden_dims[0])
        self.input_t = None
        if time_features is not None:
            self.input_t = nn.Linear(time_features.num_features, hidden_dims[0], bias=False)
        layers = [activation()]
        for w_in, w_out in itertools.pairwise(hidden_dims):
            layers += [nn.Linear(w_in, w_out), activation()]
        self.body = nn.Sequential(*layers)

    def forward(self, t, x):
        hidden = self.input_x(x)
        if self.input_t is not None:
            hidden = hidden + self.input_t(self.time_features(_as_time(t, x)))
        return self.body(hidden)


def _check_state(x, state_dim, name):
    if x.dim() < 1 or x.shape[-1] != state_dim:
        raise ValueError(f"{name} expects x of shape (..., {state_dim}), but got {tuple(x.shape)}")


class DriftNet(nn.Module):
    r"""A multilayer perceptron drift ``f(t, x)``:

        ``f(t, x) = W_L σ(... σ(W_x x + W_t φ(t) + b_1) ...) + b_L``,

    with time features ``φ`` (:class:`TimeFeatures`). The last layer starts at zero, so the
    initial prior is driftless.

    :param int state_dim: ``d``.
    :param tuple hidden_dims: widths of the hidden layers.
    :param tuple time_frequencies: the frequencies of ``φ`` (default ``(1.0,)``:
        ``sin t, cos t``); ``()`` with ``linear_time=False`` for an autonomous drift.
    :param bool linear_time: include ``t`` itself in ``φ``.
    :param activation: the nonlinearity class (default :class:`torch.nn.SiLU`).

    ``forward(t, x)``: ``x`` ``(..., d)``, ``t`` broadcastable against ``x[..., :1]``;
    returns ``(..., d)``.
    """

    def __init__(
        self,
        state_dim: int,
        hidden_dims=(64, 64),
        *,
        time_frequencies=(1.0,),
        linear_time: bool = False,
        activation=nn.SiLU,
    ):
        super().__init__()
        self.state_dim = state_dim
        features = _time_features(time_frequencies, linear_time)
        self.net = _TimeStateInput(state_dim, tuple(hidden_dims), features, activation)
        self.head = nn.Linear(hidden_dims[-1], state_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _check_state(x, self.state_dim, "DriftNet")
        return self.head(self.net(t, x))


class DiffusionNet(nn.Module):
    r"""A neural diffusion ``G(t, x)`` with a floor, for ``noise_type="diagonal"`` or
    ``"general"``.

    ``noise_type="diagonal"``, ``coupled=False`` (default): one small network per coordinate,

        ``g_i(t, x) = floor + softplus(n_i(t, x_i))``,   shape ``(..., d)``,

    so ``g_i`` depends on ``x_i`` only: the noise is diagonal in :mod:`torchsde`'s sense (and
    commutative), as its Milstein and SRK schemes require (see :mod:`pyro_nsde.analysis.predict`).
    With ``coupled=True`` each ``g_i`` sees the whole state.

    ``noise_type="general"`` (``m = d``): a network gives ``B(t, x)`` ``(d, d)`` and

        ``G Gᵀ = floor² I + B Bᵀ``,  ``G`` lower-triangular,   shape ``(..., d, d)``,

    (computed stably by a QR decomposition), whose singular values all lie in
    ``[floor, sqrt(floor² + |B|²)]``: positive definite and well conditioned by construction.

    With ``hidden_dims=()`` there is no network: ``n_i`` (or ``B``) is a learned constant, so
    ``G`` is a learned diffusion scale ``(d,)`` (or ``(d, d)``) that depends on neither ``t``
    nor ``x``. The last layer (the constant) starts so that ``G = init_scale · I``.

    :param int state_dim: ``d``.
    :param str noise_type: ``"diagonal"`` or ``"general"``.
    :param tuple hidden_dims: widths of the hidden layers (of each per-coordinate network
        when uncoupled); ``()`` for a constant.
    :param tuple time_frequencies: frequencies of the time features (default ``()``: with
        ``linear_time=False`` the diffusion does not depend on ``t``).
    :param bool linear_time: include ``t`` itself in the time features.
    :param float floor: the lower bound ``> 0`` of the diagonal entries / singular values.
    :param float init_scale: the initial diffusion, ``> floor``.
    :param bool coupled: for ``"diagonal"``, whether each ``g_i`` depends on all of ``x``.
    :param activation: the nonlinearity class (default :class:`torch.nn.SiLU`).

    ``forward(t, x)``: ``x`` ``(..., d)``; returns ``(..., d)`` (diagonal) or
    ``(..., d, d)`` (general).
    """

    def __init__(
        self,
        state_dim: int,
        noise_type: str = "diagonal",
        hidden_dims=(32,),
        *,
        time_frequencies=(),
        linear_time: bool = False,
        floor: float = 1e-2,
        init_scale: float = 0.5,
        coupled: bool = False,
        activation=nn.SiLU,
    ):
        super().__init__()
        check_noise_type(noise_type)
        if noise_type not in ("diagonal", "general"):
            raise ValueError(
                f"DiffusionNet supports noise_type 'diagonal' or 'general', but got {noise_type!r}"
            )
        if not floor > 0:
            raise ValueError(f"floor must be > 0, but got {floor!r}")
        if not init_scale > floor:
            raise ValueError(f"init_scale must be > floor = {floor}, but got {init_scale!r}")
        self.state_dim = state_dim
        self.noise_type = noise_type
        self.floor = float(floor)
        self.init_scale = float(init_scale)
        self.coupled = bool(coupled) or noise_type == "general"
        hidden_dims = tuple(hidden_dims)
        features = _time_features(time_frequencies, linear_time)
        d = state_dim
        if noise_type == "diagonal":
            start = torch.full((d,), inverse_softplus(self.init_scale - self.floor))
        else:
            start = math.sqrt(self.init_scale**2 - self.floor**2) * torch.eye(d).reshape(-1)
        self.net = self.head = None
        if not hidden_dims:
            if features is not None:
                raise ValueError("a constant DiffusionNet (hidden_dims=()) takes no time features")
            self.constant = nn.Parameter(start)
        elif not self.coupled:
            self.net = _PerCoordinateNet(d, hidden_dims, features, activation)
            with torch.no_grad():
                self.net.bias_out.copy_(start)
        else:
            self.net = _TimeStateInput(d, hidden_dims, features, activation)
            self.head = nn.Linear(hidden_dims[-1], start.numel())
            nn.init.zeros_(self.head.weight)
            with torch.no_grad():
                self.head.bias.copy_(start)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _check_state(x, self.state_dim, "DiffusionNet")
        if self.net is None:
            raw = self.constant.expand(x.shape[:-1] + self.constant.shape)
        elif self.head is None:
            raw = self.net(t, x)
        else:
            raw = self.head(self.net(t, x))
        if self.noise_type == "diagonal":
            return self.floor + nn.functional.softplus(raw)
        return _floored_factor(raw.reshape(raw.shape[:-1] + (self.state_dim,) * 2), self.floor)


def _floored_factor(b: torch.Tensor, floor: float) -> torch.Tensor:
    """The lower-triangular ``G`` with positive diagonal and ``G Gᵀ = floor² I + B Bᵀ``.

    From the QR decomposition ``[Bᵀ; floor I] = Q R``: ``Rᵀ R = B Bᵀ + floor² I``, so
    ``G = Rᵀ`` (rows of ``R`` sign-flipped to a positive diagonal). This never squares ``B``,
    so it stays accurate where a Cholesky factorization of ``floor² I + B Bᵀ`` would fail in
    single precision.
    """
    d = b.shape[-1]
    eye = torch.eye(d, dtype=b.dtype, device=b.device).expand(b.shape)
    r = torch.linalg.qr(torch.cat([b.transpose(-1, -2), floor * eye], -2), mode="r").R
    sign = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(b.dtype)
    return (r * sign.unsqueeze(-1)).transpose(-1, -2)


class PosteriorDriftControl(nn.Module):
    r"""A control given by the posterior drift it produces, for neural SDEs:

        ``u(t, x, c) = G(t, x)⁻¹ (v(t, x, c) - f(t, x))``,

    where ``f`` and ``G`` are the model's drift and diffusion and ``v`` is a network (a
    :class:`~pyro_nsde.ControlNet` with ``d`` outputs, whose context is ``c`` and, if
    ``time_frequencies`` are given, the time features ``φ(t)`` of :class:`TimeFeatures`). The
    posterior then has drift ``f + G u = v`` whatever ``f`` is, as in Li et al.'s latent SDE,
    whose posterior drift is a network of its own. The per-step KL
    ``½ h |G⁻¹(v - f)|²`` depends on ``f`` directly, so a learned prior drift is pulled
    straight towards the posterior's. With a plain control (``v = f + G u``) a change of ``f``
    moves the posterior paths too, and ``f`` learns only through them: on the double-well
    system identification of ``tests/test_sysid.py`` (256 series, 180 SVI steps) the learned
    drift's relative error is 0.21 with this control and 0.84 with a plain
    :class:`~pyro_nsde.ControlNet` of the same size.

    Inside :class:`~pyro_nsde.GirsanovGuide` (or
    :meth:`~pyro_nsde.EulerMaruyama.girsanov`) ``f`` and ``G`` are the values of the prior
    at the path site, which the simulator evaluates once per step for the Euler–Maruyama update
    anyway (``uses_prior = True``: they arrive as ``prior=(f, G)``), so the control adds only the
    cost of ``v`` and of solving with ``G``. The ``drift`` and ``diffusion`` given here are used
    when the control is called on its own; pass the model's. They are referenced, not owned, so
    the guide does not register their parameters a second time. The noise must have ``m = d``
    (``"diagonal"``, or a square ``"general"``/``"additive"`` ``G``).

    :param callable drift: the model's drift ``f(t, x)``.
    :param diffusion: the model's diffusion, a callable ``G(t, x)`` or a tensor.
    :param int state_dim: ``d``.
    :param int context_dim: the size of the encoder's context (0 for none).
    :param tuple hidden_dims: hidden widths of ``v``.
    :param str covariance: ``"prior"``, ``"diagonal"`` or ``"full"``; with the last two the
        control returns ``(u, S)`` as :class:`~pyro_nsde.ControlNet` does.
    :param str noise_type: the model's noise type (default: ``diffusion.noise_type`` if it
        has one, else ``"diagonal"``).
    :param tuple time_frequencies: frequencies of time features for ``v`` (default ``()``:
        ``v`` sees ``t`` only as the raw input of :class:`~pyro_nsde.ControlNet`). Features
        such as ``(1, 2, 4, 8)`` let ``v`` follow oscillating posteriors in far fewer steps.

    **References:**

    [1] Xuechen Li, Ting-Kam Leonard Wong, Ricky T. Q. Chen, David Duvenaud (2020), "Scalable
        Gradients for Stochastic Differential Equations", AISTATS.
    """

    def __init__(
        self,
        drift,
        diffusion,
        state_dim: int,
        context_dim: int = 0,
        hidden_dims=(64, 64),
        covariance: str = "prior",
        noise_type: str | None = None,
        time_frequencies=(),
    ):
        super().__init__()
        if not callable(drift):
            raise TypeError(f"drift must be callable f(t, x), but got {type(drift).__name__}")
        if noise_type is None:
            noise_type = getattr(diffusion, "noise_type", "diagonal")
        if check_noise_type(noise_type) == "scalar":
            raise ValueError("PosteriorDriftControl needs noise_dim == state_dim, not 'scalar'")
        self.noise_type = noise_type
        self.time_features = _time_features(time_frequencies, False)
        num_features = 0 if self.time_features is None else self.time_features.num_features
        self.net = ControlNet(
            state_dim, state_dim, context_dim + num_features, hidden_dims, covariance
        )
        self.covariance = self.net.covariance
        self._prior = (drift, diffusion)  # a tuple: referenced, not registered as submodules

    uses_prior = True

    def forward(
        self,
        t: torch.Tensor,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        prior: tuple | None = None,
    ):
        """``u`` ``(..., d)`` (or ``(u, S)``) at ``x`` ``(..., d)``; ``prior``: the values
        ``(f(t, x), G(t, x))`` if already known, else they are evaluated here."""
        v, scale = self.posterior_drift(t, x, context)
        if prior is None:
            drift, diffusion = self._prior
            f, g = drift(t, x), diffusion(t, x) if callable(diffusion) else diffusion
        else:
            f, g = prior
        if self.noise_type != "diagonal" and g.shape[-1] != g.shape[-2]:
            raise ValueError(
                f"PosteriorDriftControl needs a square diffusion (m == d), "
                f"but got shape {tuple(g.shape)}"
            )
        u = DiffusionFactor(self.noise_type, g).whiten(v - f)
        return u if scale is None else (u, scale)

    def posterior_drift(self, t: torch.Tensor, x: torch.Tensor, context=None):
        """``(v, S)``: the posterior drift ``v(t, x, c)`` itself and the step scale (``None``
        for ``covariance="prior"``), without the prior's drift and diffusion. The simulator
        steps with ``v`` directly where the prior's drift is not wanted
        (:func:`~pyro_nsde.subsample_steps`: ``f + G G⁻¹ (v - f) = v``)."""
        if self.time_features is not None:
            features = self.time_features(_as_time(t, x))
            parts = [features] if context is None else [features, context]
            batch = torch.broadcast_shapes(x.shape[:-1], *(p.shape[:-1] for p in parts))
            context = torch.cat([p.expand(batch + p.shape[-1:]) for p in parts], -1)
        out = self.net(t, x, context)
        return (out, None) if self.covariance == "prior" else out


class _PerCoordinateNet(nn.Module):
    """``d`` independent MLPs ``n_i(t, x_i) -> R``, evaluated together with batched weights."""

    def __init__(self, state_dim, hidden_dims, time_features, activation):
        super().__init__()
        d, width = state_dim, hidden_dims[0]
        self.time_features = time_features
        bound = 1.0  # fan-in 1 for the x_i input, as nn.Linear(1, width) initializes
        self.weight_x = nn.Parameter(torch.empty(d, width).uniform_(-bound, bound))
        self.bias_in = nn.Parameter(torch.empty(d, width).uniform_(-bound, bound))
        self.input_t = None
        if time_features is not None:
            self.input_t = nn.Linear(time_features.num_features, d * width, bias=False)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for w_in, w_out in itertools.pairwise(hidden_dims):
            bound = 1.0 / math.sqrt(w_in)
            self.weights.append(nn.Parameter(torch.empty(d, w_in, w_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(d, w_out).uniform_(-bound, bound)))
        self.weight_out = nn.Parameter(torch.zeros(d, hidden_dims[-1]))
        self.bias_out = nn.Parameter(torch.zeros(d))
        self.activation = activation()

    def forward(self, t, x):
        d = x.shape[-1]
        hidden = x.unsqueeze(-1) * self.weight_x + self.bias_in  # (..., d, H)
        if self.input_t is not None:
            ht = self.input_t(self.time_features(_as_time(t, x)))
            hidden = hidden + ht.reshape(ht.shape[:-1] + (d, -1))
        hidden = self.activation(hidden)
        for weight, bias in zip(self.weights, self.biases, strict=True):
            hidden = self.activation(torch.einsum("...dh,dho->...do", hidden, weight) + bias)
        return (hidden * self.weight_out).sum(-1) + self.bias_out


__all__ = ["DiffusionNet", "DriftNet", "PosteriorDriftControl", "TimeFeatures"]
