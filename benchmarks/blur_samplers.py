"""Naive sampler vs Momentum Sampler of Soft Diffusion, with and without injected noise, at several NFE.

Setting (stated): Gaussian data with the spectrum of the SHAPES demo set, i.e. x0 ~ N(m, diag v) in the
DCT basis with (m, v) fitted to the SHAPES training images (16x16 RGB, centered to [-1, 1]), and the
*analytic* optimal denoiser h(x_t, t) = E[x0 | x_t] (closed form per DCT coefficient) in place of a
trained network, so the figures measure the samplers alone. Corruption: configs/demo_blur.py's blur
section (blur 0.3 -> 10 px, noise 0.01 -> 0.1, eps = 1e-3).

Quality figures (lower is better), against exact targets:
- W2(x_eps): Wasserstein-2 between diagonal-Gaussian fits (DCT basis) of the sampler's last state x_eps
  and of the exact corrupted law p_eps = N(c m, c^2 v + s^2) (the Frechet/FID formula on DCT features);
- W2(out): the same for the returned h(x_eps, eps) against the law of E[x0 | x_eps],
  N(m, c^2 v^2 / (c^2 v + s^2));
- var ratio: mean over coefficients of sample variance / exact variance of x_eps (1 is right; < 1 is
  variance collapse).
The floor row is the same W2 for exact samples of the same size (finite-sample noise).

Run from the repository root: python -m benchmarks.blur_samplers [--num_samples 500] [--steps 4,8,16,32]

Trained mode (--workdir DIR, a run directory trained with configs/demo_blur.py): restores
DIR/checkpoints/checkpoint_N.pth (the latest, or --ckpt N) with EMA weights and the fitted blur prior, draws
--num_samples samples with the naive and the Momentum Sampler at each NFE in --steps (same seeds), and reports
one quality figure against held-out SHAPES evaluation images: the Frechet distance between full-covariance
Gaussian fits of low-frequency DCT features (the K x K lowest DCT coefficients per channel, K = --dct_block,
default 4 -> 48 dims for RGB), computed with evaluation.fid_from_stats ("DCT-FD", lower is better). The floor
is the same figure for two disjoint halves of the real evaluation images (same sample count).

  python -m benchmarks.blur_samplers --workdir /tmp/demo_blur --num_samples 256 --steps 8,16,32
"""

import argparse
import math
import os
import re
import time

import numpy as np
import torch

import datasets
import evaluation
import run_lib
import soft_diffusion
from configs import demo_blur
from corruption import BlurCorruption, dct_2d, get_corruption, heat_eigenvalues, idct_2d


