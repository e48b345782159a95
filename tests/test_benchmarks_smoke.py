"""The benchmark scripts run end to end (tiny sizes) and print what issue 6 asks for.

No timing is asserted: only that every implementation is timed, that their objectives agree
at a common initialization (the script's sanity check against the plain PyTorch loop), and
that memory is reported.
"""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
IMPLEMENTATIONS = [
    "plain-loop",
    "pyro-nsde",
    "pyro-nsde-diagonal",
    "pyro-nsde-full",
    "torchsde",
    "naive-pyro",
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
    output = run_script("bench.py", "--quick")
    assert "| K | B | d | implementation | median ms/iter | IQR ms | × plain loop | peak MB |" in (
        output
    )
    rows = table_rows(output, "| 20 | 8 | 2 |")
    assert [row[3] for row in rows] == IMPLEMENTATIONS
    for _, _, _, name, median, iqr, ratio, memory in rows:
        assert float(median) > 0 and float(iqr) >= 0 and float(ratio) > 0, name
        assert float(memory) >= 0, name
    assert rows[0][6] == "1.00"
    assert "sanity: all objectives agree with plain-loop" in output


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
