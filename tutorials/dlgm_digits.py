"""Deep latent Gaussian models in the diffusion limit, on handwritten digits.

Tzen & Raginsky's generative model: a latent diffusion in ``d = 6`` dimensions starts at
``x_0 = 0``, runs on ``[0, 1]`` through a neural drift and diffusion, and the image is drawn
from a decoder of the terminal state,

    ``x_{k+1} = x_k + h f(t_k, x_k) + g(t_k, x_k) ⊙ sqrt(h) ξ_k``,  ``h = 1 / K``,
    ``y ~ Π_j Bernoulli(y_j; σ(D(x_K))_j)``,

a deep latent Gaussian model with ``K`` stochastic layers that converges to the SDE as ``K``
grows. The amortized posterior is the Girsanov guide, ``ΔW_k ~ N(h u_k, h S_k S_kᵀ)`` with
``(u_k, S_k) = control(t_k, x_k, E(y))``, in two families: the pure mean shift of the paper
(``S = I``, ``covariance="prior"``) and a learned diagonal ``S`` (``covariance="diagonal"``).
The baseline is a VAE with the same decoder, the same latent size and the same encoder trunk.

Data: the 1,797 8×8 digits of ``sklearn.datasets.load_digits``, binarized (``pixel / 16 >
0.5``), permuted with seed 0, the first 1,500 for training and the other 297 for testing.

For every ``K`` in ``{1, 2, 4, 8, 16, 32}`` and both guides the script trains by SVI
(minibatches of 100, 2,000 steps), then reports on the test set the ELBO and the
importance-weighted (IWAE) estimate of ``log p(y)`` with ``S = 1000`` draws of the guide, in
nats per image. It writes ``table.md``, ``results.json``, the curve against ``K``
(``curve.png``), samples of the trained models (``samples.png``) and latent paths
(``paths.png``) into ``--out``.

Run::

    OMP_NUM_THREADS=1 python tutorials/dlgm_digits.py --out dlgm_outputs
    PYRO_NSDE_FAST=1 python tutorials/dlgm_digits.py --out /tmp/dlgm   # a quick run (CI)
"""

import argparse
import json
import math
import os
import pathlib
import time

import matplotlib.pyplot as plt
import numpy as np
import pyro
import torch
from sklearn.datasets import load_digits

from pyro_nsde.zoo.dlgm import DLGM, VAE, ImageEncoder, importance_bounds, train

FAST = os.environ.get("PYRO_NSDE_FAST") == "1"
LATENT_DIM, CONTEXT_DIM, NUM_TRAIN, BATCH_SIZE, LR = 6, 32, 1500, 100, 3e-3
GUIDES = {"mean shift": "prior", "diagonal S": "diagonal"}
if FAST:
    NUM_LAYERS, NUM_STEPS, NUM_DRAWS = (1, 2), 40, 20
else:
    NUM_LAYERS, NUM_STEPS, NUM_DRAWS = (1, 2, 4, 8, 16, 32), 2000, 1000


def binarized_digits(num_train: int = NUM_TRAIN, seed: int = 0):
    """``(train, test, test_labels)``: binarized 8×8 digits ``(N, 64)`` in a fixed random
    order, and the classes ``0..9`` of the test digits."""
    digits = load_digits()
    pixels = torch.as_tensor(digits.data, dtype=torch.get_default_dtype())
    images = (pixels / 16 > 0.5).to(pixels.dtype)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], torch.as_tensor(digits.target)[order]
    return images[:num_train], images[num_train:], labels[num_train:]


def make(kind: str, num_layers: int | None = None):
    """``(module, model, guide)`` for ``kind`` ``"vae"`` or a guide name of ``GUIDES``."""
    obs_dim = 64
    if kind == "vae":
        vae = VAE(LATENT_DIM, obs_dim)
        return vae, vae.model, vae.guide
    dlgm = DLGM(LATENT_DIM, obs_dim, num_layers)
    guide = dlgm.guide(ImageEncoder(obs_dim, CONTEXT_DIM), covariance=GUIDES[kind])
    return dlgm, dlgm.model, guide


