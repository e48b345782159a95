r"""Encoders: amortized inference of many series' paths from their observations.

An encoder maps a model's arguments to a context for the guide's controls, per series and per
grid point: ``GirsanovGuide(model, control="mlp", encoder=GRUEncoder(...))`` then learns one
network ``u(t, x, c_k)`` for all series instead of a control per series, and the posterior of
``x_0`` from ``c_0`` (Li et al.'s latent SDE). The guide calls the encoder inside the path
sites' plates; encoders here pass the data through ``pyro.subsample`` there, so under
``pyro.plate(..., subsample_size=n)`` they encode the ``n`` series of the minibatch only.
"""

import torch
from torch import nn

from .series import GriddedSeries


def _series_argument(*args, **kwargs) -> GriddedSeries:
    """The first :class:`GriddedSeries` among the model's arguments."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, GriddedSeries):
            return value
    raise TypeError(
        "GRUEncoder found no GriddedSeries among the model's arguments; pass one, or give the "
        "encoder series_from=callable(*args, **kwargs) -> GriddedSeries"
    )


class GRUEncoder(nn.Module):
    r"""A GRU run backward in time over a grid of observations, giving a context per grid point:

        ``e_k = (y_k ⊙ m_k, m_k, h_k)``,   ``s_k = GRU(s_{k+1}, e_k)``,
        ``c_k = W s_k + b + V (e_k, e_{k+1})``,

    for ``k = K, ..., 0`` with ``s_{K+1} = 0``, where ``y_k`` are the values at grid point
    ``k``, ``m_k`` the 0/1 mask of observed coordinates (missing points enter as zeros with a
    zero mask, so their values never matter) and ``h_k = t_{k+1} - t_k`` the step to the next
    grid point (``0`` at the end; omitted with ``time_input=False``). Running backward, ``c_k``
    summarizes the observations at and after ``t_k``: what the posterior of the step from
    ``x_k`` needs, and at ``k = 0`` what the posterior of ``x_0`` needs. The linear skip
    ``V (e_k, e_{k+1})`` (``e_{K+1} = 0``) hands the control the next grid point's observation
    directly, which a GRU otherwise learns to carry only slowly.

    :param int obs_dim: ``D``, the number of observed coordinates.
    :param int context_dim: ``c``.
    :param int hidden_dim: the GRU's state size.
    :param int num_layers: stacked GRU layers.
    :param bool time_input: feed the step sizes ``h_k`` (useful on non-uniform grids).
    :param bool skip: add the linear skip ``V (e_k, e_{k+1})``.
    :param callable series_from: maps the model's arguments to a :class:`GriddedSeries`
        (default: the first ``GriddedSeries`` among them).

    ``forward(*model_args, **model_kwargs)`` returns the context ``(N, K+1, c)`` (``n``
    series under a subsampling plate); :meth:`encode` does the same from tensors.
    """

    def __init__(
        self,
        obs_dim: int,
        context_dim: int,
        hidden_dim: int = 64,
        *,
        num_layers: int = 1,
        time_input: bool = True,
        skip: bool = True,
        series_from=None,
    ):
        super().__init__()
        self.obs_dim = obs_dim
        self.context_dim = context_dim
        self.time_input = bool(time_input)
        self.series_from = _series_argument if series_from is None else series_from
        in_dim = 2 * obs_dim + int(self.time_input)
        self.gru = nn.GRU(in_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.out = nn.Linear(hidden_dim, context_dim)
        self.skip = nn.Linear(2 * in_dim, context_dim, bias=False) if skip else None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        series = self.series_from(*args, **kwargs)
        if not isinstance(series, GriddedSeries):
            raise TypeError(
                f"series_from must return a GriddedSeries, but returned {type(series).__name__}"
            )
        series = series.subsample()
        return self.encode(series.times, series.values, series.mask)

    def encode(self, times: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        """The context of each series at each grid point.

        :param torch.Tensor times: ``(K+1,)`` or ``batch + (K+1,)``.
        :param torch.Tensor values: ``batch + (K+1, D)``.
        :param torch.Tensor mask: ``batch + (K+1, D)``, boolean or 0/1.
        :returns: ``batch + (K+1, c)``.
        """
        if values.dim() < 2 or values.shape[-1] != self.obs_dim:
            raise ValueError(
                f"values must have shape batch + (K+1, {self.obs_dim}), "
                f"but got {tuple(values.shape)}"
            )
        if mask.shape != values.shape:
            raise ValueError(
                f"mask must have the shape of values {tuple(values.shape)}, "
                f"but got {tuple(mask.shape)}"
            )
        mask = mask.to(values.dtype)
        inputs = [values * mask, mask]
        if self.time_input:
            steps = torch.cat([times.diff(), times.new_zeros(times.shape[:-1] + (1,))], -1)
            inputs.append(steps.unsqueeze(-1).expand(values.shape[:-1] + (1,)))
        features = torch.cat(inputs, -1)
        batch, length = features.shape[:-2], features.shape[-2]
        flat = features.reshape((-1, length, features.shape[-1])).flip(-2)
        states, _ = self.gru(flat)
        context = self.out(states.flip(-2))
        if self.skip is not None:
            following = torch.cat([flat.flip(-2)[:, 1:], flat.new_zeros(flat[:, :1].shape)], -2)
            context = context + self.skip(torch.cat([flat.flip(-2), following], -1))
        return context.reshape(batch + (length, self.context_dim))


__all__ = ["GRUEncoder"]
