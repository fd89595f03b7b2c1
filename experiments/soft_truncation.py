"""Soft Truncation (Kim et al., ICML 2022) at CPU scale: does ST give likelihood-trained models better samples?

Claim tested: a model trained with the likelihood weighting (importance-sampled t) has good bits/dim but poor
sample quality; Soft Truncation (k = 1, a random truncation time tau ~ 1/tau per step) keeps the bits/dim close
and improves the samples; the variance weighting (score_sde's default, "FID" configs) has the best samples and
the worst bits/dim.

Setup: configs/demo.py's small DDPM++ (VP SDE, SHAPES 16x16, batch 32, lr 2e-3, EMA 0.999) trained with
run_lib.train for --n_iters steps, three variants, same seeds:
  lw_is     likelihood weighting with importance sampling, no ST
  lw_is_st  the same with Soft Truncation, k = 1
  variance  the variance weighting, uniform t, no ST
Measured with the EMA weights: bits/dim of --num_bpd uniformly dequantized held-out images (probability-flow
ODE, score_sde's treatment of eps = 1e-5, rtol = atol = 1e-4) and DCT-FD of --num_samples samples (the demo's
200-step reverse-diffusion sampler) against --num_ref held-out images (Frechet distance between Gaussian fits of
the 4 x 4 lowest DCT coefficients per channel; the floor is the same figure for real held-out images).

Writes experiments/results/soft_truncation.json and soft_truncation.png (rewritten after every run, so a killed
run keeps what finished). Full protocol (the defaults): about 30 min on a 2-core CPU:
  python -m experiments.soft_truncation
Pipeline check in seconds (not the effect): python -m experiments.soft_truncation --quick --out DIR
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from experiments import common

VARIANTS = {
    "lw_is": dict(st=False, likelihood_weighting=True, importance_sampling=True, weighting=""),
    "lw_is_st": dict(st=True, k=1.0, likelihood_weighting=True, importance_sampling=True, weighting=""),
    "variance": dict(st=False, likelihood_weighting=False, importance_sampling=False, weighting=""),
}
QUICK = dict(seeds="0", n_iters=3, num_bpd=2, num_samples=8, num_ref=16, sampler_steps=25)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; --quick replaces the sizes by the seconds-long pipeline check."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n_iters", type=int, default=500)
    p.add_argument("--num_bpd", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=128)
    p.add_argument("--num_ref", type=int, default=512)
    p.add_argument("--sampler_steps", type=int, default=200, help="reverse-diffusion steps (model.num_scales)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=common.RESULTS_DIR)
    p.add_argument("--workdir", default=None, help="run directories (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the effect")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def run_one(args, name: str, seed: int, workdir: str, ref: torch.Tensor, bpd_images: torch.Tensor) -> dict:
    """Train one variant with one seed and measure bits/dim, DCT-FD and the training-loss statistics."""
    config = common.demo_config(seed, args.n_iters, **VARIANTS[name])
    config.model.num_scales = args.sampler_steps
    model, losses, seconds = common.train(config, workdir)
    start = time.perf_counter()
    bpd = common.bits_per_dim(config, model, bpd_images)
    samples, nfe = common.draw_samples(config, model, args.num_samples, seed=1000 + seed)
    fd = common.dct_fd(samples, ref)
    return dict(
        seed=seed,
        bpd=float(bpd.mean()),
        bpd_sem=float(bpd.std(ddof=1) / np.sqrt(bpd.size)) if bpd.size > 1 else 0.0,
        dct_fd=fd,
        sampler_nfe=nfe,
        final_loss_mean_last_10pct=float(losses[-max(1, len(losses) // 10) :].mean()),
        train_seconds=seconds,
        eval_seconds=time.perf_counter() - start,
        samples=samples,
    )


def summarise(runs: dict, floor: float, args, elapsed: float, complete: bool) -> dict:
    """JSON payload: protocol, per-variant mean / std over seeds, per-seed figures."""
    variants = {}
    for name, rows in runs.items():
        if not rows:
            continue
        variants[name] = dict(
            training=VARIANTS[name],
            bpd=common.mean_std([r["bpd"] for r in rows]),
            dct_fd=common.mean_std([r["dct_fd"] for r in rows]),
            per_seed=[{k: v for k, v in r.items() if k != "samples"} for r in rows],
        )
    return dict(
        experiment="soft_truncation",
        complete=complete,
        protocol=dict(
            config="configs/demo.py",
            seeds=[int(s) for s in args.seeds.split(",")],
            n_iters=args.n_iters,
            num_bpd_images=args.num_bpd,
            num_samples=args.num_samples,
            num_ref_images=args.num_ref,
            sampler="pc reverse_diffusion, corrector none",
            sampler_steps=args.sampler_steps,
            bpd="probability-flow ODE, plain truncation at eps=1e-5, rtol=atol=1e-4, uniform dequantization",
            dct_fd=f"Frechet distance of the {common.DCT_BLOCK}x{common.DCT_BLOCK} lowest DCT coefficients per channel",
            quick=bool(args.quick),
        ),
        floor_dct_fd=floor,
        variants=variants,
        elapsed_seconds=elapsed,
    )


def figure(payload: dict, grids: dict, path: str) -> None:
    """Bars (mean, error bar = std over seeds) of bits/dim and DCT-FD per variant, and seed-0 sample grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision

    names = list(payload["variants"])
    fig, axes = plt.subplots(1, 2 + len(grids), figsize=(4 * (2 + len(grids)), 3.6))
    for ax, key, label in (
        (axes[0], "bpd", "bits/dim (lower is better)"),
        (axes[1], "dct_fd", "DCT-FD (lower is better)"),
    ):
        means = [payload["variants"][n][key]["mean"] for n in names]
        stds = [payload["variants"][n][key]["std"] for n in names]
        ax.bar(names, means, yerr=stds, capsize=4, color=["C0", "C1", "C2"][: len(names)])
        for i, n in enumerate(names):
            ax.scatter(
                [i] * len(payload["variants"][n][key]["values"]), payload["variants"][n][key]["values"], c="k", s=8
            )
        if key == "dct_fd":
            ax.axhline(payload["floor_dct_fd"], ls="--", c="gray", label="real images (floor)")
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=9)
    for ax, (name, images) in zip(axes[2:], grids.items()):
        nrow = int(min(8, np.sqrt(images.shape[0])))
        grid = torchvision.utils.make_grid(images[: nrow * nrow], nrow=nrow, padding=1)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(f"{name} samples (seed {payload['protocol']['seeds'][0]})", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"Soft Truncation on SHAPES 16x16, DDPM++ demo, {payload['protocol']['n_iters']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run every variant for every seed; write the JSON and the figure after each run."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    names = args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            raise ValueError(f"unknown variant {n!r}; valid: {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    base = common.demo_config(0, 1)
    num_eval = int(base.data.num_eval)
    if args.num_ref + max(args.num_samples, args.num_bpd) > num_eval:
        raise ValueError(f"num_ref + max(num_samples, num_bpd) must be <= {num_eval} held-out images.")
    ref = common.eval_images(base, args.num_ref, offset=num_eval - args.num_ref)
    floor = common.dct_fd(common.eval_images(base, args.num_samples), ref)
    bpd_images = common.eval_images(base, args.num_bpd, dequantize=True, seed=0)
    root = args.workdir or tempfile.mkdtemp(prefix="exp_st_")
    runs = {n: [] for n in names}
    grids = {}
    json_path = os.path.join(args.out, "soft_truncation.json")
    for seed in seeds:
        for name in names:
            row = run_one(args, name, seed, os.path.join(root, f"{name}_seed{seed}"), ref, bpd_images)
            print(
                f"[soft_truncation] {name} seed {seed}: bpd {row['bpd']:.4f}, DCT-FD {row['dct_fd']:.3f}, "
                f"train {row['train_seconds']:.0f} s, eval {row['eval_seconds']:.0f} s",
                flush=True,
            )
            if seed == seeds[0]:
                grids[name] = row["samples"][:64]
            runs[name].append(row)
            payload = summarise(runs, floor, args, time.perf_counter() - start, complete=False)
            common.write_json(json_path, payload)
    payload = summarise(runs, floor, args, time.perf_counter() - start, complete=True)
    common.write_json(json_path, payload)
    figure(payload, grids, os.path.join(args.out, "soft_truncation.png"))
    for name, v in payload["variants"].items():
        print(
            f"{name:>10}: bpd {v['bpd']['mean']:.4f} +- {v['bpd']['std']:.4f}, "
            f"DCT-FD {v['dct_fd']['mean']:.3f} +- {v['dct_fd']['std']:.3f} (over {len(seeds)} seeds)"
        )
    print(f"floor DCT-FD (real images): {floor:.3f}; {payload['elapsed_seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
