"""Data-parallel SVI on torch.distributed (``pyro_nsde.app.distributed``).

The two-process test launches real ``gloo`` processes on the loopback interface. The model:
``N = 5`` Ornstein–Uhlenbeck series with a global drift rate ``θ`` (a ``pyro.param``), a
per-series latent offset ``b_s`` and a latent path ``x_s``, observed with noise; the guide is a
:class:`~pyro_nsde.GirsanovGuide` with per-series affine controls and a mean-field ``b``. The
shards are unequal (3 and 2 series), so the shard weights ``n_i / N`` matter.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed
import torch.multiprocessing
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import init_to_sample

from pyro_nsde import EulerMaruyama, GirsanovGuide
from pyro_nsde.app.distributed import DataParallelSVI, shard_indices

NUM_SERIES = 5
SHARDS = ([0, 1, 2], [3, 4])  # what shard_indices must give two processes, written by hand
NUM_PARTICLES = 2
NUM_STEPS = 4
TIMES = torch.linspace(0.0, 1.0, 11)
OBS = torch.tensor([2, 5, 8, 10])
Y = torch.randn(NUM_SERIES, len(OBS), generator=torch.Generator().manual_seed(0))


def _model(y, idx):
    theta = pyro.param("theta", lambda: torch.tensor(0.8), constraint=dist.constraints.positive)
    with pyro.plate("series", NUM_SERIES, subsample=idx, dim=-1):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        prior = EulerMaruyama(
            lambda t, x: -theta * x,
            torch.tensor([0.5]),
            dist.Normal(torch.zeros(1), 1.0).to_event(1),
            TIMES,
        )
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x[..., OBS, 0] + b[..., None], 0.1).to_event(1), obs=y)


def _plates(y, idx):
    return pyro.plate("series", NUM_SERIES, subsample=idx, dim=-1)


def _build():
    """A fresh guide, ELBO and optimizer (the guide's initial values are random)."""
    # init_path="prior": a shard's guide and the one-process reference on all series must be
    # the same function of the same parameters (a Laplace fit is made only without
    # subsampling, and would differ between them).
    guide = GirsanovGuide(
        _model,
        control="affine",
        covariance="prior",
        latents="normal",
        init_loc_fn=init_to_sample,
        create_plates=_plates,
        init_path="prior",
    )
    elbo = Trace_ELBO(num_particles=NUM_PARTICLES, vectorize_particles=True, max_plate_nesting=1)
    return guide, elbo, pyro.optim.Adam({"lr": 0.05})


def _params():
    store = pyro.get_param_store()
    return {name: p.detach().clone() for name, p in store.named_parameters()}


def _load_params(values):
    params = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def _worker(rank, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        pyro.clear_param_store()
        torch.manual_seed(10 + rank)  # a different random initialization on each process
        guide, elbo, optim = _build()
        idx = shard_indices(NUM_SERIES)
        y = Y[idx]
        with torch.no_grad():
            guide(y, idx)
        before = _params()
        draws = []

        def recording_guide(y, idx):
            values = guide(y, idx)
            draws.append({name: value.detach() for name, value in values.items()})
            return values

        svi = DataParallelSVI(_model, recording_guide, optim, elbo, shard_fraction=len(idx) / 5)
        svi.synchronize(y, idx)
        initial = _params()
        torch.manual_seed(1000 + rank)
        losses = [svi.step(y, idx) for _ in range(NUM_STEPS)]
        result = {"idx": idx, "before": before, "initial": initial, "losses": losses}
        result.update(final=_params(), first_draw=draws[1])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_reference(initial):
    """One process, plain Pyro, no torch.distributed: for each shard in turn, restore that
    shard's random-number stream, compute its loss and gradients with ``Trace_ELBO``; combine
    them as ``Σ_i (n_i / N) · (L_i, ∇L_i)``; take one Adam step."""
    pyro.clear_param_store()
    guide, elbo, optim = _build()
    shards = [torch.tensor(shard) for shard in SHARDS]
    weights = [len(shard) / NUM_SERIES for shard in SHARDS]
    with torch.no_grad():
        guide(Y[shards[0]], shards[0])
    _load_params(initial)
    streams = []
    for rank in range(2):
        torch.manual_seed(1000 + rank)
        streams.append(torch.get_rng_state())
    losses = []
    for _ in range(NUM_STEPS):
        loss, grads = 0.0, {}
        for rank, (idx, weight) in enumerate(zip(shards, weights, strict=True)):
            torch.set_rng_state(streams[rank])
            with poutine.trace(param_only=True) as capture:
                shard_loss = elbo.loss_and_grads(_model, guide, Y[idx], idx)
            streams[rank] = torch.get_rng_state()
            params = {n: site["value"].unconstrained() for n, site in capture.trace.nodes.items()}
            loss += weight * shard_loss
            for name, p in params.items():
                grads[name] = weight * p.grad + grads.get(name, 0.0)
                p.grad = None
        for name, p in params.items():
            p.grad = grads[name]
        optim(list(params.values()))
        for p in params.values():
            p.grad = None
        losses.append(loss)
    return losses, _params()


def _full_data_loss(initial, draws):
    """``-(log p(y, b, x) - log q(b, x)) / num_particles`` of one process holding all ``N``
    series (plate scale 1), at the two processes' draws put side by side."""
    pyro.clear_param_store()
    guide, _, _ = _build()
    idx = torch.arange(NUM_SERIES)
    with torch.no_grad():
        guide(Y, idx)
    _load_params(initial)
    b = torch.cat([draw["b"] for draw in draws], dim=-1)
    data = {"b": b, "b_unconstrained": b, "x": torch.cat([draw["x"] for draw in draws], dim=-3)}
    with torch.no_grad(), pyro.plate("particles", NUM_PARTICLES, dim=-2):
        guide_trace = poutine.trace(poutine.condition(guide, data)).get_trace(Y, idx)
        model_trace = poutine.trace(poutine.condition(_model, data)).get_trace(Y, idx)
    return -(model_trace.log_prob_sum() - guide_trace.log_prob_sum()).item() / NUM_PARTICLES


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the two processes")
def test_two_gloo_processes_train_like_one_process_on_all_series(tmp_path):
    """Two processes (gloo, 127.0.0.1) hold the shards ``{0, 1, 2}`` and ``{3, 4}`` and train for
    a few steps; the result must equal one process trained on all series.

    Why the two runs are equal, not just equal in distribution: each process's loss ``L_i``
    (``Trace_ELBO`` with the plate scale ``N / n_i``) depends only on the parameters, its shard
    and its random-number stream. The processes are seeded ``1000 + rank`` after the initial
    broadcast, and nothing else draws random numbers, so the reference can replay stream ``i``
    (saving and restoring the torch RNG state) to compute the same ``L_i`` and ``∇L_i`` on shard
    ``i``. It then combines them as ``Σ_i (n_i / N) (L_i, ∇L_i)``, which is what the all-reduce
    computes, and takes the same Adam step; by induction the parameters agree after every step.
    The initial values are random and seeded differently on each process, so the processes
    only agree if process 0's values are broadcast; the reference starts from those values.

    The ELBO scaling by the global number of series is checked independently: the loss of the
    first step must equal the full-data loss of one process holding all ``N`` series (plate
    scale 1) at the draws of both processes put side by side, since
    ``Σ_i (n_i / N) (N / n_i) Σ_{s ∈ shard i} ℓ_s = Σ_s ℓ_s`` with no global latent.

    The processes are forked from this one so that they need not import torch and Pyro again;
    ``torch._dynamo`` (imported by every torch optimizer, seconds) is imported before forking.
    """
    import torch._dynamo

    torch.multiprocessing.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [r["idx"].tolist() for r in ranks] == list(SHARDS)

    names = ranks[0]["initial"].keys()
    assert any(not torch.equal(ranks[0]["before"][n], ranks[1]["before"][n]) for n in names)
    for name in names:
        assert torch.equal(ranks[0]["initial"][name], ranks[1]["initial"][name]), name
        assert torch.equal(ranks[0]["final"][name], ranks[1]["final"][name]), name
    assert ranks[0]["losses"] == ranks[1]["losses"]

    losses, final = _single_process_reference(ranks[0]["initial"])
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-6)
    for name in names:
        torch.testing.assert_close(ranks[0]["final"][name], final[name], rtol=1e-6, atol=1e-7)
        assert not torch.equal(final[name], ranks[0]["initial"][name]), name

    full = _full_data_loss(ranks[0]["initial"], [r["first_draw"] for r in ranks])
    assert ranks[0]["losses"][0] == pytest.approx(full, rel=1e-5)


def test_without_process_group_steps_like_pyro_svi():
    idx = torch.arange(NUM_SERIES)
    runs = []
    for cls in (SVI, DataParallelSVI):
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide, elbo, optim = _build()
        with torch.no_grad():
            guide(Y, idx)
        svi = cls(_model, guide, optim, elbo)
        if cls is DataParallelSVI:
            assert (svi.rank, svi.world_size, svi.shard_fraction) == (0, 1, 1.0)
            svi.synchronize(Y, idx)
        torch.manual_seed(1)
        losses = [svi.step(Y, idx) for _ in range(3)]
        runs.append((losses, _params()))
    (losses, params), (dp_losses, dp_params) = runs
    assert dp_losses == losses
    for name, value in params.items():
        assert torch.equal(dp_params[name], value), name


def test_shard_indices_on_one_process_is_every_series():
    assert shard_indices(4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_series"):
        shard_indices(0)


def test_shard_fractions_must_be_shares_that_sum_to_one():
    guide, elbo, optim = _build()
    with pytest.raises(ValueError, match="shard_fraction must be a number"):
        DataParallelSVI(_model, guide, optim, elbo, shard_fraction=1.5)
    pyro.clear_param_store()
    svi = DataParallelSVI(_model, guide, optim, elbo, shard_fraction=0.5)
    idx = torch.arange(NUM_SERIES)
    with pytest.raises(ValueError, match="must sum to 1"):
        svi.step(Y, idx)


def test_process_group_without_torch_distributed_is_an_error():
    guide, elbo, optim = _build()
    with pytest.raises(ValueError, match="process_group"):
        DataParallelSVI(_model, guide, optim, elbo, process_group=object())


def test_distributed_tutorial_runs_single_process_in_fast_mode():
    script = Path(__file__).parents[1] / "tutorials" / "distributed_svi.py"
    env = dict(os.environ, PYRO_NSDE_FAST="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "θ: median" in result.stdout
