"""The analysis of a fit: ArviZ conversion (:func:`to_inference_data`) and the ArviZ functions
that work on both ArviZ lines, importance sampling, variational diagnostics, forecasts,
prediction with torchsde's solvers, and plots (:mod:`pyro_nsde.analysis.plots`)."""

from .arviz_adapter import (
    LOO,
    from_netcdf,
    loo,
    loo_pit,
    plot_ppc,
    plot_trace,
    summary,
    to_netcdf,
)
from .diagnostics import VariationalDiagnostics, pareto_khat, variational_diagnostics
from .forecast import forecast, forecast_observations, forecast_table
from .inference_data import to_inference_data
from .predict import predictive_paths, solve_sde

__all__ = [
    "LOO",
    "VariationalDiagnostics",
    "forecast",
    "forecast_observations",
    "forecast_table",
    "from_netcdf",
    "loo",
    "loo_pit",
    "pareto_khat",
    "plot_ppc",
    "plot_trace",
    "predictive_paths",
    "solve_sde",
    "summary",
    "to_inference_data",
    "to_netcdf",
    "variational_diagnostics",
]
