"""The control of each path site, built from its name (``"affine"``, ``"linear"``, ``"mlp"``) by
one factory, or taken as given (a module or callable ``u(t, x, context)``)."""

import dataclasses

import torch

from ..posterior.controls import AffineControl, ControlNet
from ..posterior.gauss_markov import LinearControl, check_linear_family
from ..sde.euler_maruyama import EulerMaruyama


@dataclasses.dataclass(frozen=True)
class ControlSettings:
    """What a named control is built with, besides the prior path law.

    :ivar str site: the path site's name (for messages).
    :ivar torch.Size batch: one set of per-step coefficients per batch element (series, at
        full plate sizes).
    :ivar str covariance: the increment covariance (``"prior"``, ``"diagonal"``, ``"full"``).
    :ivar str gain: the per-step gains of a linear control (``"full"``, ``"diagonal"``).
    :ivar int context_dim: the size of an encoder's context (0: none).
    :ivar int param_dim: how many unconstrained parameters the coefficients follow (0: none).
    :ivar float step_scale: optimizer step scale of coefficients that start at a fit.
    :ivar tuple hidden_dims: hidden widths of a network control.
    """

    site: str
    batch: torch.Size
    covariance: str
    gain: str = "full"
    context_dim: int = 0
    param_dim: int = 0
    step_scale: float = 1.0
    hidden_dims: tuple = (64, 64)

    def coefficient_options(self) -> dict:
        """The options of a :class:`~pyro_nsde.posterior.controls.PerStepCoefficients`."""
        return {
            "batch_shape": self.batch,
            "covariance": self.covariance,
            "context_dim": self.context_dim,
            "param_dim": self.param_dim,
            "step_scale": self.step_scale,
        }


def _affine(prior: EulerMaruyama, settings: ControlSettings):
    options = settings.coefficient_options()
    return AffineControl(prior.num_steps, prior.state_dim, prior.noise_dim, **options)


def _linear(prior: EulerMaruyama, settings: ControlSettings):
    covariance = settings.covariance
    state_dependent = prior.diffusion_depends_on_state()
    # With a learned covariance and diagonal noise, the step noise is a state-space factor:
    # the path's law then does not move with the diffusion's parameters.
    state_scale = prior.noise_type == "diagonal" and covariance != "prior"
    if state_dependent and covariance == "prior":
        raise ValueError(
            f"path site {settings.site!r} has a diffusion that depends on the state: "
            f"control='linear' then learns the step noise itself and needs "
            f"covariance='diagonal' or 'full'"
        )
    check_linear_family(prior, state_scale or not state_dependent, state_dependent)
    options = settings.coefficient_options()
    return LinearControl(
        prior.num_steps,
        prior.state_dim,
        prior.noise_dim,
        state_scale=state_scale,
        gain=settings.gain,
        **options,
    )


def _mlp(prior: EulerMaruyama, settings: ControlSettings):
    return ControlNet(
        prior.state_dim,
        prior.noise_dim,
        settings.context_dim,
        hidden_dims=settings.hidden_dims,
        covariance=settings.covariance,
    )


#: The named controls and how each is built from the prior and the settings.
CONTROL_FACTORIES = {"affine": _affine, "linear": _linear, "mlp": _mlp}


def make_control(spec, prior: EulerMaruyama, settings: ControlSettings, like: torch.Tensor):
    """The control of a path site: built from its name (on the dtype and device of ``like``),
    or ``spec`` itself when it is a module or callable."""
    if isinstance(spec, str):
        return CONTROL_FACTORIES[spec](prior, settings).to(like)
    return spec


__all__ = ["CONTROL_FACTORIES", "ControlSettings", "make_control"]
