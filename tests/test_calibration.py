"""The main job against NUTS on its own model: the demo's fit of the Lotka–Volterra SDE, on the
lynx–hare data cut to 1900–1910, compared element by element with the NUTS reference stored in
``benchmarks/accuracy/nuts_reference.json`` (4 chains × 1000 draws on all latents, path
included). Issue 14's criterion: every rate, process-noise and observation-noise scale has its
mean within 0.5 NUTS sd of NUTS's and a posterior sd between 0.75 and 1.33 times NUTS's.
``benchmarks/accuracy/vi_vs_nuts.py`` runs the same comparison on the full demo and on
``pyro-nsde fit --model ou``."""

import sys
from pathlib import Path

import pytest

ACCURACY = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy"


@pytest.mark.slow
def test_demo_posterior_matches_nuts_on_a_shortened_series(monkeypatch):
    monkeypatch.syspath_prepend(str(ACCURACY))
    vi_vs_nuts = __import__("vi_vs_nuts")
    rows = vi_vs_nuts.compare("lv_short")
    table = "\n".join(
        f"{row.key}: VI {row.vi_mean:.4g} ± {row.vi_sd:.3g}, NUTS {row.nuts_mean:.4g} ± "
        f"{row.nuts_sd:.3g} (mean error {row.mean_error:.2f} sd, sd ratio {row.sd_ratio:.2f})"
        for row in rows
    )
    assert len(rows) == 8, table
    assert all(row.passed for row in rows), table
    sys.modules.pop("vi_vs_nuts", None)
