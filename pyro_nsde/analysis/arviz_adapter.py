"""One face for both ArviZ lines.

ArviZ 0.x keeps a fit in an :class:`arviz.InferenceData` and computes with ``az.summary``,
``az.loo`` and ``az.plot_*``; ArviZ ≥ 1 keeps it in an :class:`xarray.DataTree` (built by
``arviz-base``) and computes with ``arviz-stats`` and ``arviz-plots``, under other names and
with other results (``ELPDData.elpd_loo`` became ``.elpd``, ``hdi_prob`` became ``ci_prob``,
``plot_ppc`` became ``plot_ppc_dist``). Every caller in the package goes through the functions
here, which give the same result on both lines:

- :func:`build`, :func:`from_datasets`: the container (``"InferenceData"`` or ``"DataTree"``);
- :func:`group_names`, :func:`group`, :func:`update_group`: reading and changing a group;
- :func:`summary`: the same columns, ``mean, sd, hdi_{lo}%, hdi_{hi}%`` (then ``mcse_mean,
  mcse_sd, ess_bulk, ess_tail, r_hat`` with ``kind="all"``), unrounded;
- :func:`loo`: a :class:`LOO` record; :func:`loo_pit`: the leave-one-out PIT values;
- :func:`plot_ppc`, :func:`plot_trace`: a matplotlib figure;
- :func:`to_netcdf`, :func:`from_netcdf`: one NetCDF-4 file, written with the ``h5netcdf``
  engine on both lines (a file from one line opens with the other).

Computations follow the installed line: with ArviZ 0.x a ``DataTree`` is converted to an
``InferenceData`` first; with ArviZ ≥ 1 (or without ArviZ, with ``arviz-base``) the data must be
a ``DataTree``.
"""

import dataclasses
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

CONTAINERS = ("InferenceData", "DataTree")
SAMPLE_DIMS = ("chain", "draw")
#: The NetCDF engine on both lines: ArviZ 0.x's default, and a dependency of pyro-nsde.
NETCDF_ENGINE = "h5netcdf"


def arviz_major(arviz_version: str | None = None) -> int | None:
    """The major version of ``arviz_version`` (default: the installed ArviZ; ``None`` if
    ArviZ is not installed)."""
    if arviz_version is None:
        try:
            arviz_version = version("arviz")
        except PackageNotFoundError:
            return None
    return int(arviz_version.split(".")[0])


def default_container(arviz_version: str | None = None) -> str:
    """``"InferenceData"`` with ArviZ 0.x, ``"DataTree"`` with ArviZ ≥ 1 or without ArviZ."""
    return "InferenceData" if arviz_major(arviz_version) == 0 else "DataTree"


def check_container(container: str | None) -> str:
    """``container``, or the installed line's default for ``None``."""
    container = default_container() if container is None else container
    if container not in CONTAINERS:
        raise ValueError(f"container must be one of {CONTAINERS} or None, but got {container!r}")
    if container == "InferenceData" and arviz_major() != 0:
        installed = "none" if arviz_major() is None else version("arviz")
        raise ValueError(f"container='InferenceData' needs ArviZ 0.x, but {installed} is installed")
    return container


def _is_datatree(data) -> bool:
    import xarray as xr

    return isinstance(data, xr.DataTree)


def _check_data(data):
    if _is_datatree(data) or (hasattr(data, "groups") and callable(data.groups)):
        return
    raise TypeError(
        f"expected an arviz.InferenceData or an xarray.DataTree, but got {type(data).__name__}"
    )


# --------------------------------------------------------------------------- containers


def load(container: str | None = None) -> None:
    """Import the ArviZ line behind ``container`` (and xarray) now, rather than at the first
    conversion: a few seconds that a timed fit should not count."""
    if check_container(container) == "InferenceData":
        import arviz  # noqa: F401
    else:
        import arviz_base  # noqa: F401


def build(groups: dict, *, coords: dict, dims: dict, container: str | None = None):
    """The ArviZ object of ``groups`` ``{group: {variable: array}}``.

    Arrays of the sampled groups are ``(chain, draw, *shape)``, those of ``observed_data``
    ``shape``; ``dims`` ``{variable: [dim names of shape]}``, ``coords`` ``{dim: labels}``.
    """
    container = check_container(container)
    if container == "InferenceData":
        import arviz

        return arviz.from_dict(**groups, coords=coords, dims=dims)
    try:
        import arviz_base
    except ImportError as error:
        raise ImportError(
            "container='DataTree' needs arviz-base (installed with ArviZ >= 1, or "
            "`pip install arviz-base` next to ArviZ 0.x)"
        ) from error
    return arviz_base.from_dict(groups, coords=coords, dims=dims, sample_dims=list(SAMPLE_DIMS))


