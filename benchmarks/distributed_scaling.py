"""Series per second of data-parallel SVI with 1 and 2 processes (``torchrun``).

Each configuration ``processes × threads`` launches
``torchrun --standalone --nproc_per_node=P tutorials/distributed_svi.py`` with
``OMP_NUM_THREADS=threads`` (gloo on the loopback interface for ``--device cpu``, nccl for
``--device cuda``) and reads the JSON line the tutorial prints: every process trains on its
shard of the same ``N`` series; ``series_per_second = N · timed_steps / seconds`` after
``--warmup`` steps. The default configurations are ``1x1`` (one process, one thread),
``2x1`` (two processes, one thread each: data parallelism) and ``1x2`` (one process, two
intra-op threads: the same cores used by PyTorch's own parallelism instead). They run
round-robin ``--repeats`` times so that changing load on the machine hits all of them; the
1-minute load average before and after each run is reported, since on a shared machine it
decides the numbers as much as the code does.

    python benchmarks/distributed_scaling.py            # prints a Markdown table
    python benchmarks/distributed_scaling.py --device cuda --configs 1x1,2x1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TUTORIAL = Path(__file__).resolve().parent.parent / "tutorials" / "distributed_svi.py"


def run(processes: int, threads: int, args) -> dict:
    """One ``torchrun`` launch of the tutorial; returns its JSON report plus the load."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if args.device == "cpu":
        env["GLOO_SOCKET_IFNAME"] = "lo"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        str(TUTORIAL),
        f"--device={args.device}",
        f"--num-series={args.num_series}",
        f"--time-steps={args.time_steps}",
        f"--num-particles={args.num_particles}",
        f"--num-steps={args.warmup + args.timed_steps}",
        f"--warmup={args.warmup}",
    ]
    load_before = os.getloadavg()[0]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report.update(threads=threads, load_before=load_before, load_after=os.getloadavg()[0])
    return report


def parse_configs(text: str):
    configs = []
    for item in text.split(","):
        processes, _, threads = item.partition("x")
        if not (processes.isdigit() and threads.isdigit()):
            raise ValueError(f"--configs entries must look like 2x1, but got {item!r}")
        configs.append((int(processes), int(threads)))
    return configs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--configs", default="1x1,2x1,1x2", help="processes x threads, ...")
    parser.add_argument("--num-series", type=int, default=128)
    parser.add_argument("--time-steps", type=int, default=40)
    parser.add_argument("--num-particles", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timed-steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    configs = parse_configs(args.configs)

    runs = {config: [] for config in configs}
    for _ in range(args.repeats):
        for config in configs:
            runs[config].append(run(*config, args))
            print(json.dumps(runs[config][-1]), file=sys.stderr, flush=True)

    base = statistics.median(r["series_per_second"] for r in runs[configs[0]])
    print(
        f"N = {args.num_series} series, K = {args.time_steps} steps, "
        f"{args.num_particles} particles, {args.timed_steps} timed SVI steps, "
        f"device {args.device}, {os.cpu_count()} CPUs\n"
    )
    print(
        "| processes × threads | series / s (each run) | median | vs first | load before → after |"
    )
    print("|---|---|---|---|---|")
    for (processes, threads), reports in runs.items():
        rates = [r["series_per_second"] for r in reports]
        loads = ", ".join(f"{r['load_before']:.1f} → {r['load_after']:.1f}" for r in reports)
        median = statistics.median(rates)
        each = ", ".join(f"{rate:.0f}" for rate in rates)
        print(
            f"| {processes} × {threads} | {each} | {median:.0f} | {median / base:.2f} | {loads} |"
        )


if __name__ == "__main__":
    main()
