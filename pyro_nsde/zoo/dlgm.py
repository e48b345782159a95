r"""Deep latent Gaussian models in the diffusion limit: a generative model observed at the end.

Tzen & Raginsky's generative model runs a latent diffusion on ``[0, T]`` from a fixed point and
draws the data point from a decoder of the terminal state. With ``K`` Euler–Maruyama layers
(``h = T / K``, ``t_k = k h``):

    ``x_0`` fixed (or a learned point),
    ``x_{k+1} = x_k + h f(t_k, x_k) + g(t_k, x_k) ⊙ sqrt(h) ξ_k``,   ``ξ_k ~ N(0, I_d)``,
    ``y ~ p(y | D(x_K))``,

a deep latent Gaussian model with ``K`` stochastic layers that converges to the SDE
``dX = f dt + g dW`` as ``K → ∞``. Its amortized posterior is the Girsanov guide of
:class:`~pyro_nsde.GirsanovGuide` with a control ``u(t, x, c(y))`` driven by an encoder of the
data point (a static context ``c``):

    ``ΔW_k ~ N(h u_k, h S_k S_kᵀ)``,   ``(u_k, S_k) = control(t_k, x_k, c(y))``.

:class:`DLGM` is the model (:meth:`DLGM.model`, with data subsampling) and makes its guide
(:meth:`DLGM.guide`); :class:`VAE` is the one-layer baseline with a standard normal prior and
the same decoder; :func:`train` fits either by SVI on minibatches and :func:`importance_bounds`
gives, per data point, the ELBO and the importance-weighted (IWAE) estimate of ``log p(y)``
with the guide as proposal (from :func:`importance_log_weights`).

**References:**

[1] Belinda Tzen, Maxim Raginsky (2019), "Neural Stochastic Differential Equations: Deep
    Latent Gaussian Models in the Diffusion Limit", arXiv:1905.09883.
[2] Danilo J. Rezende, Shakir Mohamed, Daan Wierstra (2014), "Stochastic Backpropagation and
    Approximate Inference in Deep Generative Models", ICML.
[3] Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016), "Importance Weighted
    Autoencoders", ICLR.
[4] Diederik P. Kingma, Max Welling (2014), "Auto-Encoding Variational Bayes", ICLR.
"""

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.poutine.util import site_is_subsample
from torch import nn

from ..guide.guide import GirsanovGuide
from ..posterior.controls import ControlNet
from ..sde.checks import check_positive_int
from ..sde.euler_maruyama import EulerMaruyama
from .nn import DiffusionNet, DriftNet

DATA_PLATE = "data"