def from_datasets(datasets: dict, container: str | None = None):
    """The ArviZ object with the groups ``{group: xarray.Dataset}``."""
    container = check_container(container)
    if container == "InferenceData":
        import arviz

        return arviz.InferenceData(**datasets)
    import xarray as xr

    return xr.DataTree.from_dict(datasets)


def group_names(data) -> list[str]:
    """The groups of ``data``, e.g. ``["posterior", "observed_data"]``."""
    _check_data(data)
    return list(data.children) if _is_datatree(data) else list(data.groups())


def group(data, name: str):
    """The :class:`xarray.Dataset` of the group ``name``."""
    names = group_names(data)
    if name not in names:
        kind = "DataTree" if _is_datatree(data) else "InferenceData"
        raise ValueError(f"the {kind} has no {name!r} group; it has {names}")
    return data[name].to_dataset() if _is_datatree(data) else getattr(data, name)


def update_group(data, name: str, *, coords: dict | None = None, attrs: dict | None = None):
    """Assign ``coords`` to the group ``name`` (as :meth:`xarray.Dataset.assign_coords`) and add
    ``attrs`` to its attributes, in place; returns ``data``."""
    dataset = group(data, name)
    if coords:
        dataset = dataset.assign_coords(coords)
    if attrs:
        dataset = dataset.copy()
        dataset.attrs.update(attrs)
    if _is_datatree(data):
        data[name] = dataset
    else:
        setattr(data, name, dataset)
    return data


def _for_computation(data):
    """``data`` in the container that the installed ArviZ computes with."""
    _check_data(data)
    major = arviz_major()
    if major == 0 and _is_datatree(data):
        import arviz

        return arviz.InferenceData.from_datatree(data)
    if major != 0 and not _is_datatree(data):
        raise TypeError(
            f"ArviZ {'>= 1' if major else '(not installed)'} computes on an xarray.DataTree, "
            f"but got {type(data).__name__}"
        )
    return data


# --------------------------------------------------------------------------- statistics


def summary(data, var_names=None, *, kind: str = "stats", hdi_prob: float = 0.94):
    """Posterior summary table (:class:`pandas.DataFrame`, one row per scalar, e.g. ``x[0, 1]``).

    Columns: ``mean, sd, hdi_{lo}%, hdi_{hi}%`` with ``lo = 50 (1 - hdi_prob)`` and
    ``hi = 100 - lo`` (the highest-density interval), then with ``kind="all"`` also
    ``mcse_mean, mcse_sd, ess_bulk, ess_tail, r_hat``. Values are not rounded.

    :param var_names: the variables of the posterior (default: all).
    :param str kind: ``"stats"`` or ``"all"``.
    :param float hdi_prob: in ``(0, 1)``.
    """
    if kind not in ("stats", "all"):
        raise ValueError(f"kind must be 'stats' or 'all', but got {kind!r}")
    if not 0 < hdi_prob < 1:
        raise ValueError(f"hdi_prob must be in (0, 1), but got {hdi_prob!r}")
    data = _for_computation(data)
    lower, upper = f"hdi_{100 * (1 - hdi_prob) / 2:g}%", f"hdi_{100 * (1 + hdi_prob) / 2:g}%"
    if not _is_datatree(data):
        import arviz

        table = arviz.summary(
            data, var_names=var_names, kind=kind, hdi_prob=hdi_prob, round_to="none"
        )
    else:
        import arviz_stats

        table = arviz_stats.summary(
            data, var_names=var_names, kind=kind, ci_prob=hdi_prob, ci_kind="hdi", round_to="none"
        )
        prefix = f"hdi{100 * hdi_prob:g}"
        table = table.rename(columns={f"{prefix}_lb": lower, f"{prefix}_ub": upper})
    columns = ["mean", "sd", lower, upper]
    if kind == "all":
        columns += ["mcse_mean", "mcse_sd", "ess_bulk", "ess_tail", "r_hat"]
    return table[columns].astype(float)


@dataclasses.dataclass(frozen=True)
class LOO:
    """Pareto-smoothed importance-sampling leave-one-out cross-validation (PSIS-LOO).

    :ivar float elpd: the expected log pointwise predictive density ``elpd_loo``.
    :ivar float se: its standard error.
    :ivar float p: the effective number of parameters ``p_loo``.
    :ivar np.ndarray pareto_k: the Pareto ``k̂`` of each observation, ``(n,)``.
    :ivar str report: ArviZ's table (what ``print`` shows).
    """

    elpd: float
    se: float
    p: float
    pareto_k: np.ndarray
    report: str

    def __str__(self) -> str:
        return self.report


