"""Stable Target Field (Xu, Tong & Jaakkola, ICLR 2023) at CPU scale: DSM against STF at equal steps.

Claim tested: replacing the denoising-score-matching target by the reference-batch (STF) target lowers the
variance of the training target, hence of the training loss, and improves sample quality at the same number of
steps.

Setup: configs/demo.py's small DDPM++ (VP SDE, SHAPES 16x16, batch 32, variance weighting) with Soft
Truncation switched off (a random tau per step changes the loss scale from step to step and would hide the
target's variance), trained with run_lib.train for --n_iters steps, same seeds:
  dsm   the DSM target
  stf   the STF target with a reference batch of --stf_n images (training.stf, training.stf_ref_batch_size)
Measured: the per-step training loss (tensorboard 'training_loss', every step), its variance over the second
half of training and around a moving average of --window steps (the step-to-step noise, trend removed); DCT-FD
of --num_samples EMA samples (the demo's 200-step reverse-diffusion sampler) against --num_ref held-out images.
The two losses are different estimators of objectives with the same minimiser (the STF target is a lower-
variance estimate of the same score); their variances are what the claim is about.

Writes experiments/results/stable_target_field.json and stable_target_field.png (rewritten after every run).
Full protocol (the defaults): about 20 min on a 2-core CPU:
  python -m experiments.stable_target_field
Pipeline check in seconds (not the effect): python -m experiments.stable_target_field --quick --out DIR
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from experiments import common

QUICK = dict(seeds="0", n_iters=4, num_samples=8, num_ref=16, sampler_steps=25, window=2, stf_n=64)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; --quick replaces the sizes by the seconds-long pipeline check."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n_iters", type=int, default=500)
    p.add_argument("--stf_n", type=int, default=1024, help="STF reference batch size (>= 256 for the claim)")
    p.add_argument("--num_samples", type=int, default=128)
    p.add_argument("--num_ref", type=int, default=512)
    p.add_argument("--sampler_steps", type=int, default=200)
    p.add_argument("--window", type=int, default=25, help="moving-average window of the detrended loss variance")
    p.add_argument("--out", default=common.RESULTS_DIR)
    p.add_argument("--workdir", default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the effect")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def variants(stf_n: int) -> dict:
    """Training overrides of the two variants (ST off, variance weighting, as described above)."""
    base = dict(st=False, likelihood_weighting=False, importance_sampling=False, weighting="")
    return {
        "dsm": dict(base, stf=False),
        "stf": dict(base, stf=True, stf_ref_batch_size=int(stf_n), stf_gather=False),
    }


def detrended_variance(losses: np.ndarray, window: int) -> float:
    """Var of loss_i minus its centred moving average over `window` steps (step-to-step noise, trend removed)."""
    if losses.size < window + 2:
        return float(np.var(losses - losses.mean(), ddof=1)) if losses.size > 1 else 0.0
    kernel = np.ones(window) / window
    trend = np.convolve(losses, kernel, mode="valid")
    half = window // 2
    resid = losses[half : half + trend.size] - trend
    return float(np.var(resid, ddof=1))


def run_one(args, name: str, overrides: dict, seed: int, workdir: str, ref: torch.Tensor) -> dict:
    """Train one variant with one seed; loss statistics and DCT-FD."""
    config = common.demo_config(seed, args.n_iters, **overrides)
    config.model.num_scales = args.sampler_steps
    model, losses, seconds = common.train(config, workdir)
    second_half = losses[losses.size // 2 :]
    start = time.perf_counter()
    samples, nfe = common.draw_samples(config, model, args.num_samples, seed=1000 + seed)
    return dict(
        seed=seed,
        dct_fd=common.dct_fd(samples, ref),
        loss_var_second_half=float(np.var(second_half, ddof=1)) if second_half.size > 1 else 0.0,
        loss_mean_second_half=float(second_half.mean()),
        loss_var_detrended=detrended_variance(losses, args.window),
        train_seconds=seconds,
        eval_seconds=time.perf_counter() - start,
        sampler_nfe=nfe,
        losses=losses,
        samples=samples,
    )


def summarise(runs: dict, floor: float, args, elapsed: float, complete: bool) -> dict:
    """JSON payload: protocol, per-variant mean / std over seeds, per-seed figures (loss curves included)."""
    keys = ("dct_fd", "loss_var_second_half", "loss_var_detrended", "loss_mean_second_half")
    out = {}
    for name, rows in runs.items():
        if rows:
            out[name] = {k: common.mean_std([r[k] for r in rows]) for k in keys}
            out[name]["training"] = variants(args.stf_n)[name]
            out[name]["per_seed"] = [
                {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items() if k != "samples"}
                for r in rows
            ]
    ratio = None
    if out.get("dsm") and out.get("stf"):
        pairs = zip(runs["stf"], runs["dsm"])
        ratio = common.mean_std([a["loss_var_detrended"] / max(b["loss_var_detrended"], 1e-300) for a, b in pairs])
    return dict(
        experiment="stable_target_field",
        complete=complete,
        protocol=dict(
            config="configs/demo.py with training.st=False",
            seeds=[int(s) for s in args.seeds.split(",")],
            n_iters=args.n_iters,
            stf_ref_batch_size=args.stf_n,
            num_samples=args.num_samples,
            num_ref_images=args.num_ref,
            sampler="pc reverse_diffusion, corrector none",
            sampler_steps=args.sampler_steps,
            window=args.window,
            quick=bool(args.quick),
        ),
        floor_dct_fd=floor,
        variants=out,
        stf_over_dsm_detrended_loss_variance=ratio,
        elapsed_seconds=elapsed,
    )


def figure(payload: dict, runs: dict, path: str, window: int) -> None:
    """Training-loss curves (seed 0, moving average and raw), per-seed loss variances and DCT-FD bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for i, (name, rows) in enumerate(runs.items()):
        losses = rows[0]["losses"]
        axes[0].plot(losses, color=f"C{i}", alpha=0.3, lw=0.6)
        if losses.size >= window:
            ma = np.convolve(losses, np.ones(window) / window, mode="valid")
            axes[0].plot(np.arange(ma.size) + window // 2, ma, color=f"C{i}", label=f"{name} (moving avg)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title(f"training loss, seed {payload['protocol']['seeds'][0]}", fontsize=9)
    axes[0].legend(fontsize=7)
    names = list(payload["variants"])
    for ax, key, label in (
        (axes[1], "loss_var_detrended", "detrended loss variance"),
        (axes[2], "dct_fd", "DCT-FD of samples (lower is better)"),
    ):
        means = [payload["variants"][n][key]["mean"] for n in names]
        stds = [payload["variants"][n][key]["std"] for n in names]
        ax.bar(names, means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(names))])
        for i, n in enumerate(names):
            vals = payload["variants"][n][key]["values"]
            ax.scatter([i] * len(vals), vals, c="k", s=8)
        if key == "dct_fd":
            ax.axhline(payload["floor_dct_fd"], ls="--", c="gray", label="real images (floor)")
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=9)
    fig.suptitle(
        f"DSM vs STF (n = {payload['protocol']['stf_ref_batch_size']}), DDPM++ demo without ST, "
        f"{payload['protocol']['n_iters']} steps",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run both variants for every seed; write the JSON and the figure after each run."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = common.demo_config(0, 1)
    num_eval = int(base.data.num_eval)
    if args.num_ref + args.num_samples > num_eval:
        raise ValueError(f"num_ref + num_samples must be <= {num_eval} held-out images.")
    ref = common.eval_images(base, args.num_ref, offset=num_eval - args.num_ref)
    floor = common.dct_fd(common.eval_images(base, args.num_samples), ref)
    root = args.workdir or tempfile.mkdtemp(prefix="exp_stf_")
    runs = {name: [] for name in variants(args.stf_n)}
    json_path = os.path.join(args.out, "stable_target_field.json")
    for seed in seeds:
        for name, overrides in variants(args.stf_n).items():
            row = run_one(args, name, overrides, seed, os.path.join(root, f"{name}_seed{seed}"), ref)
            print(
                f"[stf] {name} seed {seed}: DCT-FD {row['dct_fd']:.3f}, detrended loss var "
                f"{row['loss_var_detrended']:.3e}, train {row['train_seconds']:.0f} s",
                flush=True,
            )
            runs[name].append(row)
            common.write_json(json_path, summarise(runs, floor, args, time.perf_counter() - start, complete=False))
    payload = summarise(runs, floor, args, time.perf_counter() - start, complete=True)
    common.write_json(json_path, payload)
    figure(payload, runs, os.path.join(args.out, "stable_target_field.png"), args.window)
    for name, v in payload["variants"].items():
        print(
            f"{name:>4}: DCT-FD {v['dct_fd']['mean']:.3f} +- {v['dct_fd']['std']:.3f}, detrended loss var "
            f"{v['loss_var_detrended']['mean']:.3e} +- {v['loss_var_detrended']['std']:.3e}"
        )
    print(f"floor DCT-FD (real images): {floor:.3f}; {payload['elapsed_seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