def _mlp(sizes, activation=nn.SiLU) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]), σ, ..., Linear(sizes[-2], sizes[-1])`` (no final σ)."""
    sizes = tuple(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes must name an input and an output size, but got {sizes}")
    layers = []
    for w_in, w_out in itertools.pairwise(sizes):
        layers += [nn.Linear(w_in, w_out), activation()]
    return nn.Sequential(*layers[:-1])


def bernoulli_likelihood(logits: torch.Tensor) -> dist.Distribution:
    """``p(y | logits) = Π_j Bernoulli(y_j; σ(logits_j))``, event ``(D,)``."""
    return dist.Bernoulli(logits=logits).to_event(1)


def _data_plate(images: torch.Tensor, subsample_size: int | None = None) -> pyro.plate:
    return pyro.plate(DATA_PLATE, images.shape[0], subsample_size=subsample_size, dim=-1)


def _check_images(images, obs_dim: int):
    if not isinstance(images, torch.Tensor) or images.dim() != 2 or images.shape[-1] != obs_dim:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (N, {obs_dim}), but got {shape}")


class ImageEncoder(nn.Module):
    r"""An MLP encoder of data points, ``c = E(y)``, for amortized guides.

    ``forward(images, subsample_size=None)`` takes the model's arguments, selects the current
    minibatch with ``pyro.subsample(images, event_dim=1)`` (so, called inside the data plate
    as :class:`~pyro_nsde.GirsanovGuide` does, it encodes only the subsampled points) and
    returns ``(n, c)``.

    :param int obs_dim: ``D``, the size of a data point.
    :param int context_dim: ``c``.
    :param tuple hidden_dims: hidden widths.
    """

    def __init__(self, obs_dim: int, context_dim: int, hidden_dims=(64,)):
        super().__init__()
        self.obs_dim, self.context_dim = obs_dim, context_dim
        self.net = _mlp((obs_dim, *hidden_dims, context_dim))

    def forward(self, images: torch.Tensor, subsample_size: int | None = None) -> torch.Tensor:
        _check_images(images, self.obs_dim)
        return self.net(pyro.subsample(images, event_dim=1))


class DLGM(nn.Module):
    r"""A ``K``-layer deep latent Gaussian model on ``[0, T]``, observed at the terminal state:

        ``x_0`` fixed,  ``x_{k+1} = x_k + h f(t_k, x_k) + g(t_k, x_k) ⊙ sqrt(h) ξ_k``,
        ``y_n ~ likelihood(D(x_K))``   for each data point ``n``.

    The latent path ``x`` (site ``"x"``, event ``(K+1, d)``) is an
    :class:`~pyro_nsde.EulerMaruyama` path with a known initial state, so the guide keeps
    ``x_0`` and only the increments are inferred. :meth:`model` registers every network with
    ``pyro.module`` (a learned ``x_0`` is a parameter, not a latent variable) under the name
    ``"dlgm"``, so two instances share names in Pyro's parameter store: clear the store
    (``pyro.clear_param_store()``) before training or evaluating another instance.

    :param int latent_dim: ``d``.
    :param int obs_dim: ``D``.
    :param int num_steps: ``K``, the number of layers.
    :param float end_time: ``T``; the step is ``h = T / K``.
    :param drift: ``f(t, x) -> (..., d)``; default a :class:`~pyro_nsde.zoo.nn.DriftNet` over
        ``(t, x)`` with ``hidden_dims`` (initially zero). The parameters of modules given here
        are trained with the model's; a plain function stays fixed.
    :param diffusion: ``g(t, x) > 0`` of shape ``(..., d)`` (diagonal noise), or a constant
        tensor ``(d,)``; default a :class:`~pyro_nsde.zoo.nn.DiffusionNet` over ``(t, x)``
        starting at ``g = 1``, so that the initial model has ``x_K ~ N(x_0, T I)`` whatever
        ``K``.
    :param decoder: ``D(x) -> (..., D)``, the likelihood's parameter; default an MLP
        ``d → decoder_dims → D``.
    :param callable likelihood: ``parameter -> Distribution`` with event ``(D,)``; default
        Bernoulli with logits (:func:`bernoulli_likelihood`).
    :param init: ``x_0`` ``(d,)`` (default zeros).
    :param bool learn_init: learn ``x_0`` as a parameter.
    :param tuple hidden_dims: hidden widths of the default drift.
    :param tuple decoder_dims: hidden widths of the default decoder.
    """

    def __init__(
        self,
        latent_dim: int,
        obs_dim: int,
        num_steps: int,
        *,
        end_time: float = 1.0,
        drift: Callable | None = None,
        diffusion: Callable | torch.Tensor | None = None,
        decoder: Callable | None = None,
        likelihood: Callable[[torch.Tensor], dist.Distribution] = bernoulli_likelihood,
        init: torch.Tensor | None = None,
        learn_init: bool = False,
        hidden_dims=(64, 64),
        decoder_dims=(64,),
    ):
        super().__init__()
        check_positive_int("latent_dim", latent_dim)
        check_positive_int("obs_dim", obs_dim)
        check_positive_int("num_steps", num_steps)
        if not end_time > 0:
            raise ValueError(f"end_time must be > 0, but got {end_time!r}")
        self.latent_dim, self.obs_dim, self.num_steps = latent_dim, obs_dim, num_steps
        self.register_buffer("times", torch.linspace(0.0, float(end_time), num_steps + 1))
        if drift is None:
            drift = DriftNet(latent_dim, hidden_dims, time_frequencies=(), linear_time=True)
        if diffusion is None:
            diffusion = DiffusionNet(
                latent_dim,
                hidden_dims=(32,),
                linear_time=True,
                coupled=True,
                init_scale=1.0,
                floor=0.01,
            )
        self.drift, self.diffusion = drift, diffusion
        self.decoder = _mlp((latent_dim, *decoder_dims, obs_dim)) if decoder is None else decoder
        self.likelihood = likelihood
        init = torch.zeros(latent_dim) if init is None else torch.as_tensor(init).clone()
        if init.shape != (latent_dim,):
            raise ValueError(f"init must have shape ({latent_dim},), but got {tuple(init.shape)}")
        if learn_init:
            self.init = nn.Parameter(init)
        else:
            self.register_buffer("init", init)

    def prior(self) -> EulerMaruyama:
        """The law of the latent path, event ``(K+1, d)``."""
        return EulerMaruyama(self.drift, self.diffusion, self.init, self.times)

    def model(self, images: torch.Tensor, subsample_size: int | None = None):
        """The Pyro model of ``images`` ``(N, D)``, subsampled ``subsample_size`` at a time."""
        _check_images(images, self.obs_dim)
        pyro.module("dlgm", self)
        with _data_plate(images, subsample_size):
            batch = pyro.subsample(images, event_dim=1)
            path = pyro.sample("x", self.prior())
            pyro.sample("y", self.likelihood(self.decoder(path[..., -1, :])), obs=batch)

    def guide(
        self,
        encoder: nn.Module,
        *,
        hidden_dims=(64,),
        covariance: str = "diagonal",
        estimator: str = "girsanov",
    ) -> GirsanovGuide:
        """The amortized Girsanov guide: ``control = ControlNet(d, context_dim=c)`` fed by
        ``encoder(images, subsample_size)`` ``(n, c)`` (e.g. an :class:`ImageEncoder`).

        The control's last layer gets PyTorch's default random initialization instead of
        :class:`~pyro_nsde.ControlNet`'s zeros: a guide that starts exactly at the prior
        carries no information about ``y``, and the decoder learns to ignore the latent
        first (on the digits of ``tutorials/dlgm_digits.py`` with ``K = 1``, 1000 steps: test
        ELBO -20.6 from zeros, -19.9 from a random start). One hidden layer (the default)
        trains faster than two in the same number of steps.

        :param nn.Module encoder: ``encoder(images, subsample_size) -> (n, c)`` with an
            integer attribute ``context_dim`` (``c``).
        :param tuple hidden_dims: hidden widths of the control network.
        :param str covariance: ``"prior"`` (the pure mean shift of Tzen & Raginsky),
            ``"diagonal"`` or ``"full"`` (a learned increment covariance ``S_k``).
        :param str estimator: see :class:`~pyro_nsde.GirsanovGuide`.
        """
        context_dim = getattr(encoder, "context_dim", None)
        if not isinstance(context_dim, int):
            raise TypeError(
                f"encoder must have an integer attribute context_dim, but "
                f"{type(encoder).__name__} has {context_dim!r}"
            )
        control = ControlNet(
            self.latent_dim,
            context_dim=context_dim,
            hidden_dims=hidden_dims,
            covariance=covariance,
        )
        control.head.reset_parameters()
        return GirsanovGuide(
            self.model,
            control=control,
            encoder=encoder,
            covariance=covariance,
            estimator=estimator,
            create_plates=_data_plate,
        )

    @torch.no_grad()
    def sample(self, num_samples: int):
        """Draw from the generative model: paths ``(S, K+1, d)`` and the likelihood's mean at
        their end points ``(S, D)`` (pixel probabilities for the Bernoulli likelihood)."""
        paths = self.prior().sample((num_samples,))
        return paths, self.likelihood(self.decoder(paths[..., -1, :])).mean


class VAE(nn.Module):
    r"""The one-layer baseline (Kingma & Welling; Rezende et al.):

        ``z ~ N(0, I_d)``,  ``y_n ~ likelihood(D(z_n))``;
        guide ``z_n ~ N(μ(y_n), diag σ(y_n)²)``,  ``(μ, softplus⁻¹ σ) = E(y_n)``,

    with an :class:`ImageEncoder` ``E`` of ``2d`` outputs.

    :param int latent_dim: ``d``.
    :param int obs_dim: ``D``.
    :param nn.Module decoder: as for :class:`DLGM` (default the same MLP).
    :param callable likelihood: as for :class:`DLGM`.
    :param tuple decoder_dims: hidden widths of the default decoder.
    :param tuple encoder_dims: hidden widths of the encoder.
    """

    def __init__(
        self,
        latent_dim: int,
        obs_dim: int,
        *,
        decoder: nn.Module | None = None,
        likelihood: Callable[[torch.Tensor], dist.Distribution] = bernoulli_likelihood,
        decoder_dims=(64,),
        encoder_dims=(64,),
    ):
        super().__init__()
        self.latent_dim, self.obs_dim = latent_dim, obs_dim
        self.decoder = _mlp((latent_dim, *decoder_dims, obs_dim)) if decoder is None else decoder
        self.likelihood = likelihood
        self.encoder = ImageEncoder(obs_dim, 2 * latent_dim, encoder_dims)
        self.register_buffer("prior_loc", torch.zeros(latent_dim))

    def _prior(self) -> dist.Distribution:
        return dist.Normal(self.prior_loc, 1.0).to_event(1)

    def model(self, images: torch.Tensor, subsample_size: int | None = None):
        """The Pyro model of ``images`` ``(N, D)``."""
        _check_images(images, self.obs_dim)
        pyro.module("vae_decoder", self.decoder)
        with _data_plate(images, subsample_size):
            batch = pyro.subsample(images, event_dim=1)
            z = pyro.sample("z", self._prior())
            pyro.sample("y", self.likelihood(self.decoder(z)), obs=batch)

    def guide(self, images: torch.Tensor, subsample_size: int | None = None):
        """The amortized mean-field normal guide."""
        pyro.module("vae_encoder", self.encoder)
        with _data_plate(images, subsample_size):
            out = self.encoder(images, subsample_size)
            loc, scale = out[..., : self.latent_dim], out[..., self.latent_dim :]
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(scale)).to_event(1))

    @torch.no_grad()
    def sample(self, num_samples: int):
        """Latents ``(S, d)`` from the prior and the likelihood's mean ``(S, D)``."""
        z = self._prior().sample((num_samples,))
        return z, self.likelihood(self.decoder(z)).mean