def loo(data, var_name: str | None = None) -> LOO:
    """PSIS-LOO from the ``log_likelihood`` group (of the observed site ``var_name``; needed
    when there are several)."""
    data = _for_computation(data)
    if not _is_datatree(data):
        import arviz

        result = arviz.loo(data, var_name=var_name, pointwise=True)
        elpd, p = result.elpd_loo, result.p_loo
    else:
        import arviz_stats

        result = arviz_stats.loo(data, var_name=var_name, pointwise=True)
        elpd, p = result.elpd, result.p
    pareto_k = np.asarray(result.pareto_k, dtype=float).reshape(-1)
    return LOO(float(elpd), float(result.se), float(p), pareto_k, str(result))


def loo_pit(data, var_name: str) -> np.ndarray:
    """PSIS-LOO probability integral transforms ``p(ỹ_i ≤ y_i | y_{-i})`` of the observed
    site ``var_name``, one per observed scalar (flattened): the draws of
    ``posterior_predictive`` weighted by the smoothed leave-one-out importance weights of
    ``log_likelihood`` (``az.loo_pit`` on 0.x, ``arviz_stats.loo_pit`` on ≥ 1). Calibrated
    predictions give uniform values; the share within ``[(1 - a)/2, (1 + a)/2]`` is the coverage
    of the central ``a`` interval of each observation's predictive law given the others."""
    data = _for_computation(data)
    if not _is_datatree(data):
        import arviz

        values = arviz.loo_pit(data, y=var_name)
    else:
        import arviz_stats

        values = arviz_stats.loo_pit(data, var_names=var_name)[var_name]
    return np.asarray(values, dtype=float).reshape(-1)


# --------------------------------------------------------------------------- plots


def plot_ppc(data, var_names=None, *, num_samples: int = 50):
    """Posterior predictive check: kernel density estimates of ``num_samples`` predictive draws
    against that of the observed data (``az.plot_ppc`` on 0.x, ``plot_ppc_dist`` on ≥ 1).

    :returns: the matplotlib figure.
    """
    data = _for_computation(data)
    if not _is_datatree(data):
        import arviz

        axes = arviz.plot_ppc(data, var_names=var_names, num_pp_samples=num_samples)
        return np.asarray(axes).reshape(-1)[0].figure
    import arviz_plots

    plot = arviz_plots.plot_ppc_dist(
        data, var_names=var_names, kind="kde", num_samples=num_samples, backend="matplotlib"
    )
    return plot.viz["figure"].item()


def plot_trace(data, var_names=None):
    """Marginal densities (left) and traces (right) of the posterior, one row per variable
    (``az.plot_trace`` on 0.x, ``plot_trace_dist`` on ≥ 1).

    :returns: the matplotlib figure.
    """
    data = _for_computation(data)
    if not _is_datatree(data):
        import arviz

        return np.asarray(arviz.plot_trace(data, var_names=var_names)).reshape(-1)[0].figure
    import arviz_plots

    plot = arviz_plots.plot_trace_dist(data, var_names=var_names, backend="matplotlib")
    return plot.viz["figure"].item()


# --------------------------------------------------------------------------- files


def to_netcdf(data, path) -> Path:
    """Write ``data`` to the NetCDF-4 file ``path``, one HDF5 group per ArviZ group, numeric
    variables zlib-compressed (as ArviZ 0.x does), with the ``h5netcdf`` engine."""
    _check_data(data)
    path = Path(path)
    if not _is_datatree(data):
        data.to_netcdf(str(path), engine=NETCDF_ENGINE)
        return path
    encoding = {
        node.path: {
            name: {"zlib": True}
            for name, variable in node.to_dataset(inherit=False).variables.items()
            if np.issubdtype(variable.dtype, np.number) and variable.ndim > 0
        }
        for node in data.subtree
    }
    data.to_netcdf(path, engine=NETCDF_ENGINE, encoding=encoding)
    return path


def from_netcdf(path, container: str | None = None):
    """Read a file written by :func:`to_netcdf` (on either ArviZ line) into ``container``
    (default: that of the installed ArviZ), loaded into memory."""
    container = check_container(container)
    if container == "InferenceData":
        import arviz

        return arviz.from_netcdf(str(path), engine=NETCDF_ENGINE)
    import xarray as xr

    with xr.open_datatree(path, engine=NETCDF_ENGINE) as tree:
        return tree.load()
