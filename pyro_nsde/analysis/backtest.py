r"""Scoring forecasts of held-out observations, and the ARIMA baseline they are compared with.

For a held-out observation ``y`` and a central predictive interval ``[l, u]`` of level
``1 - α``, the interval score (Gneiting & Raftery 2007, eq. 43) is

    ``S_α(l, u; y) = (u - l) + (2/α) (l - y) 1{y < l} + (2/α) (y - u) 1{y > u}``,

lower is better: the width, plus a penalty for a miss that grows with its distance. The
continuous ranked probability score of a predictive law ``F`` is
``CRPS(F, y) = E|X - y| - ½ E|X - X'|`` (``X, X' ~ F`` independent): from draws it is computed
exactly for their empirical law; for a normal law in closed form. Coverage is the share of
held-out points inside the intervals.

The baseline is an automatically selected ARIMA in the manner of R's ``auto.arima`` (Hyndman &
Khandakar 2008), with statsmodels: the number of differences ``d ≤ 2`` by repeated KPSS tests at
the 5 % level, then the orders ``p, q ≤ 3`` (``p + q ≤ 4``) with the least AICc, a constant for
``d = 0`` and a drift for ``d = 1``; its predictive law of a future observation is normal.

**References:**

[1] Tilmann Gneiting, Adrian E. Raftery (2007), "Strictly Proper Scoring Rules, Prediction, and
    Estimation", JASA 102(477).
[2] Rob J. Hyndman, Yeasmin Khandakar (2008), "Automatic Time Series Forecasting: the forecast
    Package for R", Journal of Statistical Software 27(3).
"""

import math
import warnings

import numpy as np

#: The central interval levels that are scored.
LEVELS = (0.5, 0.9)


def interval_score(lower, upper, y, level: float) -> np.ndarray:
    """``S_α(l, u; y)`` for the central interval of level ``1 - α`` (elementwise)."""
    alpha = 1.0 - level
    lower, upper, y = (np.asarray(v, dtype=np.float64) for v in (lower, upper, y))
    below = np.clip(lower - y, 0.0, None)
    above = np.clip(y - upper, 0.0, None)
    return (upper - lower) + (2.0 / alpha) * (below + above)


def crps_draws(draws, y) -> np.ndarray:
    """The CRPS of the empirical law of ``draws`` ``(S, ...)`` at ``y`` ``(...)``."""
    draws = np.sort(np.asarray(draws, dtype=np.float64), axis=0)
    y = np.asarray(y, dtype=np.float64)
    num = draws.shape[0]
    first = np.abs(draws - y).mean(0)
    # E|X - X'| = 2 / S² Σ_i (2i - S - 1) x_(i) for sorted draws
    weights = (2 * np.arange(1, num + 1) - num - 1).reshape((-1,) + (1,) * (draws.ndim - 1))
    spread = 2.0 * (weights * draws).sum(0) / num**2
    return first - 0.5 * spread


def crps_normal(mean, sd, y) -> np.ndarray:
    """The CRPS of ``N(mean, sd²)`` at ``y`` (Gneiting & Raftery 2007, eq. 21)."""
    from scipy.stats import norm

    z = (np.asarray(y, dtype=np.float64) - mean) / sd
    return sd * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))


def scores(lower: dict, upper: dict, crps, y) -> dict:
    """Coverage and mean interval score per level, and the mean CRPS, over the held-out points
    ``y`` that are present (``lower``/``upper``: ``{level: array}`` like ``y``)."""
    y = np.asarray(y, dtype=np.float64)
    present = ~np.isnan(y)
    result = {"points": int(present.sum())}
    for level in LEVELS:
        low, high = np.asarray(lower[level])[present], np.asarray(upper[level])[present]
        inside = (y[present] >= low) & (y[present] <= high)
        result[f"coverage_{round(100 * level)}"] = float(inside.mean())
        score = interval_score(low, high, y[present], level)
        result[f"interval_score_{round(100 * level)}"] = float(score.mean())
    result["crps"] = float(np.asarray(crps)[present].mean())
    return result


def differences(values: np.ndarray, max_d: int = 2) -> int:
    """The number of differences that make ``values`` level-stationary by repeated KPSS tests
    at the 5 % level (as ``auto.arima``)."""
    from statsmodels.tsa.stattools import kpss

    series = values[~np.isnan(values)]
    for d in range(max_d + 1):
        if len(series) < 8 or np.ptp(series) == 0:
            return d
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_value = kpss(series, regression="c", nlags="auto")[1]
        if p_value >= 0.05:
            return d
        series = np.diff(series)
    return max_d


def stationary(values: np.ndarray, level: float = 0.05) -> bool:
    """Whether both tests find ``values`` (``NaN`` missing) level-stationary at ``level``: the
    KPSS test (null: stationary) does not reject and the augmented Dickey–Fuller test (null: a
    unit root; a constant, lags by AIC) rejects. Where the two disagree the data cannot tell;
    :func:`~pyro_nsde.app.cli.choose_model` then forecasts with the trend model, whose loss on
    a stationary series is the smaller one (see its docstring). A series too short for the
    Dickey–Fuller regression is judged by the KPSS test alone."""
    from statsmodels.tsa.stattools import adfuller

    series = values[~np.isnan(values)]
    if differences(series, max_d=1) > 0:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_value = adfuller(series, regression="c", autolag="AIC")[1]
    except (ValueError, np.linalg.LinAlgError):
        return True
    return bool(p_value < level)


def auto_arima(values, max_order: int = 3, max_total: int = 4):
    """The ARIMA of the module docstring fitted to ``values`` ``(n,)`` (``NaN`` missing): a
    statsmodels results object (``get_forecast`` gives the predictive law)."""
    from statsmodels.tsa.arima.model import ARIMA

    values = np.asarray(values, dtype=np.float64)
    d = differences(values)
    trend = {0: "c", 1: "t"}.get(d, "n")
    best, best_aicc = None, math.inf
    for p in range(max_order + 1):
        for q in range(max_order + 1):
            if p + q > max_total:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    result = ARIMA(values, order=(p, d, q), trend=trend).fit()
                except (ValueError, np.linalg.LinAlgError):
                    continue
            if np.isfinite(result.aicc) and result.aicc < best_aicc:
                best, best_aicc = result, result.aicc
    return best


def arima_forecast(values, horizon: int):
    """``(mean, sd, order)``: the normal predictive law of the next ``horizon`` observations
    of ``values`` under :func:`auto_arima`."""
    result = auto_arima(values)
    predicted = result.get_forecast(horizon)
    mean = np.asarray(predicted.predicted_mean, dtype=np.float64)
    sd = np.sqrt(np.asarray(predicted.var_pred_mean, dtype=np.float64))
    return mean, sd, result.model.order


__all__ = [
    "LEVELS",
    "arima_forecast",
    "auto_arima",
    "crps_draws",
    "crps_normal",
    "differences",
    "interval_score",
    "scores",
    "stationary",
]
