"""The options of a :class:`~pyro_nsde.GirsanovGuide`: checked once when the guide is built, and
the ``"auto"`` defaults resolved once from the model's prototype trace (:func:`resolve`).

The rule of ``"auto"`` (the configuration the documentation recommends):

- ``control``: ``"linear"`` (a Gauss–Markov path posterior, sampled by a parallel scan) where the
  prior admits it — a diffusion that does not depend on the state, or a diagonal one, and a
  drift affine in the state in the directions the noise does not reach; otherwise ``"affine"``
  without an encoder and ``"mlp"`` with one;
- ``covariance``: ``"full"`` with affine and linear controls (the exact posterior of a linear
  SDE is then in the family), ``"diagonal"`` with network controls;
- ``latents``: ``"hierarchical"`` when some latent sites share a path's plate (each series'
  own parameters, each one value per series: :mod:`~pyro_nsde.guide.hierarchical`); else
  ``"multivariate"`` for up to :data:`MAX_MULTIVARIATE` unconstrained coordinates outside
  subsampled plates (the rates and noise scales of an SDE are strongly correlated), else
  ``"normal"``;
- ``conditional``: ``"kalman"``: for affine and linear controls the path's law follows every
  draw of the parameters (and the model's current parameters) through the Kalman smoother of
  the model linearized about the path's Laplace fit;
- ``init_latents``: ``"laplace"`` when every path follows its parameters through a Kalman
  smoother and the family is multivariate, without sites in the paths' plates and outside
  subsampled plates (the other latent sites start at the Laplace approximation of their
  marginal posterior, :mod:`~pyro_nsde.guide.global_laplace`; with each series' own
  parameters among them that mode is at a population spread of zero), or hierarchical,
  subsampled or not (each series' likelihood on its nodes, the hyperparameters at their
  marginal Laplace approximation, :mod:`~pyro_nsde.guide.population_start`), else ``None``.
"""

import dataclasses
import warnings

from ..posterior.controls import GAINS, check_covariance
from ..posterior.gauss_markov import check_linear_family
from ..posterior.girsanov import ESTIMATORS
from ..sde.checks import check_bool, check_choice, check_positive_int
from ..sde.sites import is_subsampled, unwrap_path_distribution
from .hierarchical import local_sites, univariate
from .latents import LATENT_FAMILIES

#: The named path families of ``control`` (besides a module or callable ``u(t, x, context)``).
CONTROL_NAMES = ("affine", "linear", "mlp")
#: Where the coefficients of affine and linear controls start (``init_path``).
PATH_INITS = ("laplace", "prior")
#: How those coefficients follow the parameters drawn with the path (``conditional``).
CONDITIONALS = ("auto", "kalman", "taylor", None)
#: Where the family of the other latent sites starts (``init_latents``).
LATENT_INITS = ("auto", "laplace", None)
#: The warps of ``control="linear"`` (``warp``): none, or a monotone spline of each coordinate.
WARPS = (None, "spline")
#: ``latents="auto"`` is multivariate up to this many unconstrained coordinates.
MAX_MULTIVARIATE = 100