def train(
    model,
    guide,
    images: torch.Tensor,
    *,
    num_steps: int,
    batch_size: int,
    lr: float = 3e-3,
    final_lr: float | None = None,
    num_particles: int = 1,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fit ``guide`` (and the model's networks) by SVI on minibatches of ``images`` ``(N, D)``.

    Each step subsamples ``batch_size`` points (``model(images, subsample_size=batch_size)``);
    the loss is ``Trace_ELBO`` with ``ClippedAdam``, the learning rate decaying geometrically
    from ``lr`` to ``final_lr`` (default ``lr / 10``).

    :returns: the per-point loss ``-ELBO / N`` of every step (a minibatch estimate).
    """
    check_positive_int("num_steps", num_steps)
    if not (isinstance(batch_size, int) and 1 <= batch_size <= images.shape[0]):
        raise ValueError(
            f"batch_size must be an integer in [1, {images.shape[0]}], but got {batch_size!r}"
        )
    final_lr = lr / 10 if final_lr is None else final_lr
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": (final_lr / lr) ** (1 / num_steps)})
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
    svi = SVI(model, guide, optim, elbo)
    losses = []
    for step in range(num_steps):
        loss = svi.step(images, subsample_size=batch_size) / images.shape[0]
        losses.append(loss)
        if progress is not None:
            progress(step, loss)
    return losses


def _log_weights(model, guide, images, num_samples, particle_dim):
    """``log p(y_n, x_{s,n}) - log q(x_{s,n} | y_n)`` ``(S, N)`` from one vectorized draw."""
    particles = pyro.plate("_importance_particles", num_samples, dim=particle_dim)
    guide_trace = poutine.trace(particles(guide)).get_trace(images)
    replayed = poutine.replay(particles(model), trace=guide_trace)
    model_trace = poutine.trace(replayed).get_trace(images)
    log_w = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            frames = {f.name for f in site["cond_indep_stack"]}
            if DATA_PLATE not in frames:
                raise ValueError(
                    f"site {name!r} is outside the {DATA_PLATE!r} plate; per-point importance "
                    f"weights need every sample site to be local to one data point"
                )
            log_w = log_w + sign * site["log_prob"]
    return log_w.expand(num_samples, images.shape[0])


@torch.no_grad()
def importance_log_weights(
    model,
    guide,
    images: torch.Tensor,
    *,
    num_samples: int = 1000,
    chunk_size: int = 100,
    max_plate_nesting: int = 1,
) -> torch.Tensor:
    r"""Log importance weights of each data point with the guide as proposal:

        ``log w_{s,n} = log p(y_n, x_{s,n}) - log q(x_{s,n} | y_n)``,  ``x_{s,n} ~ q(· | y_n)``,

    shape ``(S, N)``, independent across ``s``. Model and guide are called as ``fn(images)``
    (no subsampling: every point is weighted) under a particle plate of ``chunk_size`` draws
    at a time; every sample site must be local to the ``"data"`` plate.

    :param torch.Tensor images: ``(N, D)``.
    :param int num_samples: ``S``.
    :param int chunk_size: draws per vectorized pass (memory ``∝ chunk_size · N``).
    :param int max_plate_nesting: the model's plate nesting (the particle plate goes left).
    """
    check_positive_int("num_samples", num_samples)
    check_positive_int("chunk_size", chunk_size)
    particle_dim = -(max_plate_nesting + 1)
    return torch.cat(
        [
            _log_weights(model, guide, images, min(chunk_size, num_samples - start), particle_dim)
            for start in range(0, num_samples, chunk_size)
        ]
    )


class ImportanceBounds(NamedTuple):
    """Per data point ``(N,)``, from ``S`` importance weights ``w_s = p(y, x_s) / q(x_s | y)``:

    ``elbo`` ``= (1/S) Σ_s log w_s`` (an unbiased estimate of the ELBO), ``log_likelihood``
    ``= log (1/S) Σ_s w_s`` (the IWAE bound: ``E[·] ≤ log p(y)``, increasing in ``S``, at
    least the ELBO, consistent as ``S → ∞``) and ``ess`` ``= (Σ w)² / Σ w²``, the effective
    sample size (``S`` for a perfect proposal).
    """

    elbo: torch.Tensor
    log_likelihood: torch.Tensor
    ess: torch.Tensor


def importance_bounds(model, guide, images: torch.Tensor, **kwargs) -> ImportanceBounds:
    """The per-point ELBO and IWAE estimate of ``log p(y_n)``, ``(N,)`` each, from
    :func:`importance_log_weights` (same keyword arguments)."""
    log_w = importance_log_weights(model, guide, images, **kwargs)
    total = log_w.logsumexp(0)
    return ImportanceBounds(
        elbo=log_w.mean(0),
        log_likelihood=total - math.log(log_w.shape[0]),
        ess=(2 * total - (2 * log_w).logsumexp(0)).exp(),
    )


__all__ = [
    "DLGM",
    "VAE",
    "ImageEncoder",
    "ImportanceBounds",
    "bernoulli_likelihood",
    "importance_bounds",
    "importance_log_weights",
    "train",
]
