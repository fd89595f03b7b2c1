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
"""

import argparse
import math
import time

import numpy as np
import torch

import datasets
import soft_diffusion
from configs import demo_blur
from corruption import BlurCorruption, dct_2d, heat_eigenvalues, idct_2d


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--steps", type=str, default="4,8,16,32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
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