@dataclasses.dataclass(frozen=True)
class GuideOptions:
    """The guide's arguments (see :class:`~pyro_nsde.GirsanovGuide`), checked."""

    control: object = "auto"
    init_scale: float = 0.1
    estimator: str = "girsanov"
    covariance: str = "auto"
    gain: str = "full"
    latents: str = "auto"
    latent_rank: int | None = None
    conditional: str | None = "auto"
    init_path: str = "laplace"
    init_latents: str | None = "auto"
    refresh_every: int | None = 10
    hidden_dims: tuple = (64, 64)
    checkpoint_every: int | None = None
    compile_step: bool = False
    subsample_steps: int | None = None
    prior_starts: int = 0
    warp: str | None = None

    def __post_init__(self):
        check_choice("estimator", self.estimator, ESTIMATORS)
        if not (isinstance(self.init_scale, (int, float)) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, but got {self.init_scale!r}")
        specs = self.control.values() if isinstance(self.control, dict) else [self.control]
        for spec in specs:
            if not (spec in ("auto", *CONTROL_NAMES) or callable(spec)):
                raise ValueError(
                    f"control must be one of {('auto', *CONTROL_NAMES)}, a callable "
                    f"u(t, x, context) or a dict of these, but got {spec!r}"
                )
        if self.covariance != "auto":
            check_covariance(self.covariance)
        check_choice("gain", self.gain, GAINS)
        check_choice("latents", self.latents, ("auto", *LATENT_FAMILIES))
        check_positive_int("latent_rank", self.latent_rank, optional=True)
        if self.latent_rank is not None and self.latents != "lowrank":
            raise ValueError("latent_rank is only used with latents='lowrank'")
        check_choice("init_path", self.init_path, PATH_INITS)
        check_choice("conditional", self.conditional, CONDITIONALS)
        check_choice("init_latents", self.init_latents, LATENT_INITS)
        check_bool("compile_step", self.compile_step)
        check_positive_int("refresh_every", self.refresh_every, optional=True)
        check_positive_int("subsample_steps", self.subsample_steps, optional=True)
        if not (isinstance(self.prior_starts, int) and self.prior_starts >= 0):
            raise ValueError(f"prior_starts must be an int >= 0, but got {self.prior_starts!r}")
        check_choice("warp", self.warp, WARPS)
        if self.warp is not None and self.subsample_steps is not None:
            warnings.warn(
                "warp='spline' with subsample_steps: a steep warp makes a few steps of a path "
                "jumps, and their subsampled drift terms noisy; on the double-well system "
                "identification of benchmarks/accuracy/double_well.py the learned diffusion "
                "came out 20-27% too large. Train a warped guide on all steps, or subsample "
                "with the Gauss-Markov family (warp=None)",
                stacklevel=5,  # the GirsanovGuide(...) call
            )
        if self.estimator == "girsanov" and self.warp:
            # The model scores the warped path, not the chain the draw's record describes.
            object.__setattr__(self, "estimator", "stl")
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


def resolve(options: GuideOptions, trace, paths, others, *, encoded: bool, subsampled: bool):
    """The options with their ``"auto"`` values chosen for the model (see the module
    docstring): ``trace`` is the prototype trace, ``paths`` the path sites, ``others`` the
    other latent sites."""
    covariance = options.covariance
    controls = {}
    for name in paths:
        spec = options.control_for(name)
        if spec == "auto":
            prior, _ = unwrap_path_distribution(trace.nodes[name]["fn"])
            spec = _auto_control(prior, "full" if covariance == "auto" else covariance, encoded)
        controls[name] = spec
    coefficients = all(spec in ("affine", "linear") for spec in controls.values())
    if covariance == "auto":
        covariance = "full" if coefficients else "diagonal"
    latents = options.latents
    local = local_sites(trace, paths, others)
    if latents == "auto":
        size = sum(trace.nodes[name]["value"].numel() for name in others)
        frames = [f for name in others for f in trace.nodes[name]["cond_indep_stack"]]
        in_subsample = any(is_subsampled(frame) for frame in frames)
        latents = "multivariate" if size <= MAX_MULTIVARIATE and not in_subsample else "normal"
        if local and all(univariate(trace.nodes[name]["fn"]) for name in local):
            latents = "hierarchical"
    conditional = "kalman" if options.conditional == "auto" else options.conditional
    if options.warp is not None:
        _check_warp(controls, options.conditional)
        conditional = None
    init_latents = options.init_latents
    if init_latents == "auto":
        kalman = coefficients and conditional == "kalman" and options.init_path == "laplace"
        follows = kalman and not encoded
        joint = latents == "multivariate" and not subsampled and not local
        starts = latents == "hierarchical" or joint
        init_latents = "laplace" if follows and others and starts else None
    elif init_latents == "laplace" and local and latents != "hierarchical":
        raise ValueError(
            f"init_latents='laplace' with latents={latents!r} cannot start the sites "
            f"{local} in the plates of a path (each series' own parameters): the joint mode "
            f"of a population's members and its spread is at zero spread; use "
            f"latents='hierarchical' (the default for them) or init_latents=None"
        )
    if options.gain != "full" and any(spec != "linear" for spec in controls.values()):
        raise ValueError(
            f"gain={options.gain!r} is for control='linear' (the Gauss-Markov family), but the "
            f"controls are {controls}"
        )
    estimator = options.estimator
    if options.subsample_steps is not None and estimator == "girsanov":
        estimator = _subsampled_estimator(trace, controls)
    control = controls
    if not isinstance(options.control, dict) and len(set(controls.values())) == 1:
        control = next(iter(controls.values()))
    return dataclasses.replace(
        options,
        control=control,
        covariance=covariance,
        latents=latents,
        conditional=conditional,
        init_latents=init_latents,
        estimator=estimator,
    )


def _subsampled_estimator(trace, controls: dict) -> str:
    """The estimator in place of ``"girsanov"`` under :func:`~pyro_nsde.subsample_steps`,
    whose surrogate evaluates the prior's drift on every step (what subsampling saves):
    ``"stl"`` for Gauss–Markov paths whose diffusion does not depend on the state (its
    surrogate needs no drift, and its gradients are as quiet: benchmarks/accuracy/
    double_well.py; with a state network for a diffusion it would evaluate that network once
    more on every step), else ``"plain"`` (a ``PosteriorDriftControl`` is then simulated
    without the prior's drift: ``drift_free``)."""
    for name, spec in controls.items():
        prior, _ = unwrap_path_distribution(trace.nodes[name]["fn"])
        if spec != "linear" or prior.diffusion_depends_on_state():
            return "plain"
    return "stl"


def _check_warp(controls: dict, conditional) -> None:
    """A warp is for Gauss–Markov paths whose coefficients do not follow the parameters."""
    if any(spec != "linear" for spec in controls.values()):
        raise ValueError(
            f"warp is for control='linear' (a Gauss-Markov chain under the warp), but the "
            f"controls are {controls}"
        )
    if conditional not in ("auto", None):
        raise ValueError(
            f"conditional={conditional!r} is not available with a warp: the Kalman and "
            f"Taylor coefficients describe the path, not the chain under the warp; use "
            f"conditional=None (the default with a warp)"
        )


def _auto_control(prior, covariance: str, encoded: bool) -> str:
    """``"linear"`` where the Gauss–Markov family admits ``prior``, else ``"affine"`` (without
    an encoder) or ``"mlp"``."""
    state_dependent = prior.diffusion_depends_on_state()
    state_scale = prior.noise_type == "diagonal" and covariance != "prior"
    try:
        check_linear_family(prior, state_scale or not state_dependent, state_dependent)
    except ValueError:
        return "mlp" if encoded else "affine"
    return "linear"


__all__ = [
    "CONDITIONALS",
    "CONTROL_NAMES",
    "LATENT_INITS",
    "MAX_MULTIVARIATE",
    "PATH_INITS",
    "WARPS",
    "GuideOptions",
    "resolve",
]
