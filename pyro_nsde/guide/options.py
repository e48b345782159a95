"""The options of a :class:`~pyro_nsde.GirsanovGuide`, checked once when the guide is built."""

import dataclasses

from ..posterior.controls import check_covariance
from ..posterior.girsanov import ESTIMATORS
from ..sde.checks import check_bool, check_choice, check_positive_int
from .latents import LATENT_FAMILIES

#: The named path families of ``control`` (besides a module or callable ``u(t, x, context)``).
CONTROL_NAMES = ("affine", "linear", "mlp")
#: Where the coefficients of affine and linear controls start (``init_path``).
PATH_INITS = ("laplace", "prior")
#: How those coefficients follow the parameters drawn with the path (``conditional``).
CONDITIONALS = ("auto", "kalman", "taylor", None)


@dataclasses.dataclass(frozen=True)
class GuideOptions:
    """The guide's arguments (see :class:`~pyro_nsde.GirsanovGuide`), checked."""

    control: object = "mlp"
    init_scale: float = 0.1
    estimator: str = "girsanov"
    covariance: str = "prior"
    latents: str = "normal"
    latent_rank: int | None = None
    conditional: str | None = "auto"
    init_path: str = "laplace"
    refresh_every: int | None = 10
    hidden_dims: tuple = (64, 64)
    checkpoint_every: int | None = None
    compile_step: bool = False

    def __post_init__(self):
        check_choice("estimator", self.estimator, ESTIMATORS)
        if not (isinstance(self.init_scale, (int, float)) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, but got {self.init_scale!r}")
        specs = self.control.values() if isinstance(self.control, dict) else [self.control]
        for spec in specs:
            if not (spec in CONTROL_NAMES or callable(spec)):
                raise ValueError(
                    f"control must be one of {CONTROL_NAMES}, a callable u(t, x, context) or "
                    f"a dict of these, but got {spec!r}"
                )
        check_covariance(self.covariance)
        check_choice("latents", self.latents, LATENT_FAMILIES)
        check_positive_int("latent_rank", self.latent_rank, optional=True)
        if self.latent_rank is not None and self.latents != "lowrank":
            raise ValueError("latent_rank is only used with latents='lowrank'")
        check_choice("init_path", self.init_path, PATH_INITS)
        check_choice("conditional", self.conditional, CONDITIONALS)
        check_bool("compile_step", self.compile_step)
        check_positive_int("refresh_every", self.refresh_every, optional=True)
        object.__setattr__(self, "init_scale", float(self.init_scale))
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))

    @classmethod
    def from_arguments(cls, arguments: dict) -> "GuideOptions":
        """The options among a guide constructor's ``locals()``."""
        return cls(**{field.name: arguments[field.name] for field in dataclasses.fields(cls)})

    def control_for(self, name: str):
        """The control spec of path site ``name``."""
        if not isinstance(self.control, dict):
            return self.control
        if name not in self.control:
            raise ValueError(f"control dict has no entry for path site {name!r}")
        return self.control[name]


__all__ = ["CONDITIONALS", "CONTROL_NAMES", "PATH_INITS", "GuideOptions"]