def evaluate(model, guide, images, num_draws):
    bounds = importance_bounds(model, guide, images, num_samples=num_draws)
    return {
        "elbo": bounds.elbo.mean().item(),
        "log_likelihood": bounds.log_likelihood.mean().item(),
        "stderr": (bounds.log_likelihood.std() / math.sqrt(len(images))).item(),
        "ess": bounds.ess.mean().item(),
    }


def fit(kind, num_layers, train_images, test_images):
    """Train one model from seed 0 and evaluate it on the test set, before and after."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    module, model, guide = make(kind, num_layers)
    start = evaluate(model, guide, test_images, min(NUM_DRAWS, 100))["elbo"]
    clock = time.perf_counter()
    losses = train(model, guide, train_images, num_steps=NUM_STEPS, batch_size=BATCH_SIZE, lr=LR)
    seconds = time.perf_counter() - clock
    result = evaluate(model, guide, test_images, NUM_DRAWS)
    result.update(
        kind=kind,
        num_layers=num_layers,
        initial_elbo=start,
        train_seconds=seconds,
        losses=losses,
    )
    label = "VAE" if kind == "vae" else f"K = {num_layers:2d}, {kind}"
    print(
        f"{label:22s} test ELBO {start:7.2f} -> {result['elbo']:7.2f}, "
        f"IWAE log p(y) {result['log_likelihood']:7.2f}, ESS {result['ess']:6.1f} "
        f"of {NUM_DRAWS}, {seconds:5.0f} s",
        flush=True,
    )
    return module, guide, result


def markdown_table(results) -> str:
    """Rows ``K`` (and the VAE), columns: test ELBO and IWAE ``log p(y)`` for each guide."""
    by_key = {(r["kind"], r["num_layers"]): r for r in results}
    header = "| model | " + " | ".join(f"ELBO, {g} | log p(y) (IWAE), {g}" for g in GUIDES) + " |"
    lines = [header, "|---" * (1 + 2 * len(GUIDES)) + "|"]
    for k in NUM_LAYERS:
        cells = []
        for g in GUIDES:
            r = by_key[(g, k)]
            cells += [f"{r['elbo']:.2f}", f"{r['log_likelihood']:.2f}"]
        lines.append(f"| DLGM, K = {k} | " + " | ".join(cells) + " |")
    vae = by_key[("vae", None)]
    cells = [f"{vae['elbo']:.2f}", f"{vae['log_likelihood']:.2f}"] * len(GUIDES)
    lines.append("| VAE (same decoder, d = 6) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(results, path):
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    colors = {"mean shift": "C0", "diagonal S": "C1"}
    vae = next(r for r in results if r["kind"] == "vae")
    for g, color in colors.items():
        rows = sorted((r for r in results if r["kind"] == g), key=lambda r: r["num_layers"])
        ks = [r["num_layers"] for r in rows]
        ax.plot(
            ks,
            [r["log_likelihood"] for r in rows],
            "o-",
            color=color,
            label=f"log p(y) (IWAE), {g}",
        )
        ax.plot(ks, [r["elbo"] for r in rows], "s--", color=color, mfc="none", label=f"ELBO, {g}")
    ax.axhline(vae["log_likelihood"], color="k", lw=1, label="VAE log p(y) (IWAE)")
    ax.axhline(vae["elbo"], color="k", lw=1, ls="--", label="VAE ELBO")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(NUM_LAYERS), [str(k) for k in NUM_LAYERS])
    ax.set_xlabel("K (Euler–Maruyama layers on [0, 1])")
    ax.set_ylabel("test nats per image")
    ax.set_title("Binarized 8×8 digits, d = 6")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tile(images, rows, cols, gap=1):
    """``(rows·cols, 64)`` pixel values → one ink-on-paper image with grey gutters."""
    canvas = np.full((rows * (8 + gap) - gap, cols * (8 + gap) - gap), 0.25)
    for i, image in enumerate(images.reshape(-1, 8, 8)[: rows * cols]):
        r, c = divmod(i, cols)
        canvas[r * (8 + gap) : r * (8 + gap) + 8, c * (8 + gap) : c * (8 + gap) + 8] = image
    return 1 - canvas


def plot_samples(models, path, num=64):
    """Pixel probabilities ``σ(D(x_K))`` of ``num`` draws from each trained generative model."""
    fig, axes = plt.subplots(
        1, len(models), figsize=(3.2 * len(models), 3.4), squeeze=False, layout="constrained"
    )
    for ax, (title, module) in zip(axes[0], models.items(), strict=True):
        pyro.set_rng_seed(1)
        _, probs = module.sample(num)
        side = int(math.sqrt(num))
        ax.imshow(_tile(probs.numpy(), side, side), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paths(dlgm, guide, images, labels, path, num_paths=20):
    """Prior paths of every latent coordinate, and posterior paths given a few test digits."""
    pyro.clear_param_store()  # the modules' own (trained) tensors, not another model's
    pyro.set_rng_seed(2)
    times = dlgm.times.numpy()
    prior_paths, _ = dlgm.sample(num_paths)
    with torch.no_grad(), pyro.plate("_draws", num_paths, dim=-2):
        posterior_paths = guide(images)["x"]  # (num_paths, n, K+1, d)
    d = dlgm.latent_dim
    fig, axes = plt.subplots(
        2,
        d + 1,
        figsize=(2.3 * d + 1.2, 4.8),
        layout="constrained",
        gridspec_kw={"width_ratios": [1] * d + [0.45]},
    )
    for c in range(d):
        axes[0, c].plot(times, prior_paths[..., c].T.numpy(), color="0.4", lw=0.6)
        axes[0, c].set_title(f"prior, x{c + 1}", fontsize=9)
        for n in range(images.shape[0]):
            axes[1, c].plot(times, posterior_paths[:, n, :, c].T.numpy(), color=f"C{n}", lw=0.6)
        axes[1, c].set_title(f"posterior, x{c + 1}", fontsize=9)
        axes[1, c].set_xlabel("t")
        axes[1, c].sharey(axes[0, c])
    axes[0, -1].axis("off")
    axes[0, -1].text(
        0, 0.5, f"K = {dlgm.num_steps}\nx_0 = 0\n{num_paths} paths", fontsize=9, va="center"
    )
    axes[1, -1].imshow(_tile(images.numpy(), images.shape[0], 1), cmap="gray", vmin=0, vmax=1)
    for n, label in enumerate(labels.tolist()):
        axes[1, -1].text(-1, n * 9 + 3.5, f"{label}", color=f"C{n}", va="center", ha="right")
    axes[1, -1].axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out: pathlib.Path):
    out.mkdir(parents=True, exist_ok=True)
    torch.set_default_dtype(torch.float32)
    train_images, test_images, test_labels = binarized_digits()
    # Posterior paths are drawn for the first test digits of three different classes.
    shown = torch.stack([(test_labels == c).nonzero()[0, 0] for c in (0, 1, 4)])
    print(
        f"{len(train_images)} training and {len(test_images)} test images; "
        f"K in {NUM_LAYERS}, {NUM_STEPS} SVI steps each, {NUM_DRAWS} importance draws; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    clock = time.perf_counter()
    results, kept = [], {}
    module, _, result = fit("vae", None, train_images, test_images)
    results.append(result)
    kept["VAE"] = module
    for kind in GUIDES:
        for k in NUM_LAYERS:
            module, guide, result = fit(kind, k, train_images, test_images)
            results.append(result)
            if kind == "diagonal S" and k in (NUM_LAYERS[0], NUM_LAYERS[-1]):
                kept[f"DLGM, K = {k}"] = module
                if k == NUM_LAYERS[-1]:
                    plot_paths(
                        module, guide, test_images[shown], test_labels[shown], out / "paths.png"
                    )
    total = time.perf_counter() - clock

    table = markdown_table(results)
    print(table)
    print(f"total {total:.0f} s, load average {os.getloadavg()[0]:.1f}")
    (out / "table.md").write_text(
        f"Test set (297 images), nats per image; IWAE with {NUM_DRAWS} draws; "
        f"{NUM_STEPS} SVI steps per model; total {total:.0f} s.\n\n{table}\n"
    )
    summary = {
        "settings": {
            "latent_dim": LATENT_DIM,
            "num_layers": list(NUM_LAYERS),
            "svi_steps": NUM_STEPS,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "importance_draws": NUM_DRAWS,
            "fast": FAST,
        },
        "total_seconds": total,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(summary))
    plot_curve(results, out / "curve.png")
    plot_samples(kept, out / "samples.png")
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("dlgm_outputs"))
    main(parser.parse_args().out)
