"""The benchmark scripts run end to end (tiny sizes) and print what issues 6 and 15 ask for.

No timing is asserted: only that every implementation is timed (the parallel-in-time rows of
issue 15 included), that the objectives of the sequential ones agree at a common
initialization (the script's sanity check against the plain PyTorch loop), and that memory
is reported.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
IMPLEMENTATIONS = [
    "plain-loop",
    "pyro-nsde",
    "pyro-nsde-compiled",
    "pyro-nsde-diagonal",
    "pyro-nsde-full",
    "torchsde",
    "naive-pyro",
    "pyro-nsde-linear",
    "pyro-nsde-linear-series",
    "pyro-nsde-subsampled",
    "drift-floor",
    "drift-floor-blocked",
]


def run_script(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(output, prefix):
    rows = [line for line in output.splitlines() if line.startswith(prefix)]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_bench_quick_times_every_implementation_on_one_objective():
    output = run_script("bench.py", "--quick", "--breakdown")
    assert (
        "| K | B | d | implementation | median ms/iter | IQR ms | × plain loop | speed-up "
        "| peak MB |"
    ) in output
    rows = table_rows(output, "| 20 | 8 | 2 |")
    assert [row[3] for row in rows] == IMPLEMENTATIONS
    for _, _, _, name, median, iqr, ratio, speed_up, memory in rows:
        assert float(median) > 0 and float(iqr) >= 0 and float(ratio) > 0, name
        # The ratio is printed to 2 decimals: compare 1 / speed-up with it up to that rounding.
        inverse = 1 / float(speed_up.rstrip("×"))
        assert abs(inverse - float(ratio)) <= 0.005 + 0.05 * inverse, name
        assert float(memory) >= 0, name
    assert rows[0][6] == "1.00" and rows[0][7] == "1.00×"
    assert "sanity: all objectives agree with plain-loop" in output
    # the Gauss–Markov guides have an ELBO of their own (printed, not compared); the floor none
    for name in ("pyro-nsde-linear", "pyro-nsde-linear-series", "pyro-nsde-subsampled"):
        assert any(
            line.split()[:1] == [name] and "another variational family" in line
            for line in output.splitlines()
        ), name
    for name in ("drift-floor", "drift-floor-blocked"):
        assert not any(line.split()[:1] == [name] for line in output.splitlines()), name
    phases = [row for name in IMPLEMENTATIONS for row in table_rows(output, f"| {name} |")]
    assert len(phases) == len(IMPLEMENTATIONS)  # the --breakdown table: a row per implementation
    for _, forward, backward, optimizer, total in phases:
        assert min(float(forward), float(backward), float(optimizer)) >= 0
        assert abs(float(forward) + float(backward) + float(optimizer) - float(total)) < 0.2


def test_bench_parallel_preset_is_issue_15s_grid():
    spec = importlib.util.spec_from_file_location("bench", BENCHMARKS / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--parallel"])
    assert args.impls == [
        "plain-loop",
        "pyro-nsde",
        "pyro-nsde-linear",
        "pyro-nsde-linear-series",
        "drift-floor",
        "drift-floor-blocked",
    ]
    configs = {str(config) for config in args.configs}
    assert {"1000x16x1", "1000x512x8", "10000x16x1", "10000x16x8"} <= configs
    assert not any(config.steps == 10000 and config.paths == 512 for config in args.configs)
    quick = bench.parse_args(["--parallel", "--quick", "--threads", "2"])
    assert [str(config) for config in quick.configs] == [bench.QUICK_GRID]
    assert quick.impls == args.impls and quick.threads == 2


def test_memory_script_reports_default_and_checkpointed_rows():
    output = run_script(
        "memory.py", "--steps", "100", "--paths", "4", "--checkpoint-every", "10", "--threads", "1"
    )
    rows = table_rows(output, "| 100 | 4 | 1 |")
    assert [(row[3], row[4]) for row in rows] == [
        ("plain-loop", "–"),
        ("pyro-nsde", "–"),
        ("pyro-nsde", "10"),
    ]
    for row in rows:
        assert float(row[5]) >= 0 and float(row[6]) > 0


def test_lorenz_benchmark_quick_reports_every_implementation(tmp_path):
    output = run_script(
        "lorenz_latent_sde.py", "--quick", "--subsample", "25", "--out", str(tmp_path)
    )
    rows = [
        *table_rows(output, "| pyro-nsde ("),
        *table_rows(output, "| pyro-nsde control='linear' ("),
        *table_rows(output, "| pyro-nsde control='linear', gain='diagonal' ("),
        *table_rows(output, "| torchsde ("),
    ]
    assert len(rows) == 4
    assert "subsample_steps=25" in rows[2][0]
    for row in rows:
        solver, trained = int(row[1]), int(row[2].split()[0])
        seconds, rmse, coverage = float(row[3]), float(row[7]), float(row[8])
        assert solver > 0 and trained == 3 and seconds > 0 and rmse > 0 and 0 <= coverage <= 1
    assert table_rows(output, "| last observation carried forward |")
    assert (tmp_path / "lorenz_latent_sde.json").exists()


def test_backtest_benchmark_scores_a_series_against_arima():
    output = run_script(
        "accuracy/backtest.py", "--series", "nile", "--extra", "--steps", "3", "--samples", "20"
    )
    assert "nile  100 rows,  20 held out," in output and "ARIMA(" in output
    assert "pooled pyro-nsde: coverage 50 %" in output


def test_subsample_steps_benchmark_times_both_families():
    output = run_script(
        "subsample_steps.py", "--batch", "2", "--draws", "10", "--rounds", "1", "--steps", "1"
    )
    assert "| B | full all steps | full R=10 | diagonal all steps | diagonal R=10 |" in output
    (row,) = table_rows(output, "| 2 |")
    assert len(row) == 5 and all("x)" in cell for cell in row[1:])
    assert "sd of the subsampled log p(path)" in output


def test_gpu_script_runs_its_table_on_the_cpu(tmp_path):
    output = run_script("gpu.py", "--device", "cpu", "--quick", "--out", str(tmp_path))
    names = [row[3] for row in table_rows(output, "| 200 | 8 | 2 |")]
    assert names == ["plain-loop", "pyro-nsde", "pyro-nsde-linear-series", "pyro-nsde-subsampled"]
    assert table_rows(output, "| pyro-nsde control='linear', gain='diagonal' (")