class GaussianPosteriorMean(torch.nn.Module):
    """Residual net of E[x0 | x_t], x0 ~ N(m, diag v) in the DCT basis: m + v c (X - c m) / (c^2 v + s^2)."""

    def __init__(self, corruption: BlurCorruption, mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.corruption, self.mean, self.var = corruption, mean, var
        self.calls = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = labels / 999
        c = response(self.corruption, t, x.shape[-2], x.shape[-1])
        s2 = self.corruption.noise_std(t).reshape(-1, 1, 1, 1) ** 2
        coeffs = dct_2d(x)
        post = self.mean + self.var * c * (coeffs - c * self.mean) / (c**2 * self.var + s2)
        return idct_2d(post) - x


def response(corruption: BlurCorruption, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """c = exp(-lambda sigma_B(t)^2 / 2) -> [B, 1, H, W]."""
    lam = heat_eigenvalues(height, width, t.device, t.dtype)
    return torch.exp(-lam * corruption.blur_sigma(t).reshape(-1, 1, 1, 1) ** 2 / 2)


def w2_to_target(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> float:
    """W2 between the diagonal DCT-basis Gaussian fit of samples and N(mean, diag var)."""
    coeffs = dct_2d(samples)
    d2 = (coeffs.mean(0) - mean) ** 2 + (coeffs.var(0).sqrt() - var.sqrt()) ** 2
    return float(d2.sum().sqrt())


def var_ratio(samples: torch.Tensor, var: torch.Tensor) -> float:
    """Mean over coefficients of sample variance / exact variance."""
    return float((dct_2d(samples).var(0) / var).mean())


def dct_features(images: torch.Tensor, block: int) -> np.ndarray:
    """Low-frequency DCT features: DCT-II coefficients [:, :, :K, :K] of images [N, C, H, W] -> [N, C K^2]."""
    coeffs = dct_2d(images.to(torch.float64))
    return coeffs[:, :, :block, :block].reshape(images.shape[0], -1).cpu().numpy()


def dct_frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """DCT-FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) on DCT features."""
    return evaluation.fid_from_stats(*evaluation.feature_stats(features_a), *evaluation.feature_stats(features_b))


def latest_checkpoint(workdir: str) -> int:
    """Largest N among DIR/checkpoints/checkpoint_N.pth."""
    folder = os.path.join(workdir, "checkpoints")
    found = [int(m.group(1)) for f in os.listdir(folder) if (m := re.fullmatch(r"checkpoint_(\d+)\.pth", f))]
    if not found:
        raise FileNotFoundError(
            f"No checkpoint_N.pth in {folder}. Train first: python main.py --config configs/demo_blur.py "
            f"--workdir {workdir} --mode train"
        )
    return max(found)


def run_trained(args: argparse.Namespace) -> None:
    """Naive vs Momentum Sampler on a trained demo_blur model: DCT-FD to held-out SHAPES images, per NFE."""
    config = demo_blur.get_config()
    if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        raise FileNotFoundError(
            f"{args.workdir}/checkpoints does not exist: pass --workdir a run directory trained with "
            "configs/demo_blur.py (python main.py --config configs/demo_blur.py --workdir DIR --mode train)."
        )
    ckpt = args.ckpt if args.ckpt is not None else latest_checkpoint(args.workdir)
    device = run_lib.get_device(config)
    corr = get_corruption(config)
    state = run_lib.build_state(config, device)
    ckpt_path = run_lib._restore_for_eval(config, args.workdir, ckpt, state, corr)
    model = state["model"]
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    eps = float(config.training.truncation_time)

    eval_ds = datasets.get_eval_dataset(config)
    n_eval = len(eval_ds)
    n_ref = n_eval // 2
    n_floor = min(args.num_samples, n_eval - n_ref)
    if n_floor < 2:
        raise ValueError(f"The evaluation set has {n_eval} images: too few for two disjoint halves.")
    ref = eval_ds.get_batch(np.arange(n_ref), augment=False)
    other = eval_ds.get_batch(np.arange(n_ref, n_ref + n_floor), augment=False)
    ref_feat = dct_features(ref, args.dct_block)
    floor = dct_frechet(dct_features(other, args.dct_block), ref_feat)

    shape = (args.num_samples, config.data.num_channels, config.data.image_size, config.data.image_size)
    print(
        f"Trained demo_blur model {ckpt_path}, {args.num_samples} samples, eps = {eps}; DCT-FD on the "
        f"{args.dct_block}x{args.dct_block} lowest DCT coefficients per channel "
        f"({ref_feat.shape[1]} dims) against {n_ref} held-out SHAPES images"
    )
    print(f"floor (real eval half vs the other half, {n_floor} vs {n_ref} images): DCT-FD = {floor:.5f}")
    header = f"{'NFE':>5}{'naive':>11}{'momentum':>11}{'ratio n/m':>11}{'naive s':>9}{'mom. s':>9}"
    print(header)
    print("-" * len(header))
    for steps in [int(s) for s in args.steps.split(",")]:
        row = {}
        for name, getter in (
            ("naive", soft_diffusion.get_naive_sampler),
            ("momentum", soft_diffusion.get_momentum_sampler),
        ):
            sampler = getter(
                corr,
                shape,
                inverse_scaler,
                num_steps=steps,
                eps=eps,
                device=device,
                generator=torch.Generator(device=device).manual_seed(args.seed + 2),
            )
            z = corr.prior_sampling(
                shape, device=device, generator=torch.Generator(device=device).manual_seed(args.seed + 3)
            )
            start = time.perf_counter()
            out, nfe = sampler(model, z)
            elapsed = time.perf_counter() - start
            assert nfe == steps
            fd = dct_frechet(dct_features(out.clamp(0.0, 1.0), args.dct_block), ref_feat)
            row[name] = (fd, elapsed)
        (a, ta), (b, tb) = row["naive"], row["momentum"]
        print(f"{steps:>5}{a:>11.5f}{b:>11.5f}{a / b if b > 0 else math.inf:>11.2f}{ta:>9.2f}{tb:>9.2f}")
    print("ratio > 1: the Momentum Sampler is closer to the data than the naive sampler at the same NFE.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--steps", type=str, default="4,8,16,32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=str, default=None, help="trained demo_blur run directory (trained mode)")
    parser.add_argument("--ckpt", type=int, default=None, help="checkpoint number (default: the latest)")
    parser.add_argument("--dct_block", type=int, default=4, help="K: features are the K x K lowest DCT coefficients")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.workdir is not None:
        run_trained(args)
        return
    dtype = torch.float32

    config = demo_blur.get_config()
    images, _ = datasets.make_shapes(4096, size=config.data.image_size, seed=0)
    x_data = torch.from_numpy(images).to(dtype) / 255.0 * 2 - 1
    coeffs = dct_2d(x_data)
    mean, var = coeffs.mean(0), coeffs.var(0) + 1e-6
    corr = BlurCorruption.from_config(config)
    # prior at t = 1 from the Gaussian model itself (exact: N(c m, c^2 v + s^2))
    eps = float(config.training.truncation_time)
    t1 = torch.ones(1, dtype=dtype)
    c1 = response(corr, t1, *mean.shape[-2:])[0]
    corr.load_state_dict({"prior_mean": c1 * mean, "prior_var": c1**2 * var + corr.noise_std(t1) ** 2})

    te = torch.full((1,), eps, dtype=dtype)
    ce = response(corr, te, *mean.shape[-2:])[0]
    se2 = corr.noise_std(te) ** 2
    target_mean, target_var = ce * mean, ce**2 * var + se2  # p_eps
    out_var = ce**2 * var**2 / (ce**2 * var + se2)  # law of E[x0 | x_eps] (mean m)

    shape = (args.num_samples, *mean.shape)
    gen = torch.Generator().manual_seed(args.seed + 1)
    exact = idct_2d(target_mean + target_var.sqrt() * torch.randn(shape, dtype=dtype, generator=gen))
    floor = w2_to_target(exact, target_mean, target_var)
    exact_out = idct_2d(mean + out_var.sqrt() * torch.randn(shape, dtype=dtype, generator=gen))
    floor_out = w2_to_target(exact_out, mean, out_var)

    print(
        f"Gaussian data with the SHAPES spectrum ({shape[1]}x{shape[2]}x{shape[3]}), analytic denoiser, "
        f"{args.num_samples} samples, eps = {eps}"
    )
    header = f"{'sampler':<22}{'NFE':>5}{'W2(x_eps)':>12}{'W2(out)':>11}{'var ratio':>11}{'time s':>9}"
    print(header)
    print("-" * len(header))
    print(f"{'exact samples (floor)':<22}{'-':>5}{floor:>12.4f}{floor_out:>11.4f}{var_ratio(exact, target_var):>11.3f}")
    results = {}
    for steps in [int(s) for s in args.steps.split(",")]:
        for name, getter, noise in (
            ("naive", soft_diffusion.get_naive_sampler, True),
            ("naive, no noise", soft_diffusion.get_naive_sampler, False),
            ("momentum", soft_diffusion.get_momentum_sampler, True),
            ("momentum, no noise", soft_diffusion.get_momentum_sampler, False),
        ):
            net = GaussianPosteriorMean(corr, mean, var)
            last_input = {}

            def hook(module, inputs, _store=last_input):
                _store["x"] = inputs[0]

            net.register_forward_pre_hook(hook)
            sampler = getter(
                corr,
                shape,
                lambda x: x,
                num_steps=steps,
                eps=eps,
                noise=noise,
                generator=torch.Generator().manual_seed(args.seed + 2),
            )
            start = time.perf_counter()
            z = corr.prior_sampling(shape, generator=torch.Generator().manual_seed(args.seed + 3)).to(dtype)
            out, nfe = sampler(net, z)
            elapsed = time.perf_counter() - start
            assert nfe == net.calls == steps
            w2_state = w2_to_target(last_input["x"], target_mean, target_var)
            w2_out = w2_to_target(out, mean, out_var)
            ratio = var_ratio(last_input["x"], target_var)
            results[(name, steps)] = w2_state
            print(f"{name:<22}{nfe:>5}{w2_state:>12.4f}{w2_out:>11.4f}{ratio:>11.3f}{elapsed:>9.2f}")
    print()
    print("W2(x_eps) ratio naive / momentum (with noise), per NFE:")
    for steps in [int(s) for s in args.steps.split(",")]:
        a, b = results[("naive", steps)], results[("momentum", steps)]
        print(f"  NFE {steps:>4}: {a:.4f} / {b:.4f} = {a / b if b > 0 else math.inf:.2f}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
